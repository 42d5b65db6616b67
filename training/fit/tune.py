"""``prefill-router tune``: choose the trunk's blocks and PCA size by cross-validation on
train + val (never test), with the semantic embedding scored the same way for reference.

Each candidate (a block list and ``n_components``) is scored by :func:`cv_scores`: K folds
grouped by ``group_id`` (variants of one source item stay in one fold); in each fold the
standardise->PCA transform is fitted on the training folds only, an ensemble of
SharedTrunkNets is trained on 85% of them and early-stopped on the other 15%, and the
per-target AUC (with Brier and log-loss beside it) is measured on the held-out fold, on the
soft labels as they are (no threshold: a score ``y`` counts ``y`` right, ``1 - y`` wrong).
With ``minilm: true`` the MiniLM sentence embedding (the semantic baselines' input) goes
through the same protocol, so the prefill-over-semantic margin is known before any test
number is looked at.

A candidate may name ``h{layer}_attn`` blocks (:mod:`shared.pooling`): attention pooling over the
capture's token states of that layer (``token_layers``), trained end to end with the trunk on the same
folds (``pool`` sets the token PCA size, queries and window); ``n_components`` still sizes the vector blocks.

A candidate may also name its training objective (:mod:`training.objectives`: the masked BCE,
or it plus a ranking term), and every candidate is also scored on what a routing decision
needs: the pairwise AUC (:func:`training.metrics.pairwise_auc`, is the better of two targets
ranked higher) and, with the query table's tasks, the within-task AUC.

The chosen candidate (:func:`choose_candidate`) is the best mean of ``choose_by`` (default the
mean CV AUC), or with ``depth_tolerance`` > 0 the shallowest near-best one, as ``probe``
chooses blocks. Writes ``tune.json`` and ``tune.png`` (mean CV AUC per candidate, one bar per
target).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field

from shared import storage
from shared.cli_utils import config_command, console, run_cli
from shared.config import StrictConfig
from shared.errors import BadInput
from shared.features import is_attn
from training.cv import fold_groups, row_tasks, score_folds, score_row, split_folds
from training.loop import PropensityWeighting, TrunkConfig
from training.dataset import RoutingData, RoutingDataConfig
from training.fit.probe import choice_rows, save_figure
from training.objectives import ObjectiveConfig
from training.pooled import PoolConfig, ensemble_proba, fit_inputs, take, train_pooled_one

MINILM = "minilm"


class Candidate(StrictConfig):
    """One configuration of the trunk's input features."""

    blocks: list[str] | Literal["probe"] = Field(
        description="Activation columns, 'probe' (the probe report's selection) or [minilm] (sentence embedding).")
    n_components: int = Field(gt=0, description="PCA components per block (fitted on the training folds only).")
    objective: ObjectiveConfig | None = Field(None, description="Training objective of this candidate; "
                                                                "None: trunk.objective.")


class TuneConfig(RoutingDataConfig):
    """Config of ``prefill-router tune``."""

    targets: list[str] = Field(description="Targets, in the order of the router's outputs.")
    queries: str | None = Field(None, description="Query table: folds grouped by group_id; needed for minilm.")
    probe_report: str | None = Field(None, description="probe.json for candidates whose blocks are 'probe'.")
    candidates: list[Candidate] = Field(min_length=1, description="Feature configurations to compare.")
    minilm: bool = Field(False, description="Also score the MiniLM embedding (as the semantic MLP baseline sees it).")
    minilm_components: int = Field(128, gt=0, description="PCA components of the MiniLM candidate.")
    out: str = Field("runs/tune", description="Output directory (local path) for tune.json and tune.png.")
    splits: list[str] = Field(default_factory=lambda: ["train", "val"], description="Splits used; never test.")
    folds: int = Field(5, ge=2, description="Cross-validation folds.")
    seeds: int = Field(3, gt=0, description="Ensemble members per fold (all kept).")
    early_stop_share: float = Field(0.15, gt=0, lt=1, description="Share of the training folds for early stopping.")
    trunk: TrunkConfig = Field(default_factory=TrunkConfig, description="SharedTrunkNet network and optimiser.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="How candidates' h<layer>_attn blocks pool "
                             "the capture's token states (token_layers); not read without attn blocks.")
    choose_by: Literal["mean_auc", "pairwise_auc", "mean_within_task_auc"] = Field(
        "mean_auc", description="The score the choice maximises: the mean per-target CV AUC, the pairwise AUC "
        "(which of two targets is better for a query), or the mean within-task AUC (needs queries).")
    depth_tolerance: float = Field(
        0.0, ge=0, description="Prefer a shallower encoder: among candidates whose mean CV AUC is within this of "
        "the best, choose the one whose deepest layer is shallowest (then the best AUC), as probe does.")
    seed: int = Field(0, description="Seed of the fold split and the early-stopping split.")
    propensity_weighting: PropensityWeighting = Field(
        "none", description="As fit's train.propensity_weighting (labels from a decision log): the members of "
        "every fold weigh each labelled cell's BCE by 1/propensity (none, ips, or clipped at propensity_clip); set "
        "it as fit's. The held-out scores (AUC, Brier, ...) stay unweighted, over the observed cells. Not with "
        "h<layer>_attn candidates.")
    propensity_clip: float = Field(10.0, ge=1, description="clipped: the largest weight a cell gets.")


def fold_predictions(blocks: dict[str, np.ndarray], Y: np.ndarray, groups: np.ndarray, n_components: int,
                     trunk: TrunkConfig, folds: int = 5, seeds: int = 3, early_stop_share: float = 0.15,
                     seed: int = 0, tokens: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                     pool: PoolConfig | None = None,
                     weights: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per fold ``f`` (GroupKFold over ``groups``): ``(held_f, P_f)``, the held-out row indices and
    ``(len(held_f), T)`` predictions of a SharedTrunkNet ensemble that never saw them.

    ``blocks``: ``{name: (n, d_b)}``; ``Y``: ``(n, T)`` in [0, 1] with NaN = missing. The
    standardise->PCA transform is fitted on the training folds only; ``seeds`` members are
    trained on a ``1 - early_stop_share`` part of them and early-stopped on the rest;
    ``P_f = mean_s sigmoid(net_s(X[held_f]))``.

    ``tokens``: ``{attn block: (states (n, W, D), mask (n, W))}``; with any, the members are
    :class:`shared.pooling.PooledTrunkNet` (``pool``'s settings) over the vector blocks and these, their token
    transforms fitted on the same training rows (:func:`training.pooled.fit_inputs`), on the same folds.

    ``weights``: ``(n, T)`` loss weights per cell (:func:`training.loop.propensity_weights`; 0 = missing)
    for the members' BCE and early stopping; not with ``tokens``.
    """
    from shared.trunk import FeatureTransform

    from training.loop import build_ensemble, train_one

    if tokens and weights is not None:
        raise BadInput("propensity weighting is not implemented for h<layer>_attn candidates (training/pooled.py)")
    W = (lambda rows: None) if weights is None else (lambda rows: weights[rows])  # noqa: E731
    for tr, es, held in split_folds(len(Y), groups, folds, seed, early_stop_share):
        if tokens:
            pool = pool or PoolConfig()
            inputs = fit_inputs(blocks, tokens, tr, n_components, pool, seed)
            members = [train_pooled_one((take(inputs, tr), Y[tr]), (take(inputs, es), Y[es]), seed + s, trunk, pool)
                       for s in range(seeds)]
            yield held, ensemble_proba(members, take(inputs, held))
            continue
        transform = FeatureTransform.fit({b: x[tr] for b, x in blocks.items()}, n_components=n_components, seed=seed)
        X = transform.transform(blocks)
        members = [train_one(X[tr], Y[tr], W(tr), X[es], Y[es], W(es), seed=seed + s, cfg=trunk)
                   for s in range(seeds)]
        yield held, build_ensemble(members).predict_proba(X[held])


def cv_scores(blocks: dict[str, np.ndarray], Y: np.ndarray, groups: np.ndarray, n_components: int,
              trunk: TrunkConfig, folds: int = 5, seeds: int = 3, early_stop_share: float = 0.15,
              seed: int = 0, tasks: np.ndarray | None = None, tokens: dict | None = None,
              pool: PoolConfig | None = None, weights: np.ndarray | None = None) -> dict[str, Any]:
    """Cross-validated scores of a SharedTrunkNet ensemble, each the mean over folds (NaN-skipping)
    of :func:`fold_predictions`' held-out predictions (same arguments and shapes). Per target,
    ``(T,)``: ``auc`` (``masked_auc(Y[held_f], P_f)``), ``brier``, ``log_loss`` and, with
    ``tasks`` ``(n,)``, ``within_task_auc`` (:func:`training.metrics.within_group_auc`); and
    ``pairwise_auc``, a float (:func:`training.metrics.pairwise_auc`). All read soft labels as
    they are (:mod:`training.metrics`: a score ``y`` counts ``y`` right and ``1 - y`` wrong). ``tokens``, ``pool``:
    attn blocks, ``weights`` the members' loss weights, as :func:`fold_predictions` takes them (the scores
    are unweighted)."""
    return score_folds(Y, fold_predictions(blocks, Y, groups, n_components, trunk, folds, seeds, early_stop_share,
                                           seed, tokens, pool, weights), tasks)


def choose_candidate(rows: Sequence[dict[str, Any]], depth_tolerance: float = 0.0,
                     key: str = "mean_auc") -> dict[str, Any]:
    """The chosen row: among rows with ``row[key] >= max(row[key]) - depth_tolerance``, the
    smallest deepest layer (``max`` of the blocks' layer indices), then the highest ``row[key]``.
    MiniLM rows and rows whose ``row[key]`` is NaN or absent (no fold had both classes; no tasks)
    are never chosen."""
    from shared.features import parse_block

    rows = [r for r in rows if r["blocks"] != [MINILM] and np.isfinite(r.get(key, np.nan))]
    if not rows:
        raise BadInput(f"no prefill candidate has a cross-validated {key} (too few rows, a target with one "
                       "class only in every fold, or within-task AUC without the query table's tasks?)")
    top = max(r[key] for r in rows)
    near = [r for r in rows if r[key] >= top - depth_tolerance]
    return min(near, key=lambda r: (max(parse_block(b)[0] for b in r["blocks"]), -r[key]))


def candidate_blocks(cand: Candidate, cfg: TuneConfig) -> list[str]:
    if cand.blocks != "probe":
        return list(cand.blocks)
    if not cfg.probe_report:
        raise BadInput("a candidate uses blocks: probe, but probe_report is not set")
    return list(storage.read_json(cfg.probe_report)["selected"]["blocks"])


def minilm_block(data: RoutingData, queries: str | None) -> np.ndarray:
    """``(n, 384)`` MiniLM embeddings of the rows' prompts as the semantic baselines embed them
    (:func:`training.semantic_text.semantic_texts` with the default settings; shared prefixes
    learned from the train rows)."""
    from training.embedder import MiniLMEmbedder
    from training.semantic_text import semantic_texts_for

    if not queries:
        raise BadInput("minilm needs the query table: set queries=<path to queries.parquet>")
    texts, _ = semantic_texts_for(queries, list(data.query_ids), np.asarray(data.split) == "train")
    return MiniLMEmbedder()(texts)


def plot_tune(rows: list[dict[str, Any]], targets: list[str], path: Path) -> None:
    """Horizontal bars: mean CV AUC per candidate, with each target's AUC as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [r["label"] for r in rows]
    ax.barh(labels, [r["mean_auc"] for r in rows], color="#9ab")
    for name in targets:
        ax.plot([r["auc"][name] for r in rows], labels, "o", ms=4, label=name)
    low = min(min(r["auc"].values()) for r in rows)
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel(f"cross-validated AUC on train + val (bar: mean over {len(targets)} targets)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def tune_jobs(cfg: TuneConfig, data: RoutingData) -> tuple[list[tuple], dict[str, np.ndarray]]:
    """``(jobs, blocks)``: one ``(label, block names, n_components, objective)`` per candidate (and
    MiniLM when asked, with the trunk's objective), and every block they read, by name."""
    def label(names: list[str], k: int, obj: ObjectiveConfig) -> str:
        return f"{'+'.join(names)} / {k}" + ("" if obj.kind == "bce" else f" / {obj.label()}")

    jobs = []
    for c in cfg.candidates:
        names, obj = candidate_blocks(c, cfg), c.objective or cfg.trunk.objective
        jobs.append((label(names, c.n_components, obj), names, c.n_components, obj))
    blocks = dict(data.blocks)
    if cfg.minilm:
        blocks[MINILM] = minilm_block(data, cfg.queries)
        jobs.append((f"{MINILM} / {cfg.minilm_components} (semantic)", [MINILM], cfg.minilm_components,
                     cfg.trunk.objective))
    missing = sorted({b for _, names, _, _ in jobs for b in names if not is_attn(b)} - set(blocks))
    if missing:
        raise BadInput(f"unknown blocks {missing}; the activations have {sorted(data.blocks)}")
    return jobs, blocks


def token_blocks(cfg: TuneConfig, data: RoutingData, jobs: list[tuple]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{attn block: (states (n, W, D), mask (n, W))}`` for the rows of ``data``, for every attn block a job
    names (:func:`training.token_states.read_token_windows`; the capture must have kept that layer's tokens)."""
    from shared.features import parse_block
    from training.token_states import read_token_windows

    names = sorted({b for _, job_blocks, _, _ in jobs for b in job_blocks if is_attn(b)})
    return {b: read_token_windows(cfg.activations, parse_block(b)[0], cfg.pool.window, list(data.query_ids))[1:]
            for b in names}


def tune_weights(cfg: TuneConfig, data: RoutingData) -> np.ndarray | None:
    """``(n, T)`` loss weights of ``cfg.propensity_weighting`` (None: none); refused without propensities."""
    from training.loop import propensity_weights

    if cfg.propensity_weighting != "none" and not data.logged:
        raise BadInput(f"propensity_weighting={cfg.propensity_weighting}, but the labels carry no propensities "
                       "(not a decision-log import); set propensity_weighting=none")
    return propensity_weights(data.Y, data.propensity, cfg.propensity_weighting, cfg.propensity_clip)


def run_tune(cfg: TuneConfig, data: RoutingData | None = None) -> dict[str, Any]:
    """Score every candidate (and MiniLM when asked); write ``tune.json`` and ``tune.png``."""
    from shared.progress import Progress

    data = choice_rows(cfg, data, "tuning chooses the configuration: it")
    if len(data.query_ids) < cfg.folds:
        raise BadInput(f"{len(data.query_ids)} rows in splits {cfg.splits}: fewer than folds={cfg.folds}")
    groups, tasks = fold_groups(data, cfg.queries), row_tasks(data, cfg.queries)
    if cfg.choose_by == "mean_within_task_auc" and tasks is None:
        raise BadInput("choose_by: mean_within_task_auc needs the query table's tasks (queries=..., two tasks "
                       "or more)")
    jobs, blocks = tune_jobs(cfg, data)
    tokens = token_blocks(cfg, data, jobs)
    weights = tune_weights(cfg, data)
    rows = []
    with Progress(len(jobs), "tune: cross-validating", "candidates") as progress:
        for label, names, k, obj in jobs:
            trunk = cfg.trunk.model_copy(update={"objective": obj})
            attn = {b: tokens[b] for b in names if is_attn(b)}
            scores = cv_scores({b: blocks[b] for b in names if not is_attn(b)}, data.Y, groups, k, trunk, cfg.folds,
                               cfg.seeds, cfg.early_stop_share, cfg.seed, tasks, attn or None, cfg.pool, weights)
            rows.append({"label": label, "blocks": names, "n_components": k, "objective": obj.model_dump(),
                         **score_row(scores, data.targets)})
            progress.update(1, detail=f"{label}: mean AUC {rows[-1]['mean_auc']:.4f}, "
                                      f"pairwise AUC {rows[-1]['pairwise_auc']:.4f}")
    best = choose_candidate(rows, cfg.depth_tolerance, cfg.choose_by)
    out = {"config": cfg.model_dump(mode="json"), "n_rows": int(len(data.query_ids)), "candidates": rows,
           "best": best}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    storage.write_json(str(Path(cfg.out) / "tune.json"), out)
    plot_tune(rows, data.targets, Path(cfg.out) / "tune.png")
    console.print(tune_table(rows))
    console.print(f"chosen by {cfg.choose_by} (depth tolerance {cfg.depth_tolerance}): {best['label']} "
                  f"({cfg.choose_by} {best[cfg.choose_by]:.4f}); report in {cfg.out}/tune.json")
    return out


def tune_table(rows: Sequence[dict[str, Any]]):
    """Per candidate: mean CV AUC, pairwise and mean within-task AUC (where scored), mean Brier and
    log-loss, and each target's AUC."""
    from rich.table import Table

    view = Table(title="cross-validated scores (train + val; soft labels as they are)")
    view.add_column("candidate")
    within = any("mean_within_task_auc" in r for r in rows)
    for col in ("mean AUC", "pairwise AUC", *(["within-task AUC"] if within else []), "Brier", "log-loss"):
        view.add_column(col, justify="right")
    for t in rows[0]["auc"]:
        view.add_column(t, justify="right")
    for r in rows:
        view.add_row(r["label"], f"{r['mean_auc']:.4f}", f"{r['pairwise_auc']:.4f}",
                     *([f"{r.get('mean_within_task_auc', float('nan')):.4f}"] if within else []),
                     f"{r['mean_brier']:.4f}", f"{r['mean_log_loss']:.4f}", *(f"{a:.4f}" for a in r["auc"].values()))
    return view


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router tune", argv, config_command(
        TuneConfig, run_tune, "Compare block sets and PCA sizes by cross-validated AUC on train + val."))
