"""Pure routing metrics: outcomes of a routing, the oracle and single models, gap closed,
cost savings, the tolerance and value sweeps, P-AUCCC, the single-model hull, operating-point
calibration and disagreement.

Conventions: ``n`` queries, ``T`` targets. ``Y`` is the ``(n, T)`` correctness matrix (0/1
or a score in [0, 1]); NaN marks a missing label and is never read as 0. ``C`` is a cost
matrix, ``(n, T)`` per query or ``(T,)`` per target. ``P`` is ``(n, T)`` predicted
P(correct). The routing functions, :func:`routing_outcome` and the exact sweeps are
:mod:`shared.routing` (re-exported here); the policies are :mod:`shared.policy`.
"""

from __future__ import annotations

import warnings

import numpy as np

from shared.errors import BadInput
from shared.routing import (
    Sweep, ValueSweep, cheapest_where, cost_matrix, route_by_value, route_with_tolerance, routing_outcome,
    tolerance_sweep, value_sweep,
)
from training.metrics import BEST_SINGLE_TIE_BREAK, best_target

__all__ = [
    "route_with_tolerance", "route_by_value", "routing_outcome", "expected_outcome", "oracle_choice",
    "oracle_accuracy", "oracle_outcome", "single_model_points", "best_single", "BEST_SINGLE_TIE_BREAK", "gap_closed",
    "cost_savings", "Sweep", "tolerance_sweep", "ValueSweep", "value_sweep", "pareto_front", "pauccc",
    "single_model_hull", "hull_pauccc",
    "calibrate_operating_point", "disagreement_mask", "disagreement_share", "equal_costs",
]


def _row_best(Y: np.ndarray) -> np.ndarray:
    """Row max over present labels; nan for rows with no label."""
    filled = np.where(np.isnan(Y), -np.inf, Y)
    best = filled.max(axis=1)
    return np.where(np.isneginf(best), np.nan, best)


def expected_outcome(Y: np.ndarray, C: np.ndarray, W: np.ndarray) -> tuple[float, float]:
    """``(accuracy, mean cost)`` of a randomised choice: query ``i`` goes to target ``j``
    with probability ``W[i, j]`` (rows sum to 1; one-hot rows give :func:`routing_outcome`).

    accuracy = ``sum_ij W_ij Y_ij / sum_ij W_ij`` over present labels (missing excluded,
    as in :func:`routing_outcome`; nan if none); cost = ``mean_i sum_j W_ij C_ij``.
    """
    Y = np.asarray(Y, dtype=np.float64)
    C = cost_matrix(C, Y.shape[0])
    W = np.asarray(W, dtype=np.float64)
    present = ~np.isnan(Y)
    mass = float(np.sum(W * present))
    acc = float(np.sum(np.where(present, W * np.nan_to_num(Y), 0.0)) / mass) if mass > 0 else float("nan")
    return acc, float(np.mean(np.sum(W * C, axis=1)))


def oracle_choice(Y: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Oracle routing: the cheapest target achieving the row's best present score (the
    cheapest correct one for 0/1 labels); when the best is 0 (nobody correct) or the row
    has no label, the cheapest target overall. Ties by index. Returns int ``(n,)``."""
    Y = np.asarray(Y, dtype=np.float64)
    C = cost_matrix(C, Y.shape[0])
    best = _row_best(Y)[:, None]
    hit = (Y == best) & (best > 0)
    hit[~hit.any(axis=1)] = True
    return cheapest_where(hit, C)


def oracle_accuracy(Y: np.ndarray) -> float:
    """Share of queries some target answers correctly: mean over labelled rows of the
    row's best present score (for 0/1 labels, ``1`` if any target is right)."""
    best = _row_best(np.asarray(Y, dtype=np.float64))
    return float(np.nanmean(best)) if (~np.isnan(best)).any() else float("nan")


def oracle_outcome(Y: np.ndarray, C: np.ndarray) -> tuple[float, float]:
    """``(oracle_accuracy(Y), mean cost of oracle_choice(Y, C))``."""
    Y = np.asarray(Y, dtype=np.float64)
    _, cost = routing_outcome(Y, C, oracle_choice(Y, C))
    return oracle_accuracy(Y), cost


def single_model_points(Y: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per target ``(accuracy (T,), mean cost (T,))`` of always sending every query to it;
    accuracy over that target's present labels."""
    Y = np.asarray(Y, dtype=np.float64)
    C = cost_matrix(C, Y.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a target with no label -> nan
        accs = np.nanmean(Y, axis=0)
    return accs, C.mean(axis=0)


def best_single(Y: np.ndarray, C: np.ndarray) -> tuple[int, float, float]:
    """``(index, accuracy, mean cost)`` of the best single target, by :data:`BEST_SINGLE_TIE_BREAK`:
    the highest accuracy (a target with no label ranks last); among equal accuracies the
    lowest mean cost; then the lowest index. So at a tie the reference a router is measured
    against is the cheapest of the most accurate targets (the hardest to save money on)."""
    accs, costs = single_model_points(Y, C)
    j = best_target(accs, costs)
    return j, float(accs[j]), float(costs[j])


def gap_closed(router_acc: float, best_single_acc: float, oracle_acc: float) -> float:
    """``(router - best) / (oracle - best)``: share of the best-single-to-oracle headroom
    captured; nan when ``oracle == best``. Negative when the router is worse than best."""
    den = oracle_acc - best_single_acc
    return float("nan") if den == 0 else float((router_acc - best_single_acc) / den)


def cost_savings(router_cost: float, most_expensive_cost: float) -> float:
    """``1 - router_cost / most_expensive_cost`` (nan when the latter is 0)."""
    return float("nan") if most_expensive_cost == 0 else float(1.0 - router_cost / most_expensive_cost)


def pareto_front(costs: np.ndarray, accs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points where accuracy strictly rises with cost (the monotone envelope's corners)."""
    idx = np.lexsort((-accs, costs))
    pc, pa = [], []
    for c, a in zip(costs[idx], accs[idx]):
        if not pa or a > pa[-1]:
            if pc and pc[-1] == c:
                pa[-1] = a
            else:
                pc.append(c), pa.append(a)
    return np.array(pc), np.array(pa)


def pauccc(costs, accs, c_min: float, c_max: float, acc_floor: float, interpolation: str = "step") -> float:
    """Partial area under the cost-accuracy curve above ``acc_floor``, normalised:
    ``(1 / (c_max - c_min)) * integral_{c_min}^{c_max} max(f(c) - acc_floor, 0) dc``.

    ``f`` is built from the Pareto corners ``(c_k, a_k)`` of the points (accuracy strictly
    increasing with cost): ``f(c) = acc_floor`` for ``c < c_0``; ``"step"``:
    ``f(c) = max{a_k : c_k <= c}`` (best accuracy reachable within budget ``c``);
    ``"linear"``: straight lines between corners (reachable by mixing two operating
    points at random) and ``a_last`` after the last. Exact, no grid. The result is the mean
    accuracy gain over the floor across the budget range; nan when ``c_max <= c_min``.
    """
    if interpolation not in ("step", "linear"):
        raise ValueError("interpolation must be 'step' or 'linear'")
    if c_max <= c_min:
        return float("nan")
    pc, pa = pareto_front(np.asarray(costs, float), np.asarray(accs, float))
    knots = np.unique(np.concatenate([[c_min, c_max], pc[(pc > c_min) & (pc < c_max)]]))
    area = 0.0
    for u, v in zip(knots[:-1], knots[1:]):
        mid = 0.5 * (u + v)
        if len(pc) == 0 or mid < pc[0]:
            continue
        if interpolation == "step" or mid > pc[-1]:
            k = int(np.searchsorted(pc, mid, side="right")) - 1  # last corner with c_k <= mid
            area += max(pa[k] - acc_floor, 0.0) * (v - u)
            continue
        gu, gv = np.interp(u, pc, pa) - acc_floor, np.interp(v, pc, pa) - acc_floor
        if gu >= 0 and gv >= 0:
            area += 0.5 * (gu + gv) * (v - u)
        elif gu > 0 or gv > 0:  # the line crosses the floor: keep the positive triangle
            g = max(gu, gv)
            area += 0.5 * (v - u) * g * g / (abs(gu) + abs(gv))
    return float(area / (c_max - c_min))


def single_model_hull(single_costs, single_accs) -> tuple[np.ndarray, np.ndarray]:
    """Upper convex hull of the single-model ``(cost, accuracy)`` points from the cheapest
    model (most accurate among equally cheap) to the most accurate (cheapest among equally
    accurate): the "zero router" reachable by randomly mixing models. Returns hull
    ``(costs, accs)`` sorted by cost (Andrew's monotone chain, collinear points dropped)."""
    c, a = np.asarray(single_costs, float), np.asarray(single_accs, float)
    idx = np.lexsort((-a, c))
    hull: list[tuple[float, float]] = []
    for p in zip(c[idx], a[idx]):
        if hull and p[0] == hull[-1][0]:
            continue  # same cost, lower accuracy
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # not a right turn
                hull.pop()
            else:
                break
        hull.append(p)
    hc, ha = np.array(hull).T
    top = int(np.argmax(ha))  # first (cheapest) most accurate vertex
    return hc[: top + 1], ha[: top + 1]


def hull_pauccc(single_costs, single_accs, c_min: float | None = None, c_max: float | None = None) -> float:
    """P-AUCCC of :func:`single_model_hull` with ``"linear"`` interpolation; the floor is
    the cheapest model's accuracy; the range defaults to [cheapest, most expensive] cost."""
    c, a = np.asarray(single_costs, float), np.asarray(single_accs, float)
    hc, ha = single_model_hull(c, a)
    c_min = float(c.min()) if c_min is None else c_min
    c_max = float(c.max()) if c_max is None else c_max
    return pauccc(hc, ha, c_min, c_max, acc_floor=float(ha[0]), interpolation="linear")


def calibrate_operating_point(sweep: Sweep, target_cost: float | None = None,
                              target_accuracy: float | None = None) -> float:
    """Tolerance of a sweep point (calibrate on validation data, never on test):
    ``target_cost``: the highest accuracy with ``cost <= target_cost`` (ties: cheaper);
    ``target_accuracy``: the cheapest point with ``accuracy >= target_accuracy`` (ties:
    more accurate). Exactly one target must be given; ``ValueError`` if none is reachable.
    """
    if (target_cost is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_cost and target_accuracy")
    tol, acc, cost = (np.asarray(x, float) for x in sweep)
    acc = np.nan_to_num(acc, nan=-np.inf)
    if target_cost is not None:
        ok = np.flatnonzero(cost <= target_cost)
        if len(ok) == 0:
            raise BadInput(f"no operating point costs <= {target_cost}; cheapest is {cost.min():.6g}")
        best = ok[np.lexsort((cost[ok], -acc[ok]))[0]]
    else:
        ok = np.flatnonzero(acc >= target_accuracy)
        if len(ok) == 0:
            raise BadInput(f"no operating point reaches accuracy {target_accuracy}; best is {acc.max():.6g}")
        best = ok[np.lexsort((-acc[ok], cost[ok]))[0]]
    return float(tol[best])


def disagreement_mask(Y: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: the present labels (binarised ``y >= 0.5``) include both a right and
    a wrong answer. Rows with fewer than two labels cannot disagree."""
    Y = np.asarray(Y, dtype=np.float64)
    present = ~np.isnan(Y)
    right = present & (Y >= 0.5)
    wrong = present & (Y < 0.5)
    return right.any(axis=1) & wrong.any(axis=1)


def disagreement_share(Y: np.ndarray) -> float:
    """Share of labelled queries (at least one present label) where targets are neither
    all right nor all wrong; nan when no query is labelled."""
    Y = np.asarray(Y, dtype=np.float64)
    labelled = (~np.isnan(Y)).any(axis=1)
    return float(disagreement_mask(Y)[labelled].mean()) if labelled.any() else float("nan")


def equal_costs(C: np.ndarray, rtol: float = 1e-9) -> bool:
    """Every target costs the same on every query: ``|C_ij - C_i0| <= rtol * max |C|`` for all
    ``i, j`` (``C``: ``(n, T)``). Then every routing costs the same and cost savings, P-AUCCC and
    savings thresholds mean nothing: accuracy is the whole comparison."""
    C = np.asarray(C, dtype=np.float64)
    if C.ndim != 2 or not C.size:
        return False
    return bool(np.all(np.abs(C - C[:, :1]) <= rtol * np.max(np.abs(C))))
