"""Scoring for ``prefill-router evaluate`` (:mod:`training.evaluate.run` loads the inputs).

Every router is fitted on **train** (tuned / early-stopped on **val**), its operating point
(a ``shared.policy.Policy``: tolerance, value or any registered policy) chosen on **val**, and scored on
**test**: on the whole split, on the queries where the targets disagree
(``metrics.disagreement_mask``), and per task of the test split (each subset with its own
references: best single model, oracle, most expensive target).

Costs: the policy decides with the price model known before answering
(``Router.costs``: encoder prompt tokens x input price + the target's median answer
length x output price); outcomes are scored with the measured per-query label ``cost``
(a missing label's cell falls back to the price model).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from shared.errors import BadInput
from shared.policy import Policy, policy_names
from shared.routing import cost_matrix
from training.evaluate import report_metrics as R
from training.evaluate import routing_metrics as M
from training.evaluate.baselines import RouterModel
from training.evaluate.pairwise import pairwise_scores
from training.evaluate.policy_scoring import candidate_points, headline, policy_points
from training.evaluate.task_scoring import add_task_averaged, task_interval
from training.metrics import brier, masked_auc
from training.dataset import RoutingData

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PAPER_SAVINGS = 0.7431  # arXiv 2603.20895: 45.58% gap closed at 74.31% cost savings


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


# ----------------------------------------------------------------------------- scoring
def point_metrics(costs, accs, refs: dict[str, Any], savings_threshold: float) -> dict[str, float]:
    """The report metrics of operating points ``(k,)`` (:mod:`training.evaluate.report_metrics`):
    iso-accuracy savings vs the best single model, best gap closed at >= the savings threshold
    vs the most expensive model."""
    best, dear, oracle = refs["best_single"], refs["most_expensive"], refs["oracle"]
    return {"iso_accuracy_savings": R.iso_accuracy_savings(costs, accs, best["accuracy"], best["cost"]),
            "best_gap_closed_at_savings": R.best_gap_at_savings(costs, accs, best["accuracy"], oracle["accuracy"],
                                                                dear["cost"], savings_threshold)}


def references(Y: np.ndarray, C: np.ndarray, targets: list[str],
               savings_threshold: float = PAPER_SAVINGS) -> dict[str, Any]:
    """Single models, best single, oracle, most expensive target and the zero-router hull."""
    accs, costs = M.single_model_points(Y, C)
    best, best_acc, best_cost = M.best_single(Y, C)
    cheap, dear = int(np.argmin(costs)), int(np.argmax(costs))
    oracle_acc, oracle_cost = M.oracle_outcome(Y, C)
    hc, ha = M.single_model_hull(costs, accs)
    refs = {
        "n": int(Y.shape[0]),
        "n_all_labelled": int((~np.isnan(Y)).all(axis=1).sum()),
        "single": {t: {"accuracy": float(a), "cost": float(c)} for t, a, c in zip(targets, accs, costs)},
        "best_single": {"target": targets[best], "accuracy": best_acc, "cost": best_cost},
        "cheapest": {"target": targets[cheap], "accuracy": float(accs[cheap]), "cost": float(costs[cheap])},
        "most_expensive": {"target": targets[dear], "accuracy": float(accs[dear]), "cost": float(costs[dear])},
        "oracle": {"accuracy": oracle_acc, "cost": oracle_cost,
                   "cost_savings": M.cost_savings(oracle_cost, float(costs[dear]))},
        "hull": {"cost": hc.tolist(), "accuracy": ha.tolist()},
        "zero_router_pauccc": M.hull_pauccc(costs, accs),
        "zero_router_gap_at_savings": R.hull_gap_at_savings(hc, ha, best_acc, oracle_acc, float(costs[dear]),
                                                            savings_threshold),
        "equal_costs": M.equal_costs(cost_matrix(C, len(Y))),
    }
    for row in [*refs["single"].values(), refs["oracle"]]:
        row.update(point_metrics([row["cost"]], [row["accuracy"]], refs, savings_threshold))
    return refs


def _pauccc(costs, accs, refs, interpolation: str) -> float:
    return M.pauccc(costs, accs, refs["cheapest"]["cost"], refs["most_expensive"]["cost"],
                    refs["cheapest"]["accuracy"], interpolation)


def score_probabilistic(P, Y, C_route, C, rule: Policy, refs: dict, targets: list[str], cfg) -> dict:
    """Operating point (``rule``), whole sweep of the first policy (tolerance), P-AUCCC, per-target
    AUC / Brier of predictions ``P``, and every other registered policy's frontier under
    ``<name>_policy`` (``cfg``: ``pauccc_interpolation``, ``savings_threshold``)."""
    first, *others = policy_names()
    sweep = Policy.named(first).sweep(P, Y, C, C_route)
    acc, cost = M.routing_outcome(Y, C, rule.route(P, C_route))
    auc, br = masked_auc(Y, P), brier(Y, P)
    with np.errstate(invalid="ignore"):
        mean_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
        mean_brier = float(np.nanmean(br)) if np.isfinite(br).any() else float("nan")
    return {
        "kind": "probabilistic", "policy": rule.name, "param": rule.param, **headline(acc, cost, refs),
        **frontier_metrics(sweep.cost, sweep.accuracy, refs, cfg),
        "cost_savings_at_best_single_accuracy": R.iso_accuracy_savings(  # vs the most expensive, not the best
            sweep.cost, sweep.accuracy, refs["best_single"]["accuracy"], refs["most_expensive"]["cost"], atol=0.0),
        "auc": dict(zip(targets, map(float, auc))), "brier": dict(zip(targets, map(float, br))),
        "mean_auc": mean_auc, "mean_brier": mean_brier,
        **{f"{name}_policy": policy_metrics(name, P, Y, C_route, C, refs, cfg) for name in others},
        "sweep": {k: np.asarray(v).tolist() for k, v in zip((first, "accuracy", "cost"), sweep)},
    }


def frontier_metrics(costs, accs, refs: dict, cfg) -> dict[str, float]:
    """Metrics of a policy's sweep points ``(k,)``: P-AUCCC, best gap closed along the sweep,
    iso-accuracy savings and best gap closed at >= the savings threshold."""
    gaps = [M.gap_closed(a, refs["best_single"]["accuracy"], refs["oracle"]["accuracy"]) for a in accs]
    return {"pauccc": _pauccc(costs, accs, refs, cfg.pauccc_interpolation),
            "max_gap_closed": float(np.nanmax(gaps)) if np.isfinite(gaps).any() else float("nan"),
            **point_metrics(costs, accs, refs, cfg.savings_threshold)}


def policy_metrics(name: str, P, Y, C_route, C, refs: dict, cfg) -> dict[str, Any]:
    """:func:`frontier_metrics` of predictions ``P`` under the policy ``name`` (e.g. the cost-aware
    value policy, swept exactly by ``Policy.sweep``) instead of the tolerance policy, and the
    sweep's Pareto corners (``frontier``: cost and accuracy, for the plot). Same predictions,
    other policy."""
    _, accuracy, cost = Policy.named(name).sweep(P, Y, C, C_route)
    front = M.pareto_front(cost, accuracy)
    return {**frontier_metrics(cost, accuracy, refs, cfg),
            "frontier": {"cost": front[0].tolist(), "accuracy": front[1].tolist()}}


def score_fixed(W, Y, C, refs: dict, cfg) -> dict:
    """One (cost, accuracy) point: the expected outcome of choice weights ``W``."""
    acc, cost = M.expected_outcome(Y, C, W)
    return {"kind": "fixed", **headline(acc, cost, refs),
            "pauccc": _pauccc([cost], [acc], refs, cfg.pauccc_interpolation),
            **point_metrics([cost], [acc], refs, cfg.savings_threshold)}


def op_rule(op: dict[str, Any]) -> Policy:
    """The :class:`shared.policy.Policy` of a :func:`choose_operating_point` result."""
    return Policy.of(op["policy"], op[op["policy"]])


def _calibrate(policy: str, P, val: RoutingData, C_route, C, op, target_acc) -> dict[str, Any]:
    """One policy's point on the val sweep (``metrics.calibrate_operating_point``); an
    unreachable target falls back to the nearest point (the cheapest, or the most accurate)."""
    sweep = Policy.named(policy).sweep(P, val.Y, C, C_route)
    try:
        param, status = M.calibrate_operating_point(sweep, op.target_cost, target_acc), "calibrated"
    except ValueError as exc:
        acc = np.nan_to_num(sweep.accuracy, nan=-np.inf)
        k = 0 if op.target_cost is not None else int(np.lexsort((sweep.cost, -acc))[0])
        param, status = float(sweep[0][k]), "fallback"
        log.warning("operating point (%s policy): %s; using the nearest point (%.4g)", policy, exc, param)
    acc, cost = M.routing_outcome(val.Y, C, Policy.of(policy, param).route(P, C_route))
    return {"policy": policy, "param": float(param), "status": status, "val_accuracy": acc, "val_cost": cost}


def _preference(cand: dict[str, Any], by_accuracy: bool) -> tuple:
    """Sort key among calibrated points: reaching an accuracy, the cheaper; within a budget,
    the more accurate. Among fallbacks the other way round (nearest to the target)."""
    ok = cand["status"] == "calibrated"
    acc, cost = -np.nan_to_num(cand["val_accuracy"], nan=-np.inf), cand["val_cost"]
    return (not ok, *((cost, acc) if by_accuracy == ok else (acc, cost)))


def choose_operating_point(P, val: RoutingData | None, C_route, C, op, default: Policy) -> dict[str, Any]:
    """The operating point on val: each policy of ``op.policy`` ('auto': every registered one)
    calibrated to the target (:func:`_calibrate`), the best kept (:func:`_preference`; ties:
    tolerance) with every candidate under ``candidates``. No target: ``default`` (status
    'default'); no val rows: ``default`` with a ``note``. Returns policy, each policy's parameter
    (None but the chosen one's: ``Policy.fields``), status, targets, val accuracy / cost."""
    target_acc = op.target_accuracy
    wanted = op.target_cost is not None or target_acc is not None
    out = {"target_cost": op.target_cost, "target_accuracy": target_acc if isinstance(target_acc, float) else None}
    if val is None or not len(val.query_ids):
        note = "no val rows: the artifact's default rule" + (" (the configured target is not calibrated)"
                                                              if wanted else "")
        return {**default.fields(), "status": "default", **out, "val_accuracy": None, "val_cost": None,
                "note": note}
    if not wanted:
        acc, cost = M.routing_outcome(val.Y, C, default.route(P, C_route))
        return {**default.fields(), "status": "default", **out, "val_accuracy": acc, "val_cost": cost}
    if target_acc == "best_single":
        target_acc = M.best_single(val.Y, C)[1]
    policies = policy_names() if op.policy == "auto" else (op.policy,)
    cands = [_calibrate(p, P, val, C_route, C, op, target_acc) for p in policies]
    best = min(cands, key=lambda c: _preference(c, target_acc is not None))
    return {**Policy.of(best["policy"], best["param"]).fields(), "status": best["status"], **out,
            "target_accuracy": None if target_acc is None else float(target_acc),
            "val_accuracy": best["val_accuracy"], "val_cost": best["val_cost"], "candidates": cands}


# -------------------------------------------------------------------------- evaluation
def _fit_predict(model: RouterModel, parts: dict[str, tuple[RoutingData, list[str]]]) -> dict[str, np.ndarray]:
    """Fit on train (val for tuning); predictions (or choice weights) on val and test."""
    tr, tr_text = parts.get("train", (None, None))
    va, va_text = parts.get("val", (None, None))
    if tr is not None:
        model.fit(tr, tr_text, va, va_text)
    predict = model.predict_proba if model.probabilistic else model.choice_weights
    return {split: predict(*parts[split]) for split in ("val", "test") if split in parts}


def fit_all(models: Sequence[RouterModel], parts: dict) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {"val": (n_val, T), "test": (n_test, T)}}`` predictions, with progress (a bar on a
    terminal, a log line per router in a log or a pipe)."""
    from shared.progress import Progress

    preds = {}
    with Progress(len(models), "evaluate: fitting routers", "routers") as progress:
        for model in models:
            preds[model.name] = _fit_predict(model, parts)
            progress.update(1, detail=model.name)
    return preds


def score_subset(models, preds, operating, m: np.ndarray, test: dict[str, np.ndarray], targets: list[str],
                 cfg, detail: bool = True) -> dict[str, Any]:
    """``{"references", "routers"}`` on the test rows ``m`` (``(n_test,)`` bool). ``test``:
    the test split's ``Y``, ``C`` (outcome) and ``C_route`` (decision) arrays and ``task`` (None:
    no task-averaged accuracy); ``detail=False`` drops each router's sweeps (tolerance points, other
    policies' fronts), operating point and task-averaged accuracy (the per-task rows)."""
    Y, C, Cr = test["Y"][m], test["C"][m], test["C_route"][m]
    refs = references(Y, C, targets, cfg.savings_threshold)
    rows, choices = {}, {}
    for model in models:
        P = preds[model.name]["test"][m]
        choices[model.name] = op_rule(operating[model.name]).route(P, Cr) if model.probabilistic else P
        if model.probabilistic:
            row = score_probabilistic(P, Y, Cr, C, op_rule(operating[model.name]), refs, targets, cfg)
            if detail:
                row["operating_point"] = operating[model.name]
                row["candidate_points"] = candidate_points(P, Y, Cr, C, operating[model.name], refs)
            else:
                row.pop("sweep")
                for name in policy_names()[1:]:
                    row[f"{name}_policy"].pop("frontier")
        else:
            row = score_fixed(P, Y, C, refs, cfg)
        rows[model.name] = row
    if detail and test.get("task") is not None:
        add_task_averaged(refs, rows, Y, test["task"][m], choices, targets)
    return {"references": refs, "routers": rows}


def evaluate_routers(artifact, models: Sequence[RouterModel], data: RoutingData, texts: Sequence[str], cfg,
                     tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Score the artifact router and ``models`` on test, on test's disagreement rows and per
    task of the test split (``tasks``: ``(n,)`` per row of ``data``; None: no per-task rows).
    Train / val may be empty when ``models`` need none (a foreign artifact on a fresh table)."""
    C_route = decision_costs(artifact.router, data)
    C = outcome_costs(data, C_route)
    texts = np.asarray(list(texts), dtype=object)
    masks = {s: data.split == s for s in SPLITS}
    if not masks["test"].any():
        raise BadInput("evaluation needs rows in the test split")
    parts = {s: (data.subset(m), list(texts[m])) for s, m in masks.items() if m.any()}
    models = [artifact, *models]
    preds = fit_all(models, parts)
    val = parts.get("val", (None,))[0]
    Cv, Crv = C[masks["val"]], C_route[masks["val"]]
    default = artifact.router.meta.policy.rule()
    operating = {m.name: choose_operating_point(preds[m.name].get("val"), val, Crv, Cv, cfg.operating_point, default)
                 for m in models if m.probabilistic}
    Yte = parts["test"][0].Y
    test_tasks = None if tasks is None else np.asarray(tasks, dtype=object)[masks["test"]]
    test = {"Y": Yte, "C": C[masks["test"]], "C_route": C_route[masks["test"]], "task": test_tasks}
    dis = M.disagreement_mask(Yte)
    subsets = {"test": np.ones(len(Yte), bool)} | ({"disagreement": dis} if dis.any() and not data.logged else {})
    out = {k: score_subset(models, preds, operating, m, test, data.targets, cfg) for k, m in subsets.items()}
    by_task = {}
    if tasks is not None:
        for name, tm in R.group_masks(np.asarray(tasks, dtype=object)[masks["test"]]).items():
            by_task[name] = {k: score_subset(models, preds, operating, tm & m, test, data.targets, cfg, detail=False)
                             for k, m in subsets.items() if (tm & m).any()}
    test_proba = {m.name: preds[m.name]["test"] for m in models if m.probabilistic}
    n = {s: int(m.sum()) for s, m in masks.items()} | {"test_disagreement": int(dis.sum())}
    best = out["test"]["references"]["best_single"]["target"]
    return {"targets": list(data.targets), "n": n, "disagreement_share": M.disagreement_share(Yte),
            "operating_point": operating[artifact.name], "subsets": out, "by_task": by_task,
            "savings_threshold": cfg.savings_threshold,
            "policy_operating_points": policy_points(models, preds, val, Cv, Crv, test, out["test"]["references"]),
            **intervals(models, preds, operating, test, parts["test"][0], out["test"]["references"], cfg),
            "auc_margin": auc_margins(Yte, test_proba, artifact.name, cfg.bootstrap),
            **within_task(Yte, test_proba, artifact.name, cfg.bootstrap, test_tasks, data.targets),
            **pairwise_scores(Yte, test_proba | task_scores(models, parts["test"][0]), artifact.name, cfg.bootstrap,
                              test_tasks),
            "headroom_by_task": task_headroom(models, parts["test"][0], best)}


def intervals(models: Sequence[RouterModel], preds: dict, operating: dict, test: dict[str, np.ndarray],
              test_data: RoutingData, refs: dict[str, Any], cfg) -> dict[str, Any]:
    """The artifact's operating point on test with bootstrap intervals (pooled and task-averaged); on labels
    from a decision log (``test_data.logged``) instead every router's off-policy estimates
    (:func:`training.evaluate.off_policy_eval.score_off_policy`), the replay intervals skipped."""
    ours = models[0].name
    P = preds[ours]["test"]
    if not test_data.logged:
        return {"operating_point_interval": point_interval(P, test, operating[ours], refs, test_data.targets,
                                                           cfg.bootstrap),
                "task_averaged_interval": task_interval(
                    op_rule(operating[ours]).route(P, test["C_route"]), test, refs,
                    preds.get("task-best", {}).get("test"), test_data.targets, cfg.bootstrap)}
    from training.evaluate.off_policy_eval import score_off_policy

    choices = {m.name: op_rule(operating[m.name]).route(preds[m.name]["test"], test["C_route"])
               if m.probabilistic else preds[m.name]["test"] for m in models}
    proba = {m.name: preds[m.name]["test"] for m in models if m.probabilistic}
    return {"operating_point_interval": None, "task_averaged_interval": None,
            "off_policy": score_off_policy(choices, proba, ours, test_data, test["C_route"],
                                           cfg.off_policy.max_weight, cfg.bootstrap)}


def task_scores(models: Sequence[RouterModel], test: RoutingData) -> dict[str, np.ndarray]:
    """``{"task-best": (n, T)}``: the task-aware reference's per-task mean scores on ``test`` as a scorer
    (:meth:`training.evaluate.baselines.TaskBestRouter.scores`), for the pairwise AUC; empty when it
    is not evaluated or its record holds no means."""
    from training.evaluate.baselines import TaskBestRouter

    ref = next((m for m in models if isinstance(m, TaskBestRouter)), None)
    scores = None if ref is None else ref.scores(test)
    return {} if scores is None else {ref.name: scores}


def task_headroom(models: Sequence[RouterModel], test: RoutingData, best: str) -> list[dict]:
    """Per task group of the fitted task-best reference (when evaluated): where the test
    headroom over the best single target ``best`` lies (:func:`training.evaluate.headroom.headroom_by_group`)."""
    from training.evaluate.baselines import TaskBestRouter
    from training.evaluate.headroom import headroom_by_group

    ref = next((m for m in models if isinstance(m, TaskBestRouter)), None)
    if ref is None:
        return []
    return headroom_by_group(test.Y, ref.groups(test), test.targets.index(best), test.targets)


def point_interval(P: np.ndarray, test: dict[str, np.ndarray], op: dict[str, Any], refs: dict[str, Any],
                   targets: list[str], n_boot: int) -> dict[str, list[float]] | None:
    """The artifact's operating point on test with bootstrap intervals (accuracy, its difference from the
    best single target, cost savings vs the most expensive; :func:`training.evaluate.uncertainty.bootstrap_operating_point`):
    what a held-out check of the router should land inside. None when ``n_boot`` is 0."""
    from training.evaluate.uncertainty import bootstrap_operating_point

    if n_boot == 0:
        return None
    choice = op_rule(op).route(P, test["C_route"])
    return bootstrap_operating_point(test["Y"], test["C"], choice, targets.index(refs["best_single"]["target"]),
                                     targets.index(refs["most_expensive"]["target"]), n_boot=n_boot)


def auc_margins(Y: np.ndarray, proba: dict[str, np.ndarray], ours: str, n_boot: int,
                groups: np.ndarray | None = None) -> dict[str, dict]:
    """Per probabilistic baseline: our mean-AUC margin over it on test, with a paired
    bootstrap 95% interval (:func:`training.evaluate.uncertainty.paired_bootstrap_auc_margin`;
    within each of ``groups``, stratified, when given)."""
    from training.evaluate.uncertainty import paired_bootstrap_auc_margin

    if n_boot == 0:
        return {}
    return {name: paired_bootstrap_auc_margin(Y, proba[ours], P, n_boot=n_boot, groups=groups)
            for name, P in proba.items() if name != ours}


def within_task(Y: np.ndarray, proba: dict[str, np.ndarray], ours: str, n_boot: int,
                tasks: np.ndarray | None, targets: Sequence[str]) -> dict[str, Any]:
    """Each probabilistic router's AUC ranked inside each task only
    (:func:`training.metrics.within_group_auc`) and our margin on it:
    ``{"within_task_auc": {router: {"mean_auc", "auc": {target: AUC}}}, "auc_margin_within_task":
    {baseline: margin}}``. Empty without task labels or with one task (that is the pooled AUC)."""
    from training.metrics import within_group_auc

    if tasks is None or len(set(tasks)) < 2:
        return {}
    aucs = {name: within_group_auc(Y, P, tasks) for name, P in proba.items()}
    with np.errstate(invalid="ignore"):
        table = {name: {"mean_auc": float(np.nanmean(a)), "auc": dict(zip(targets, map(float, a)))}
                 for name, a in aucs.items()}
    return {"within_task_auc": table, "auc_margin_within_task": auc_margins(Y, proba, ours, n_boot, tasks)}
