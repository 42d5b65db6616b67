"""Report metrics over a router's operating points (pure functions; :mod:`training.evaluate.routing_metrics`
holds the per-query ones).

Conventions: a router's operating points are aligned ``(k,)`` arrays ``costs`` (mean USD per
query) and ``accs`` (accuracy; NaN = no labelled query, never counted); a fixed router has
``k = 1``, a probabilistic one its tolerance sweep (:func:`training.evaluate.routing_metrics.tolerance_sweep`).
No point is interpolated: only what the router itself reaches counts. Accuracy and savings
thresholds are compared with an absolute slack ``atol`` (the sweep accumulates sums, so an
operating point equal to a single model may differ from it in the last bits).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["iso_accuracy_savings", "best_gap_at_savings", "hull_gap_at_savings", "group_masks"]

ATOL = 1e-12


def _points(costs, accs) -> tuple[np.ndarray, np.ndarray]:
    c, a = np.atleast_1d(np.asarray(costs, dtype=np.float64)), np.atleast_1d(np.asarray(accs, dtype=np.float64))
    if c.shape != a.shape or c.ndim != 1:
        raise ValueError(f"costs and accs must be aligned (k,) arrays; got {c.shape} and {a.shape}")
    return c, a


def iso_accuracy_savings(costs, accs, ref_acc: float, ref_cost: float, atol: float = ATOL) -> float:
    """Largest cost saving over a reference model among points at least as accurate as it.

    ``max_k (1 - costs[k] / ref_cost)`` over ``k`` with ``accs[k] >= ref_acc - atol``; the
    reference is normally the best single model (the most accurate target on the split).
    ``costs``, ``accs``: ``(k,)`` operating points. nan when no point reaches ``ref_acc``
    ("not reached"), or when ``ref_cost <= 0`` or ``ref_acc`` is nan. Negative when every
    point that reaches the accuracy costs more than the reference.
    """
    c, a = _points(costs, accs)
    if not np.isfinite(ref_acc) or not ref_cost > 0:
        return float("nan")
    ok = np.nan_to_num(a, nan=-np.inf) >= ref_acc - atol
    return float(1.0 - c[ok].min() / ref_cost) if ok.any() else float("nan")


def best_gap_at_savings(costs, accs, best_acc: float, oracle_acc: float, dear_cost: float,
                        min_savings: float, atol: float = ATOL) -> float:
    """Best gap closed among points that save at least ``min_savings`` of the most expensive
    model's cost (the paper's pair: 45.58% gap closed at 74.31% cheaper).

    ``max_k (accs[k] - best_acc) / (oracle_acc - best_acc)`` over ``k`` with
    ``1 - costs[k] / dear_cost >= min_savings - atol`` and a present accuracy. ``costs``,
    ``accs``: ``(k,)``; ``best_acc``: the best single model's accuracy; ``oracle_acc``: the
    oracle's; ``dear_cost``: the most expensive model's mean cost. nan when no point saves
    enough, or when ``dear_cost <= 0`` or ``oracle_acc == best_acc`` (no headroom).
    """
    c, a = _points(costs, accs)
    if not dear_cost > 0 or oracle_acc == best_acc or not np.isfinite(best_acc) or not np.isfinite(oracle_acc):
        return float("nan")
    ok = (1.0 - c / dear_cost >= min_savings - atol) & np.isfinite(a)
    return float((a[ok].max() - best_acc) / (oracle_acc - best_acc)) if ok.any() else float("nan")


def group_masks(groups: Sequence[str]) -> dict[str, np.ndarray]:
    """``{group: (n,) bool}`` for each distinct value of ``groups`` ``(n,)``, in sorted order
    (the per-task rows of the report: one mask per task of the test split)."""
    g = np.asarray(groups, dtype=object)
    return {str(name): g == name for name in sorted(set(g.tolist()), key=str)}


def hull_gap_at_savings(hull_costs, hull_accs, best_acc: float, oracle_acc: float, dear_cost: float,
                        min_savings: float) -> float:
    """The zero router's :func:`best_gap_at_savings`: gap closed by randomly mixing single
    models within the budget ``b = (1 - min_savings) * dear_cost``.

    ``hull_costs``, ``hull_accs``: ``(h,)`` the single-model hull sorted by cost
    (:func:`training.evaluate.routing_metrics.single_model_hull`, accuracy rising). Its accuracy at ``b`` is
    the straight line between the two hull vertices around ``b`` (the last vertex's beyond
    it); the result is ``(acc(b) - best_acc) / (oracle_acc - best_acc)``. nan when ``b`` is
    below the cheapest model's cost, or as in :func:`best_gap_at_savings`.
    """
    hc, ha = _points(hull_costs, hull_accs)
    budget = (1.0 - min_savings) * dear_cost
    if not len(hc) or budget < hc[0] - ATOL * max(abs(dear_cost), 1.0):
        return float("nan")
    acc = float(np.interp(budget, hc, ha))
    return best_gap_at_savings([min(budget, hc[-1])], [acc], best_acc, oracle_acc, dear_cost, min_savings)
