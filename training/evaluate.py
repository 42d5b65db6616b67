"""``prefill-router evaluate``: the router artifact against oracle, single models and baselines.

Every router (:mod:`training.baselines`) is fitted on **train**, tuned / early-stopped on
**val**, and scored on the held-out **test** split, then again on the test queries where
the targets disagree (``metrics.disagreement_mask``). The operating point (tolerance) is
calibrated on **val** from a target mean cost or accuracy, or is the artifact's default;
a calibrated point is written back into the artifact (``shared.artifact.update_policy``).

Costs: the policy decides with the price model known before answering
(``Router.costs``: encoder prompt tokens x input price + the target's median answer
length x output price); outcomes are scored with the measured per-query label ``cost``
(a missing label's cell falls back to the price model).

Outputs under ``out``: ``report.json`` (every number), ``report.md`` and
``cost_accuracy.png`` (:mod:`training.eval_report`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from shared.cli_utils import ConfigOption, Overrides, console, friendly_errors, run_app, setup_logging
from shared.config import StrictConfig
from shared.trunk import TrunkConfig
from training import metrics as M
from training.baselines import RouterModel
from training.dataset import RoutingData

log = logging.getLogger(__name__)

BASELINES = ("random", "always-cheapest", "always-best", "knn-minilm", "mlp-minilm", "mf-minilm")
REFERENCES = ("task-best",)  # told the query's task: opt-in references, not routers
SEMANTIC = ("knn-minilm", "mlp-minilm", "mf-minilm")


class OperatingPointConfig(StrictConfig):
    """How the tolerance is chosen on val; neither target: the artifact's default."""

    target_cost: float | None = Field(None, gt=0, description="Mean USD per query to stay within (best accuracy).")
    target_accuracy: float | Literal["best_single"] | None = Field(
        None, description="Accuracy to reach at the lowest cost; 'best_single': the best single model's val accuracy.")

    @model_validator(mode="after")
    def _one(self) -> "OperatingPointConfig":
        if self.target_cost is not None and self.target_accuracy is not None:
            raise ValueError("give at most one of target_cost and target_accuracy")
        return self


class EvalConfig(StrictConfig):
    """Config of ``prefill-router evaluate``."""

    artifact: str = Field(description="Router artifact directory written by `prefill-router fit`.")
    activations: str = Field(description="Activation dataset written by `prefill-router capture`.")
    labels: str = Field(description="Labels dataset written by `prefill-router label`.")
    queries: str | None = Field(None, description="Query table (Parquet) with the prompts; semantic baselines need it.")
    out: str = Field("runs/eval", description="Output directory: local path or s3:// URI.")
    routers: list[Literal[BASELINES + REFERENCES]] = Field(
        list(BASELINES), description="Baselines evaluated beside the artifact (task-best: opt-in reference).")
    operating_point: OperatingPointConfig = Field(default_factory=OperatingPointConfig,
                                                  description="Tolerance calibration on val.")
    write_operating_point: bool = Field(True, description="Write a calibrated operating point into the artifact.")
    pauccc_interpolation: Literal["step", "linear"] = Field("linear", description="P-AUCCC curve between sweep points.")
    knn_ks: list[int] = Field([5, 10, 20, 40, 80], min_length=1, description="k values tried on val for kNN.")
    mlp_seeds: int = Field(3, gt=0, description="Seeds of the semantic MLP ensemble (all kept).")
    n_components: int = Field(128, gt=0, description="PCA components of the semantic MLP's embedding transform.")
    mf_dim: int = Field(64, gt=0, description="Latent size of the matrix-factorisation router.")
    bootstrap: int = Field(1000, ge=0, description="Paired bootstrap replicates of the AUC margin over each "
                           "probabilistic baseline on test (0: skip).")
    task_min_rows: int = Field(50, gt=0, description="task-best: a task with fewer train+val rows is pooled "
                               "into its source (e.g. MMLU subjects into mmlu).")
    trunk: TrunkConfig = Field(default_factory=TrunkConfig, description="Semantic MLP network and optimiser.")
    embedder: str | None = Field(None, description="Sentence-transformers model dir; default the packaged MiniLM.")


# ------------------------------------------------------------------------------ inputs
def query_texts(queries_uri: str, query_ids: Sequence[str]) -> list[str]:
    """The prompt text (message contents joined by blank lines) of each query id, in order."""
    from shared import storage

    table = storage.read_parquet(queries_uri, columns=["query_id", "messages"])
    text = {q: "\n\n".join(m["content"] for m in msgs)
            for q, msgs in zip(table.column("query_id").to_pylist(), table.column("messages").to_pylist())}
    missing = [q for q in query_ids if q not in text]
    if missing:
        raise ValueError(f"{len(missing)} query ids are not in {queries_uri} (e.g. {missing[:3]})")
    return [text[q] for q in query_ids]


def query_tasks(queries_uri: str) -> dict[str, tuple[str, str]]:
    """``{query_id: (source, task)}`` from the query table (the task-best reference)."""
    from shared import storage

    table = storage.read_parquet(queries_uri, columns=["query_id", "source", "task"])
    cols = [table.column(c).to_pylist() for c in ("query_id", "source", "task")]
    return {q: (s, t) for q, s, t in zip(*cols)}


def decision_costs(router, data: RoutingData) -> np.ndarray:
    """``(n, T)`` price-model costs the policy routes with: encoder prompt tokens (or, when
    absent, the mean of the targets' prompt tokens) through ``Router.costs``."""
    n = len(data.query_ids)
    if len(data.n_tokens) == n and n:
        return router.costs(np.asarray(data.n_tokens, dtype=np.float64))
    present = ~np.isnan(data.input_tokens)
    tokens = np.where(present, data.input_tokens, 0.0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return router.costs(tokens)


def outcome_costs(data: RoutingData, decided: np.ndarray) -> np.ndarray:
    """``(n, T)`` measured label costs; a missing cell takes the price model's cost."""
    return np.where(np.isnan(data.cost), decided, data.cost)


def _queries(cfg: EvalConfig, who: str) -> str:
    if not cfg.queries:
        raise ValueError(f"{who} needs the query table: set queries=<path to queries.parquet>")
    return cfg.queries


def build_routers(cfg: EvalConfig, embedder=None) -> list[RouterModel]:
    """The configured baselines (semantic ones share one embedder, so texts embed once)."""
    from training import baselines as B

    if any(r in SEMANTIC for r in cfg.routers) and embedder is None:
        embedder = B.MiniLMEmbedder(cfg.embedder)
    make = {
        "random": lambda: B.RandomRouter(),
        "always-cheapest": lambda: B.AlwaysCheapest(),
        "always-best": lambda: B.AlwaysBest(),
        "knn-minilm": lambda: B.KNNRouter(embedder, cfg.knn_ks),
        "mlp-minilm": lambda: B.MLPRouter(embedder, seeds=cfg.mlp_seeds, keep=cfg.mlp_seeds,
                                          n_components=cfg.n_components, trunk=cfg.trunk),
        "mf-minilm": lambda: B.MFRouter(embedder, dim=cfg.mf_dim),
        "task-best": lambda: B.TaskBestRouter(query_tasks(_queries(cfg, "task-best")), cfg.task_min_rows),
    }
    return [make[name]() for name in cfg.routers]


# ----------------------------------------------------------------------------- scoring
def references(Y: np.ndarray, C: np.ndarray, targets: list[str]) -> dict[str, Any]:
    """Single models, best single, oracle, most expensive target and the zero-router hull."""
    accs, costs = M.single_model_points(Y, C)
    best, best_acc, best_cost = M.best_single(Y, C)
    cheap, dear = int(np.argmin(costs)), int(np.argmax(costs))
    oracle_acc, oracle_cost = M.oracle_outcome(Y, C)
    hc, ha = M.single_model_hull(costs, accs)
    return {
        "n": int(Y.shape[0]),
        "single": {t: {"accuracy": float(a), "cost": float(c)} for t, a, c in zip(targets, accs, costs)},
        "best_single": {"target": targets[best], "accuracy": best_acc, "cost": best_cost},
        "cheapest": {"target": targets[cheap], "accuracy": float(accs[cheap]), "cost": float(costs[cheap])},
        "most_expensive": {"target": targets[dear], "accuracy": float(accs[dear]), "cost": float(costs[dear])},
        "oracle": {"accuracy": oracle_acc, "cost": oracle_cost,
                   "cost_savings": M.cost_savings(oracle_cost, float(costs[dear]))},
        "hull": {"cost": hc.tolist(), "accuracy": ha.tolist()},
        "zero_router_pauccc": M.hull_pauccc(costs, accs),
    }


def headline(acc: float, cost: float, refs: dict[str, Any]) -> dict[str, float]:
    """Accuracy, cost, gap closed and cost savings of one operating point."""
    return {"accuracy": acc, "cost": cost,
            "gap_closed": M.gap_closed(acc, refs["best_single"]["accuracy"], refs["oracle"]["accuracy"]),
            "cost_savings": M.cost_savings(cost, refs["most_expensive"]["cost"])}


def _pauccc(costs, accs, refs, interpolation: str) -> float:
    return M.pauccc(costs, accs, refs["cheapest"]["cost"], refs["most_expensive"]["cost"],
                    refs["cheapest"]["accuracy"], interpolation)


def score_probabilistic(P, Y, C_route, C, tol: float, refs: dict, targets: list[str], interpolation: str) -> dict:
    """Operating point, whole sweep, P-AUCCC, per-target AUC / Brier of predictions ``P``."""
    sweep = M.tolerance_sweep(P, Y, C, C_route)
    acc, cost = M.routing_outcome(Y, C, M.route_with_tolerance(P, C_route, tol))
    auc, br = M.masked_auc(Y, P), M.brier(Y, P)
    gaps = [M.gap_closed(a, refs["best_single"]["accuracy"], refs["oracle"]["accuracy"]) for a in sweep.accuracy]
    at_best = sweep.cost[np.nan_to_num(sweep.accuracy, nan=-1) >= refs["best_single"]["accuracy"]]
    with np.errstate(invalid="ignore"):
        mean_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
    return {
        "kind": "probabilistic", "tolerance": tol, **headline(acc, cost, refs),
        "pauccc": _pauccc(sweep.cost, sweep.accuracy, refs, interpolation),
        "max_gap_closed": float(np.nanmax(gaps)) if np.isfinite(gaps).any() else float("nan"),
        "cost_savings_at_best_single_accuracy": (M.cost_savings(float(at_best.min()), refs["most_expensive"]["cost"])
                                                 if len(at_best) else float("nan")),
        "auc": dict(zip(targets, map(float, auc))), "brier": dict(zip(targets, map(float, br))),
        "mean_auc": mean_auc, "mean_brier": float(np.nanmean(br)),
        "sweep": {k: getattr(sweep, k).tolist() for k in ("tolerance", "accuracy", "cost")},
    }


def score_fixed(W, Y, C, refs: dict, interpolation: str) -> dict:
    """One (cost, accuracy) point: the expected outcome of choice weights ``W``."""
    acc, cost = M.expected_outcome(Y, C, W)
    return {"kind": "fixed", **headline(acc, cost, refs), "pauccc": _pauccc([cost], [acc], refs, interpolation)}


def choose_tolerance(P, val: RoutingData, C_route, C, op: OperatingPointConfig, default: float) -> dict[str, Any]:
    """Tolerance from the val sweep (``metrics.calibrate_operating_point``). An unreachable
    target falls back to the nearest point (the cheapest, or the most accurate) and is
    marked ``status='fallback'``. Returns tolerance, status and val accuracy / cost."""
    status, target_acc = "default", op.target_accuracy
    tol = default
    if op.target_cost is not None or target_acc is not None:
        if target_acc == "best_single":
            target_acc = M.best_single(val.Y, C)[1]
        sweep = M.tolerance_sweep(P, val.Y, C, C_route)
        try:
            tol, status = M.calibrate_operating_point(sweep, op.target_cost, target_acc), "calibrated"
        except ValueError as exc:
            acc = np.nan_to_num(sweep.accuracy, nan=-np.inf)
            k = 0 if op.target_cost is not None else int(np.lexsort((sweep.cost, -acc))[0])
            tol, status = float(sweep.tolerance[k]), "fallback"
            log.warning("operating point: %s; using the nearest point (tolerance %.4g)", exc, tol)
    acc, cost = M.routing_outcome(val.Y, C, M.route_with_tolerance(P, C_route, tol))
    return {"tolerance": float(tol), "status": status, "target_cost": op.target_cost,
            "target_accuracy": None if target_acc is None else float(target_acc), "val_accuracy": acc, "val_cost": cost}


# -------------------------------------------------------------------------- evaluation
def _fit_predict(model: RouterModel, parts: dict[str, tuple[RoutingData, list[str]]]) -> dict[str, np.ndarray]:
    """Fit on train (val for tuning); predictions (or choice weights) on val and test."""
    (tr, tr_text), (va, va_text) = parts["train"], parts["val"]
    model.fit(tr, tr_text, va, va_text)
    predict = model.predict_proba if model.probabilistic else model.choice_weights
    return {split: predict(*parts[split]) for split in ("val", "test")}


def evaluate_routers(artifact, models: Sequence[RouterModel], data: RoutingData, texts: Sequence[str],
                     cfg: EvalConfig) -> dict[str, Any]:
    """Score the artifact router and ``models`` on test and on test's disagreement rows."""
    from rich.progress import Progress

    C_route = decision_costs(artifact.router, data)
    C = outcome_costs(data, C_route)
    texts = np.asarray(list(texts), dtype=object)
    masks = {s: data.split == s for s in ("train", "val", "test")}
    for s, m in masks.items():
        if not m.any():
            raise ValueError(f"evaluation needs rows in the {s} split")
    parts = {s: (data.subset(m), list(texts[m])) for s, m in masks.items()}
    Yte, dis = parts["test"][0].Y, M.disagreement_mask(parts["test"][0].Y)
    subsets = {"test": np.ones(len(Yte), bool)} | ({"disagreement": dis} if dis.any() else {})
    refs = {k: references(Yte[m], C[masks["test"]][m], data.targets) for k, m in subsets.items()}
    out = {k: {"references": refs[k], "routers": {}} for k in subsets}
    default_tol = artifact.router.meta.policy.default_tolerance()
    operating, test_proba = {}, {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("routers", total=len(models) + 1)
        for model in [artifact, *models]:
            progress.update(task, description=f"fitting {model.name}")
            pred = _fit_predict(model, parts)
            if model.probabilistic:
                test_proba[model.name] = pred["test"]
            for key, m in subsets.items():
                Cte, Crte = C[masks["test"]][m], C_route[masks["test"]][m]
                if model.probabilistic:
                    if model.name not in operating:
                        operating[model.name] = choose_tolerance(pred["val"], parts["val"][0], C_route[masks["val"]],
                                                                 C[masks["val"]], cfg.operating_point, default_tol)
                    row = score_probabilistic(pred["test"][m], Yte[m], Crte, Cte, operating[model.name]["tolerance"],
                                              refs[key], data.targets, cfg.pauccc_interpolation)
                    row["operating_point"] = operating[model.name]
                else:
                    row = score_fixed(pred["test"][m], Yte[m], Cte, refs[key], cfg.pauccc_interpolation)
                out[key]["routers"][model.name] = row
            progress.advance(task)
    n = {s: int(m.sum()) for s, m in masks.items()} | {"test_disagreement": int(dis.sum())}
    return {"targets": list(data.targets), "n": n, "disagreement_share": M.disagreement_share(Yte),
            "operating_point": operating[artifact.name], "subsets": out,
            "auc_margin": auc_margins(Yte, test_proba, artifact.name, cfg.bootstrap),
            "headroom_by_task": task_headroom(models, parts["test"][0], refs["test"]["best_single"]["target"])}


def task_headroom(models: Sequence[RouterModel], test: RoutingData, best: str) -> list[dict]:
    """Per task group of the fitted task-best reference (when evaluated): where the test
    headroom over the best single target ``best`` lies (:func:`training.headroom.headroom_by_group`)."""
    from training.baselines import TaskBestRouter
    from training.headroom import headroom_by_group

    ref = next((m for m in models if isinstance(m, TaskBestRouter)), None)
    if ref is None:
        return []
    return headroom_by_group(test.Y, ref.groups(test), test.targets.index(best), test.targets)


def auc_margins(Y: np.ndarray, proba: dict[str, np.ndarray], ours: str, n_boot: int) -> dict[str, dict]:
    """Per probabilistic baseline: our mean-AUC margin over it on test, with a paired
    bootstrap 95% interval (:func:`training.uncertainty.paired_bootstrap_auc_margin`)."""
    from training.uncertainty import paired_bootstrap_auc_margin

    if n_boot == 0:
        return {}
    return {name: paired_bootstrap_auc_margin(Y, proba[ours], P, n_boot=n_boot)
            for name, P in proba.items() if name != ours}


def run_evaluation(cfg: EvalConfig, data: RoutingData | None = None, texts: Sequence[str] | None = None,
                   embedder=None) -> dict[str, Any]:
    """Load everything, evaluate, write the operating point and the report; returns the report."""
    from shared.artifact import OperatingPoint, update_policy
    from training.baselines import ArtifactRouter
    from training.dataset import load_routing_data
    from training.eval_report import summary_table, write_outputs

    artifact = ArtifactRouter.load(cfg.artifact)
    targets = artifact.router.target_names
    if data is None:
        data = load_routing_data(cfg.activations, cfg.labels, targets, blocks=list(artifact.columns().values()))
    if list(data.targets) != targets:
        raise ValueError(f"data targets {data.targets} differ from the artifact's {targets}")
    if texts is None:
        needs_text = any(r in SEMANTIC for r in cfg.routers)
        texts = query_texts(_queries(cfg, "semantic baselines"), data.query_ids) if needs_text \
            else [""] * len(data.query_ids)
    report = evaluate_routers(artifact, build_routers(cfg, embedder), data, texts, cfg)
    op = report["operating_point"]
    report["operating_point_written"] = bool(cfg.write_operating_point and op["status"] == "calibrated")
    if report["operating_point_written"]:
        point = OperatingPoint(**{k: op[k] for k in ("tolerance", "target_cost", "target_accuracy",
                                                     "val_accuracy", "val_cost")})
        policy = artifact.router.meta.policy.model_copy(update={"operating_point": point})
        update_policy(cfg.artifact, policy)
    report.update(artifact=cfg.artifact, config=cfg.model_dump(mode="json"))
    write_outputs(report, cfg.out)
    console.print(summary_table(report))
    console.print(f"report written to {cfg.out}/report.json, report.md, cost_accuracy.png")
    return report


def _evaluate_command(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Evaluate a router artifact against the oracle, single models and baselines."""
    from shared.config import load_config

    from shared.artifact import ArtifactError

    def run() -> dict[str, Any]:
        try:
            return run_evaluation(load_config(EvalConfig, config, overrides or []))
        except ArtifactError as exc:  # a user error (wrong path, corrupt artifact): one red line
            raise ValueError(str(exc)) from exc

    friendly_errors(run)


def main(argv: list[str] | None = None) -> int:
    import typer

    setup_logging()
    app = typer.Typer(add_completion=False)
    app.command()(_evaluate_command)
    return run_app(app, argv, "prefill-router evaluate")
