"""``prefill-router evaluate``: the router artifact against oracle, single models and baselines.

Every router (:mod:`training.evaluate.baselines`) is fitted on **train**, tuned / early-stopped on
**val**, and scored on the held-out **test** split: on all of it, on the queries where the
targets disagree, and per task (:mod:`training.evaluate.scoring`). The operating point
(a routing rule: a registered policy, by default whichever meets the target best)
is calibrated on **val** from a target mean cost or accuracy, or is the artifact's default;
a calibrated point is written back into the artifact (``shared.artifact.update_meta``).

A foreign artifact on a fresh table (e.g. a router shipped for RouterBench, scored on a newly
imported slice): with ``all_rows_test`` (automatic when the table has no train rows) every
row is scored as test; baselines that need train (or val) rows are skipped and the report says
so, unless ``train_data`` names a dataset whose train / val rows they are fitted on
(always-cheapest, always-best and task-best take their targets from the artifact:
:mod:`training.evaluate.artifact_refs`). The
artifact's encoder, layers and widths are checked against the activations first.

Semantic baselines embed the text of :mod:`training.semantic_text` (``semantic_text``).

Outputs under ``out``: ``report.json`` (every number), ``report.md``, ``cost_accuracy.png``
and ``cost_accuracy_disagreement.png`` (:mod:`training.evaluate.report`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from shared.cli_utils import config_command, console, run_cli
from shared.config import StrictConfig
from shared.errors import BadInput
from shared.features import block_width, encoder_columns
from shared.policy import Policy
from training.loop import TrunkConfig
from training.evaluate.artifact_refs import from_artifact, write_back
from training.evaluate.baselines import RouterModel
from training.evaluate.off_policy_eval import OffPolicyConfig
from training.dataset import RoutingData
from training.evaluate.results import ChosenOperatingPoint, EvalReport, EvalRows, PublishedFigure, RowMeta
from training.evaluate.novelty_gate import calibrate_gate, gate_summary
from training.evaluate.scoring import PAPER_SAVINGS, evaluate_routers
from training.semantic_text import SemanticTextConfig, read_queries, semantic_texts

log = logging.getLogger(__name__)

BASELINES = ("random", "always-cheapest", "always-best", "knn-minilm", "mlp-minilm", "mf-minilm")
REFERENCES = ("task-best",)  # told the query's task: opt-in references, not routers
SEMANTIC = ("knn-minilm", "mlp-minilm", "mf-minilm")
NEEDS = {"random": (), "always-cheapest": ("train",), "always-best": ("train",), "task-best": ("train",),
         "knn-minilm": ("train",), "mlp-minilm": ("train", "val"), "mf-minilm": ("train", "val")}


class OperatingPointConfig(StrictConfig):
    """How the routing rule is chosen on val; neither target: the artifact's default."""

    policy: str = Field(
        "auto", description="Policy calibrated (a registered shared.policy name, e.g. 'tolerance' or 'value'): 'auto' "
        "calibrates every one and keeps the one that reaches target_accuracy most cheaply, or is most accurate "
        "within target_cost, on val.")
    target_cost: float | None = Field(None, gt=0, description="Mean USD per query to stay within (best accuracy).")
    target_accuracy: float | Literal["best_single"] | None = Field(
        None, description="Accuracy to reach at the lowest cost; 'best_single': the best single model's val accuracy.")

    @model_validator(mode="after")
    def _one(self) -> "OperatingPointConfig":
        if self.policy != "auto":
            Policy.named(self.policy)
        if self.target_cost is not None and self.target_accuracy is not None:
            raise ValueError("give at most one of target_cost and target_accuracy")
        return self


class TrainDataConfig(StrictConfig):
    """A second dataset whose train / val rows fit the baselines (and calibrate the operating
    point) when the evaluated table is all test."""

    activations: str = Field(description="Its activation dataset (same encoder and columns as the artifact's).")
    labels: str = Field(description="Its labels dataset (every target of the artifact).")
    queries: str | None = Field(None, description="Its query table (semantic baselines, task-best).")


class EvalConfig(StrictConfig):
    """Config of ``prefill-router evaluate``."""

    artifact: str = Field(description="Router artifact directory written by `prefill-router fit`.")
    activations: str = Field(description="Activation dataset written by `prefill-router capture`.")
    labels: str = Field(description="Labels dataset written by `prefill-router label`.")
    queries: str | None = Field(None, description="Query table (Parquet) with the prompts and tasks; semantic "
                                "baselines, task-best and the per-task rows need it.")
    out: str = Field("runs/eval", description="Output directory: local path or s3:// URI.")
    routers: list[Literal[BASELINES + REFERENCES]] = Field(
        list(BASELINES), description="Baselines evaluated beside the artifact (task-best: opt-in reference).")
    operating_point: OperatingPointConfig = Field(default_factory=OperatingPointConfig,
                                                  description="Routing-rule calibration on val.")
    write_operating_point: bool = Field(True, description="Write a calibrated operating point into the artifact.")
    novelty_quantile: float | None = Field(
        None, gt=0, lt=1, description="Calibrate the novelty gate (shared.novelty) on train + val at this quantile "
        "of val's novelty, evaluate with it and write it into the artifact with the operating point: prompts "
        "unlike the training ones are then routed by the targets' mean scores. null: the artifact's gate as it is "
        "(none unless an earlier evaluate wrote one); a table without train and val rows always keeps it.")
    pauccc_interpolation: Literal["step", "linear"] = Field("linear", description="P-AUCCC curve between sweep points.")
    savings_threshold: float = Field(
        PAPER_SAVINGS, ge=0, lt=1, description="Report the best gap closed among operating points saving at least "
        "this share of the most expensive model's cost (the paper: 45.58% gap closed at 74.31% savings).")
    all_rows_test: bool | Literal["auto"] = Field(
        "auto", description="Score every row as test (a foreign artifact on a fresh table); 'auto': when the "
        "table has no train rows.")
    train_data: TrainDataConfig | None = Field(
        None, description="With all rows as test: a dataset whose train / val rows fit the baselines; none: the "
        "baselines that need train rows are skipped.")
    semantic_text: SemanticTextConfig = Field(default_factory=SemanticTextConfig,
                                              description="The text the semantic baselines embed.")
    knn_ks: list[int] = Field([5, 10, 20, 40, 80], min_length=1, description="k values tried on val for kNN.")
    mlp_seeds: int = Field(3, gt=0, description="Seeds of the semantic MLP ensemble (all kept).")
    n_components: int = Field(128, gt=0, description="PCA components of the semantic MLP's embedding transform.")
    mf_dim: int = Field(64, gt=0, description="Latent size of the matrix-factorisation router.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap replicates over the test queries: of the AUC margin "
                           "over each probabilistic baseline (paired) and of the router's operating point (0: skip).")
    task_min_rows: int = Field(50, gt=0, description="task-best: a task with fewer train+val rows is pooled "
                               "into its source (e.g. MMLU subjects into mmlu).")
    trunk: TrunkConfig = Field(default_factory=TrunkConfig, description="Semantic MLP network and optimiser.")
    published: list[PublishedFigure] = Field(
        default_factory=list, description="Published results to show as fixed references: a row of the report and "
        "a horizontal line on the plot (e.g. {label: RouterDC, task_averaged_accuracy: 0.527}).")
    embedder: str | None = Field(None, description="Sentence-transformers model dir; default the packaged MiniLM.")
    off_policy: OffPolicyConfig = Field(
        default_factory=OffPolicyConfig, description="Labels from a decision log (with propensities): the "
        "off-policy (IPS / SNIPS / DR) estimates of every router's accuracy and cost on test, and their clipping.")


# ------------------------------------------------------------------------------ inputs
def query_texts(queries_uri: str, query_ids: Sequence[str]) -> list[str]:
    """The prompt text (message contents joined by blank lines) of each query id, in order."""
    return read_queries(queries_uri, query_ids)["text"]


def _queries(cfg: EvalConfig, who: str) -> str:
    if not cfg.queries:
        raise BadInput(f"{who} needs the query table: set queries=<path to queries.parquet>")
    return cfg.queries


def check_activations(artifact, artifact_uri: str, activations_uri: str) -> None:
    """Refuse activations the artifact cannot read, from their capture manifest: another encoder
    (name; sha256 / revision where both sides record one), missing (layer, pooling) columns or
    another hidden size. No manifest: only the columns and widths are checked (on load)."""
    from shared import storage

    uri = storage.join(activations_uri, "manifest.json")
    if not storage.exists(uri):
        log.warning("%s has no manifest.json: the artifact's encoder cannot be checked", activations_uri)
        return
    manifest = storage.read_json(uri)
    ident = manifest.get("identity") or {}
    enc = ident.get("encoder") or manifest.get("encoder") or {}
    enc = {"name": enc} if isinstance(enc, str) else enc
    meta = artifact.router.meta
    for key in ("name", "sha256", "revision"):
        want, got = getattr(meta.encoder, key), enc.get(key)
        if want is not None and got is not None and want != got:
            raise BadInput(
                f"the artifact {artifact_uri} was fitted on encoder {key}={want!r}, but {activations_uri} was "
                f"captured with {key}={got!r}: its activations mean nothing to this router. Capture the table with "
                f"the artifact's encoder (prefill-router capture encoder={meta.encoder.name} layers={meta.layers}) "
                "or evaluate an artifact fitted on this encoder.")
    have = manifest.get("columns") or (encoder_columns(ident["layers"], ident["poolings"], ident.get("num_layers"))
                                       if ident.get("layers") and ident.get("poolings") else [])
    adapted = derived_blocks(meta)  # computed from token states on load
    need = sorted(b for b in artifact.router.block_names if b not in adapted)
    missing = [c for c in need if c not in have] if have else []
    if missing:
        raise BadInput(f"the artifact {artifact_uri} reads layers/poolings {need} (hidden_states index 0 = "
                         f"embeddings); {activations_uri} holds {sorted(have)}: capture layers {meta.layers} "
                         f"with poolings {meta.poolings}")
    width = ident.get("hidden_size")
    wrong = [b.name for b in (meta.transform.blocks if meta.transform else [])
             if width and b.d_in != block_width(b.name, width)]
    if wrong:
        raise BadInput(f"the artifact {artifact_uri} expects blocks {wrong} of width "
                         f"{[b.d_in for b in meta.transform.blocks]}, but {activations_uri} has hidden size {width}")


def check_data(artifact, data: RoutingData) -> None:
    """Targets in the artifact's order, and each artifact block's width in the data."""
    if list(data.targets) != artifact.router.target_names:
        raise BadInput(f"data targets {data.targets} differ from the artifact's {artifact.router.target_names}")
    for b in artifact.router.meta.transform.blocks:
        col = data.blocks.get(b.name)
        if col is not None and col.shape[1] != b.d_in:
            raise BadInput(f"the artifact's block {b.name} has width {b.d_in}, but the activations' "
                             f"{b.name} has width {col.shape[1]}: another encoder?")


def derived_blocks(meta) -> set[str]:
    """The artifact's blocks that are not captured columns but computed from the capture's token states on
    load: an adapter's (:func:`training.token_states.adapted_blocks`) and attn blocks
    (:func:`training.token_states.attn_blocks`)."""
    adapter, pooled = getattr(meta, "adapter", None), getattr(meta, "pooled", None)
    return set(adapter.block_names() if adapter else []) | set(pooled.names if pooled else [])


def load_data(artifact, artifact_uri: str, activations: str, labels: str) -> RoutingData:
    """Activations (checked against the artifact first) joined with every target's labels."""
    from training.dataset import load_routing_data

    from training.token_states import adapted_blocks, attn_blocks

    check_activations(artifact, artifact_uri, activations)
    meta = artifact.router.meta
    derived = derived_blocks(meta)
    data = load_routing_data(activations, labels, artifact.router.target_names,
                             blocks=[b for b in artifact.router.block_names if b not in derived] or None)
    if derived:
        data.blocks = {b: v for b, v in data.blocks.items() if b in artifact.router.block_names}
        data.blocks.update(adapted_blocks(activations, artifact_uri, meta, list(data.query_ids), data.n_tokens))
        data.blocks.update(attn_blocks(activations, artifact_uri, meta, list(data.query_ids)))
    check_data(artifact, data)
    return data


def concat_data(a: RoutingData, b: RoutingData) -> RoutingData:
    """Rows of ``a`` then ``b`` (same targets and blocks); ``n_tokens`` kept only when both have it;
    propensities (a decision log's) kept when either has them, the other's rows without (NaN, 0 decisions)."""
    both = len(a.n_tokens) == len(a.query_ids) and len(b.n_tokens) == len(b.query_ids)
    logged = {}
    if a.logged or b.logged:
        def part(d: RoutingData, key: str, fill: float) -> np.ndarray:
            return getattr(d, key) if d.logged else np.full(d.Y.shape, fill)

        logged = {k: np.concatenate([part(a, k, fill), part(b, k, fill)])
                  for k, fill in (("propensity", np.nan), ("decisions", 0.0))}
    return replace(a, query_ids=np.concatenate([a.query_ids, b.query_ids]), split=np.concatenate([a.split, b.split]),
                   blocks={k: np.concatenate([a.blocks[k], b.blocks[k]]) for k in a.blocks},
                   **{k: np.concatenate([getattr(a, k), getattr(b, k)])
                      for k in ("Y", "cost", "input_tokens", "output_tokens")},
                   n_tokens=np.concatenate([a.n_tokens, b.n_tokens]) if both else np.zeros(0), **logged)


def _rows_meta(uri: str | None, ids, texts=None, tasks=None) -> RowMeta | None:
    """Text, task and source per row: from the query table at ``uri``, or the ones given."""
    meta = RowMeta(**read_queries(uri, list(ids))) if uri else None
    if meta is None and texts is None and tasks is None:
        return None
    meta = meta or RowMeta.blank(len(ids))
    if texts is not None:
        meta.text = list(texts)
    if tasks is not None:
        meta.task = [str(t) for t in tasks]
        meta.source = [s or t for s, t in zip(meta.source, meta.task)]
    return meta


def prepare_rows(cfg: EvalConfig, artifact, data: RoutingData, texts=None, tasks=None) -> EvalRows:
    """The rows to evaluate: ``data`` (all as test in all-rows-test mode, plus ``train_data``'s
    train / val rows) with each row's text, task and source (None without a query table)."""
    all_test = cfg.all_rows_test is True or (cfg.all_rows_test == "auto" and not (data.split == "train").any())
    meta = _rows_meta(cfg.queries, data.query_ids, texts, tasks)
    if all_test:
        data = replace(data, split=np.full(len(data.query_ids), "test", dtype=object))
    elif cfg.train_data is not None:
        raise BadInput("train_data is for a table scored all as test: set all_rows_test=true")
    if all_test and cfg.train_data is not None:
        td = cfg.train_data
        extra = load_data(artifact, cfg.artifact, td.activations, td.labels).where("train", "val")
        overlap = set(extra.query_ids.tolist()) & set(data.query_ids.tolist())
        if overlap:
            raise BadInput(f"{len(overlap)} test queries are also train / val rows of train_data "
                             f"(e.g. {sorted(overlap)[:3]}): the baselines would see the test answers")
        extra_meta = _rows_meta(td.queries, extra.query_ids)
        if (meta is None) != (extra_meta is None):
            raise BadInput("set both queries and train_data.queries, or neither")
        data = concat_data(data, extra)
        meta = None if meta is None else meta + extra_meta
    return EvalRows(data, meta, all_test)


def runnable(routers: Sequence[str], data: RoutingData) -> tuple[list[str], dict[str, str]]:
    """``(routers that can be fitted, {skipped router: reason})`` given the splits present."""
    present = set(np.unique(data.split).tolist())
    run, skipped = [], {}
    for name in routers:
        lacking = [s for s in NEEDS[name] if s not in present]
        if lacking:
            skipped[name] = f"needs {' and '.join(lacking)} rows (none given)"
        else:
            run.append(name)
    return run, skipped


def build_routers(cfg: EvalConfig, names: Sequence[str], embedder=None, tasks=None,
                  preset: dict[str, Any] | None = None) -> list[RouterModel]:
    """The baselines ``names`` (semantic ones share one embedder, so texts embed once);
    ``tasks``: ``{query_id: (source, task)}`` for task-best; ``preset``: the target of
    always-cheapest / always-best, and task-best's ``(record, target names)``, when known
    without train rows (:func:`training.evaluate.artifact_refs.from_artifact`)."""
    from training.evaluate import baselines as B

    if any(r in SEMANTIC for r in names) and embedder is None:
        from training.embedder import MiniLMEmbedder

        embedder = MiniLMEmbedder(cfg.embedder)
    make = {
        "random": lambda: B.RandomRouter(),
        "always-cheapest": lambda: B.AlwaysCheapest((preset or {}).get("always-cheapest")),
        "always-best": lambda: B.AlwaysBest((preset or {}).get("always-best")),
        "knn-minilm": lambda: B.KNNRouter(embedder, cfg.knn_ks),
        "mlp-minilm": lambda: B.MLPRouter(embedder, seeds=cfg.mlp_seeds, keep=cfg.mlp_seeds,
                                          n_components=cfg.n_components, trunk=cfg.trunk),
        "mf-minilm": lambda: B.MFRouter(embedder, dim=cfg.mf_dim),
        "task-best": lambda: (B.TaskBestRouter.from_record(tasks, *preset["task-best"])
                              if "task-best" in (preset or {}) else B.TaskBestRouter(tasks, cfg.task_min_rows)),
    }
    return [make[name]() for name in names]


def baseline_inputs(cfg: EvalConfig, names: list[str], data: RoutingData,
                    meta: RowMeta | None) -> tuple[list[str], Any, Any]:
    """``(texts, semantic-text info, {query_id: (source, task)})`` the baselines ``names`` read."""
    needs_text, n = any(r in SEMANTIC for r in names), len(data.query_ids)
    if (needs_text or "task-best" in names) and meta is None:
        _queries(cfg, "semantic baselines" if needs_text else "task-best")
    if not needs_text:
        return [""] * n, None, None if meta is None else dict(zip(data.query_ids, zip(meta.source, meta.task)))
    tasks = meta.task if any(meta.task) else None
    texts, info = semantic_texts(meta.text, tasks, data.split == "train", cfg.semantic_text)
    return texts, info, dict(zip(data.query_ids, zip(meta.source, meta.task)))


def set_gate(router, gate) -> None:
    """Give ``router`` (in memory) the novelty ``gate``; None leaves it as it is."""
    if gate is not None:
        router.meta = router.meta.model_copy(update={"policy": router.meta.policy.model_copy(update={"novelty": gate})})


def run_evaluation(cfg: EvalConfig, data: RoutingData | None = None, texts: Sequence[str] | None = None,
                   embedder=None, tasks: Sequence[str] | None = None) -> EvalReport:
    """Load everything, evaluate, write the operating point and the report; returns the report.
    ``data`` / ``texts`` / ``tasks`` (per row of ``data``) replace what the paths would load."""
    from training.evaluate.baselines import ArtifactRouter
    from training.evaluate.report import PAPER, summary_table, task_table, write_outputs

    artifact = ArtifactRouter.load(cfg.artifact)
    if data is None:
        data = load_data(artifact, cfg.artifact, cfg.activations, cfg.labels)
    check_data(artifact, data)
    rows = prepare_rows(cfg, artifact, data, texts, tasks)
    data, meta = rows.data, rows.meta
    names, skipped = runnable(cfg.routers, data)
    preset, sources = from_artifact(artifact, data, skipped, meta)
    names = [n for n in cfg.routers if n in names or n in preset]
    for name, why in {**skipped, **sources}.items():
        log.warning("%s %s: %s", name, "from the artifact" if name in sources else "skipped", why)
    texts, text_info, task_of = baseline_inputs(cfg, names, data, meta)
    row_tasks = meta.task if meta is not None and any(meta.task) else None
    if cfg.novelty_quantile is not None and not rows.all_rows_test:
        set_gate(artifact.router, calibrate_gate(artifact.router, data, cfg.novelty_quantile, row_tasks))
    models = build_routers(cfg, names, embedder, task_of, preset)
    scores = evaluate_routers(artifact, models, data, texts, cfg, row_tasks)
    op = ChosenOperatingPoint.model_validate(scores["operating_point"])
    report = EvalReport.model_validate({
        **scores, "operating_point": op, "all_rows_test": rows.all_rows_test, "skipped_routers": skipped,
        "artifact_baselines": sources,
        "semantic_text": text_info, "operating_point_written": write_back(cfg, artifact, op, models),
        "novelty": gate_summary(artifact.router, data),
        "artifact": cfg.artifact, "config": cfg.model_dump(mode="json"), "paper": PAPER,
        **({"published": cfg.published} if cfg.published else {})})
    write_outputs(report, cfg.out)
    clean = report.to_json()
    console.print(summary_table(clean))
    if report.off_policy is not None:
        from training.evaluate.off_policy_eval import off_policy_table

        console.print(off_policy_table(clean))
    if 0 < len(report.by_task) <= 30:  # more: report.md has them
        console.print(task_table(clean))
    console.print(f"report written to {cfg.out}/report.json, report.md, cost_accuracy*.png")
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router evaluate", argv, config_command(
        EvalConfig, run_evaluation, "Evaluate a router artifact against the oracle, single models and baselines."))
