"""Routing arithmetic shared by serving, training and evaluation: probability gaps, the two
built-in policies' routing functions, the outcome of a routing, and each policy's exact sweep.

:func:`route_with_tolerance` picks, per query, the cheapest target whose predicted
P(correct) is within ``tol`` of the best; equally cheap ones go to the higher P(correct), never
to registry order (all targets may cost the same). Gaps are rounded to :data:`GAP_DECIMALS` so
decimal tolerances behave as written. :func:`route_by_value` is the cost-aware alternative:
the target with the highest expected net value ``value * P(correct) - cost``.

:func:`tolerance_sweep` and :func:`value_sweep` visit every distinct routing of each, exactly;
the policies themselves (:mod:`shared.policy`) route and sweep through these.

Conventions: ``n`` queries, ``T`` targets; ``P`` is ``(n, T)`` predicted P(correct), ``Y`` the
``(n, T)`` correctness (NaN: a missing label, never read as 0), ``C`` costs ``(T,)`` or ``(n, T)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shared.errors import BadInput

GAP_DECIMALS = 12


def probability_gaps(P: np.ndarray) -> np.ndarray:
    """``(n, T)`` gaps ``max_j P[i, j] - P[i, j]``, rounded to 1e-12 so that decimal
    tolerances behave as written (``0.8 - 0.6`` counts as a gap of exactly ``0.2``)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or not np.all(np.isfinite(P)):
        raise ValueError("P must be a finite (n_queries, n_targets) array")
    return np.round(P.max(axis=1, keepdims=True) - P, GAP_DECIMALS)


def cost_matrix(costs: np.ndarray, n: int) -> np.ndarray:
    """Broadcast per-target costs ``(T,)`` or per-query costs ``(n, T)`` to ``(n, T)``."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim == 1:
        costs = np.broadcast_to(costs, (n, costs.shape[0]))
    if costs.ndim != 2 or costs.shape[0] != n:
        raise ValueError(f"costs must be (T,) or ({n}, T); got shape {costs.shape}")
    return costs


def cheapest_where(eligible: np.ndarray, costs: np.ndarray, P: np.ndarray | None = None) -> np.ndarray:
    """Per row, the index of the cheapest eligible column: the smallest ``(costs[i, j], -P[i, j], j)``
    over eligible ``j``. Equal costs go to the higher ``P`` (e.g. P(correct)), never to the
    column order alone; only columns equal in both (or any tie when ``P`` is None) go to the
    lower index. ``eligible``, ``costs`` and ``P`` are ``(n, T)``; a row needs one eligible column."""
    masked = np.where(eligible, costs, np.inf)
    if P is None:
        return np.argmin(masked, axis=1)
    cheapest = eligible & (masked == masked.min(axis=1, keepdims=True))
    return np.argmax(np.where(cheapest, np.asarray(P, dtype=np.float64), -np.inf), axis=1)


def within_tolerance(P: np.ndarray, tol: float) -> np.ndarray:
    """``(n, T)`` bool: target ``j`` is within ``tol`` of query ``i``'s best,
    ``max_k P[i, k] - P[i, j] <= tol`` (gaps rounded to 1e-12). ``tol`` must be >= 0."""
    if not tol >= 0:
        raise BadInput(f"tolerance must be >= 0, got {tol}")
    return probability_gaps(P) <= tol


def route_with_tolerance(P: np.ndarray, costs: np.ndarray, tol: float) -> np.ndarray:
    """Chosen target per query: the cheapest target ``j`` with
    ``max_k P[i, k] - P[i, j] <= tol`` (gaps rounded to 1e-12); among equally cheap ones the
    higher ``P[i, j]``, then the lower index (:func:`cheapest_where`).

    ``P`` is ``(n, T)`` predicted P(correct); ``costs`` is ``(T,)`` or ``(n, T)``.
    ``tol = 0`` picks the (cheapest) most likely target; ``tol >= 1`` the cheapest.
    Returns int ``(n,)``.
    """
    eligible = within_tolerance(P, tol)
    return cheapest_where(eligible, cost_matrix(costs, eligible.shape[0]), P)


def route_by_value(P: np.ndarray, costs: np.ndarray, value: float) -> np.ndarray:
    """Chosen target per query: ``argmax_j value * P[i, j] - costs[i, j]``, the highest
    expected net value when one correct answer is worth ``value`` (in the costs' unit);
    ties (within 1e-12 of the row's scale) by cost, then the higher ``P``, then index.

    ``P`` is ``(n, T)`` predicted P(correct); ``costs`` is ``(T,)`` or ``(n, T)``;
    ``value >= 0``. ``value = 0`` picks the cheapest target, ``value = inf`` the (cheapest)
    most likely one. Unlike a tolerance, the price *difference* counts: a target 15 times
    dearer must be that much more likely to be right. Returns int ``(n,)``.
    """
    probability_gaps(P)  # validates P
    if not value >= 0:
        raise BadInput(f"value must be >= 0, got {value}")
    P = np.asarray(P, dtype=np.float64)
    costs = cost_matrix(costs, P.shape[0])
    score = P if np.isinf(value) else value * P - costs
    scale = np.abs(score).max(axis=1, keepdims=True) + 1.0
    best = score >= score.max(axis=1, keepdims=True) - 1e-12 * scale
    return cheapest_where(best, costs, P)


def routing_outcome(Y: np.ndarray, C: np.ndarray, choice: np.ndarray) -> tuple[float, float]:
    """``(accuracy, mean cost)`` of choosing target ``choice[i]`` for query ``i``.

    accuracy = mean of ``Y[i, choice[i]]`` over queries whose chosen label is present
    (a missing label is excluded, not counted as wrong; nan if none); cost = mean of
    ``C[i, choice[i]]`` over all queries.
    """
    Y = np.asarray(Y, dtype=np.float64)
    C = cost_matrix(C, Y.shape[0])
    rows = np.arange(Y.shape[0])
    picked = Y[rows, np.asarray(choice)]
    acc = float(np.mean(picked[~np.isnan(picked)])) if (~np.isnan(picked)).any() else float("nan")
    return acc, float(np.mean(C[rows, choice]))


class Sweep(NamedTuple):
    """A tolerance sweep: three aligned ``(k,)`` arrays, sorted by cost ascending."""

    tolerance: np.ndarray
    accuracy: np.ndarray
    cost: np.ndarray


def tolerance_sweep(P: np.ndarray, Y: np.ndarray, C: np.ndarray, C_route: np.ndarray | None = None) -> Sweep:
    """Route with every distinct observed gap ``max_k P[i,k] - P[i,j]`` (rounded as in
    :func:`route_with_tolerance`, 0 included) as the tolerance and record
    :func:`routing_outcome`. Exact and ``O(nT log nT)``: gaps are visited in increasing
    order and each row's choice is updated when a better target becomes eligible (smaller
    ``(cost, -P, index)``, the per-query rule of :func:`route_with_tolerance`).
    Sorted by cost ascending, then tolerance descending.

    ``C_route`` (``(T,)`` or ``(n, T)``, default ``C``) are the costs the policy decides
    with (e.g. the price model known before answering); ``C`` are the costs recorded.
    """
    gaps = probability_gaps(P)
    P, Y = np.asarray(P, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    n, T = gaps.shape
    C = cost_matrix(C, n)
    Cr = C if C_route is None else cost_matrix(C_route, n)
    order = np.argsort(gaps, axis=None, kind="stable")
    g_sorted = gaps.ravel()[order]
    cur = np.full(n, -1)
    cost_sum, acc_sum, acc_cnt = 0.0, 0.0, 0
    tols, accs, costs = [], [], []
    for pos, flat in enumerate(order):
        i, j = divmod(int(flat), T)
        c = cur[i]
        if c < 0 or (Cr[i, j], -P[i, j], j) < (Cr[i, c], -P[i, c], c):
            if c >= 0:
                cost_sum -= C[i, c]
                if not np.isnan(Y[i, c]):
                    acc_sum, acc_cnt = acc_sum - Y[i, c], acc_cnt - 1
            cur[i] = j
            cost_sum += C[i, j]
            if not np.isnan(Y[i, j]):
                acc_sum, acc_cnt = acc_sum + Y[i, j], acc_cnt + 1
        if pos + 1 == len(order) or g_sorted[pos + 1] != g_sorted[pos]:
            tols.append(g_sorted[pos])
            accs.append(acc_sum / acc_cnt if acc_cnt else np.nan)
            costs.append(cost_sum / n)
    tols, accs, costs = np.array(tols), np.array(accs), np.array(costs)
    idx = np.lexsort((-tols, costs))
    return Sweep(tols[idx], accs[idx], costs[idx])


class ValueSweep(NamedTuple):
    """A value sweep (:func:`value_sweep`): three aligned ``(k,)`` arrays, sorted by cost ascending."""

    value: np.ndarray
    accuracy: np.ndarray
    cost: np.ndarray


def _value_breakpoints(P: np.ndarray, Cr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and values ``w = (c_j - c_k) / (P_j - P_k)`` (``P_j > P_k``, ``c_j > c_k``): where a
    query's :func:`route_by_value` choice can change. Sorted by value; ``(m,)`` each."""
    dP = P[:, :, None] - P[:, None, :]
    dC = Cr[:, :, None] - Cr[:, None, :]
    ok = (dP > 0) & (dC > 0)
    rows, w = np.nonzero(ok)[0], dC[ok] / dP[ok]
    order = np.argsort(w, kind="stable")
    return rows[order], w[order]


def _choice_above(p: np.ndarray, c: np.ndarray, w: float) -> int:
    """One query's :func:`route_by_value` choice just above value ``w`` (``p``, ``c``:
    ``(T,)``): of the targets tied at ``w``, the most likely, then the cheaper, then index."""
    s = w * p - c
    tied = np.flatnonzero(s >= s.max() - 1e-12 * (np.abs(s).max() + 1.0))
    return int(tied[np.lexsort((tied, c[tied], -p[tied]))[0]])


def value_sweep(P: np.ndarray, Y: np.ndarray, C: np.ndarray, C_route: np.ndarray | None = None) -> ValueSweep:
    """Every distinct routing of :func:`route_by_value` and its
    :func:`routing_outcome`, from the cheapest targets to the most likely ones. Exact: a
    query's choice is constant between its breakpoints ``(c_j - c_k) / (P_j - P_k)``, so the
    sweep walks the sorted breakpoints of all queries, ``O(n T^2 log(n T))``. Each point's
    ``value`` lies inside its routing's interval (half the first breakpoint, midway between
    two, twice the last), so ``route_by_value(P, C_route, value)`` reproduces it. Sorted by
    cost ascending, then value descending. ``C_route``: the costs the policy decides with,
    as in :func:`tolerance_sweep`."""
    probability_gaps(P)  # validates P
    P, Y = np.asarray(P, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    n = P.shape[0]
    C = cost_matrix(C, n)
    Cr = C if C_route is None else cost_matrix(C_route, n)
    cur = np.array([_choice_above(P[i], Cr[i], 0.0) for i in range(n)], dtype=int)
    picked = Y[np.arange(n), cur]
    cost_sum, acc_sum = float(C[np.arange(n), cur].sum()), float(np.nansum(picked))
    acc_cnt = int((~np.isnan(picked)).sum())
    bp_rows, bp_w = _value_breakpoints(P, Cr)
    first = bp_w[0] / 2 if len(bp_w) else 1.0
    values, accs, costs = [first], [acc_sum / acc_cnt if acc_cnt else np.nan], [cost_sum / max(n, 1)]
    for pos, (i, w) in enumerate(zip(bp_rows, bp_w)):
        old, new = cur[i], _choice_above(P[i], Cr[i], w)
        if new != old:
            cost_sum += C[i, new] - C[i, old]
            for j, sign in ((old, -1), (new, 1)):
                if not np.isnan(Y[i, j]):
                    acc_sum, acc_cnt = acc_sum + sign * Y[i, j], acc_cnt + sign
            cur[i] = new
        if pos + 1 == len(bp_w) or bp_w[pos + 1] != w:
            values.append(float(2 * w if pos + 1 == len(bp_w) else (w + bp_w[pos + 1]) / 2))
            accs.append(acc_sum / acc_cnt if acc_cnt else np.nan)
            costs.append(cost_sum / n)
    values, accs, costs = np.array(values), np.array(accs), np.array(costs)
    idx = np.lexsort((-values, costs))
    return ValueSweep(values[idx], accs[idx], costs[idx])
