"""Operating points of ``prefill-router evaluate`` routed on test (:mod:`training.evaluate.scoring`
scores the routers): one point's headline numbers, each val-calibrated policy of the operating
point on a subset (``candidate_points``: the main table's row per policy), and each policy's
cheapest val point reaching the best single model's val accuracy (``policy_points``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.policy import Policy, policy_names
from training.dataset import RoutingData
from training.evaluate import routing_metrics as M


def headline(acc: float, cost: float, refs: dict[str, Any]) -> dict[str, float]:
    """Accuracy, cost, gap closed and cost savings of one operating point."""
    return {"accuracy": acc, "cost": cost,
            "gap_closed": M.gap_closed(acc, refs["best_single"]["accuracy"], refs["oracle"]["accuracy"]),
            "cost_savings": M.cost_savings(cost, refs["most_expensive"]["cost"])}


def policy_points(models, preds, val: RoutingData | None, Cv, Crv, test: dict[str, np.ndarray],
                  refs: dict[str, Any]) -> dict[str, dict]:
    """Per probabilistic router and registered policy: the cheapest val operating point
    that reaches the best single model's val accuracy (``calibrate_operating_point``), applied
    to the test rows (``test``: ``Y``, ``C``, ``C_route``): ``{"param", "accuracy", "cost",
    "savings_vs_best_single"}``, or None when no point reaches it on val. Empty without val."""
    if val is None or not len(val.query_ids):
        return {}
    target, best_cost = M.best_single(val.Y, Cv)[1], refs["best_single"]["cost"]
    out = {}
    for model in (m for m in models if m.probabilistic):
        Pv, Pt, row = preds[model.name]["val"], preds[model.name]["test"], {}
        for policy in policy_names():
            try:
                param = M.calibrate_operating_point(Policy.named(policy).sweep(Pv, val.Y, Cv, Crv),
                                                    target_accuracy=target)
            except ValueError:
                row[policy] = None
                continue
            acc, cost = M.routing_outcome(test["Y"], test["C"], Policy.of(policy, param).route(Pt, test["C_route"]))
            row[policy] = {"param": param, "accuracy": acc, "cost": cost,
                           "savings_vs_best_single": M.cost_savings(cost, best_cost)}
        out[model.name] = row
    return {"target_val_accuracy": target, "routers": out}


def candidate_points(P, Y, C_route, C, op: dict[str, Any], refs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each policy calibrated on val for the operating point (``op["candidates"]``: the kept one
    and the others), routed with its own parameter on these rows: ``{policy: {"param", "status",
    "accuracy", "cost", "gap_closed", "cost_savings"}}`` (:func:`headline`). Empty when the
    point was not calibrated (no target, or no val rows)."""
    out = {}
    for c in op.get("candidates") or []:
        acc, cost = M.routing_outcome(Y, C, Policy.of(c["policy"], c["param"]).route(P, C_route))
        out[c["policy"]] = {"param": c["param"], "status": c["status"], **headline(acc, cost, refs)}
    return out
