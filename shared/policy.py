"""The routing policy, defined once for training, evaluation and serving.

:func:`route_with_tolerance` picks, per query, the cheapest target whose predicted
P(correct) is within ``tol`` of the best. Gaps are rounded to :data:`GAP_DECIMALS` so
decimal tolerances behave as written. The evaluation's tolerance sweep, the artifact's
:meth:`~shared.artifact.Router.route` and the serving RouterHead all call it.

:func:`route_by_value` is the cost-aware alternative: the target with the highest expected
net value ``value * P(correct) - cost``. The evaluation compares both policies' frontiers
and chooses one on val for the artifact's operating point.

:class:`Rule` is a policy with its parameter: what an artifact's operating point, an
evaluation and a served request route by (``rule.route``), and the fallback order of the
targets behind the chosen one (``rule.candidates``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

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


def cheapest_where(eligible: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Per row, the index of the cheapest eligible column; ties go to the lower index
    (``argmin`` returns the first minimum). ``eligible`` and ``costs`` are ``(n, T)``."""
    masked = np.where(eligible, costs, np.inf)
    return np.argmin(masked, axis=1)


def within_tolerance(P: np.ndarray, tol: float) -> np.ndarray:
    """``(n, T)`` bool: target ``j`` is within ``tol`` of query ``i``'s best,
    ``max_k P[i, k] - P[i, j] <= tol`` (gaps rounded to 1e-12). ``tol`` must be >= 0."""
    if not tol >= 0:
        raise BadInput(f"tolerance must be >= 0, got {tol}")
    return probability_gaps(P) <= tol


def route_with_tolerance(P: np.ndarray, costs: np.ndarray, tol: float) -> np.ndarray:
    """Chosen target per query: the cheapest target ``j`` with
    ``max_k P[i, k] - P[i, j] <= tol`` (gaps rounded to 1e-12); ties by cost, then index.

    ``P`` is ``(n, T)`` predicted P(correct); ``costs`` is ``(T,)`` or ``(n, T)``.
    ``tol = 0`` picks the (cheapest) most likely target; ``tol >= 1`` the cheapest.
    Returns int ``(n,)``.
    """
    eligible = within_tolerance(P, tol)
    return cheapest_where(eligible, cost_matrix(costs, eligible.shape[0]))


def route_by_value(P: np.ndarray, costs: np.ndarray, value: float) -> np.ndarray:
    """Chosen target per query: ``argmax_j value * P[i, j] - costs[i, j]``, the highest
    expected net value when one correct answer is worth ``value`` (in the costs' unit);
    ties (within 1e-12 of the row's scale) by cost, then index.

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
    return cheapest_where(best, costs)


PolicyName = Literal["tolerance", "value"]
POLICIES: tuple[str, ...] = get_args(PolicyName)


class Rule(NamedTuple):
    """A routing policy and its parameter: ``("tolerance", tol)`` with ``tol`` in P(correct)
    (:func:`route_with_tolerance`), or ``("value", value)`` with ``value`` in USD per correct
    answer (:func:`route_by_value`). Both parameters are ``>= 0``; a value may be ``inf``."""

    policy: str
    param: float

    @classmethod
    def of(cls, policy: str, param: float) -> "Rule":
        """A checked rule: ValueError for an unknown policy or a negative / nan parameter."""
        if policy not in POLICIES:
            raise BadInput(f"unknown routing policy {policy!r}; use one of {POLICIES}")
        if not float(param) >= 0:
            raise BadInput(f"the {policy} policy's parameter must be >= 0, got {param}")
        return cls(policy, float(param))

    def route(self, P: np.ndarray, costs: np.ndarray) -> np.ndarray:
        """Chosen target per query, ``(n,)`` int, of ``P`` ``(n, T)`` and costs ``(T,)`` or ``(n, T)``."""
        if self.policy == "value":
            return route_by_value(P, costs, self.param)
        return route_with_tolerance(P, costs, self.param)

    def candidates(self, p: np.ndarray, costs: np.ndarray) -> list[int]:
        """One query's targets in fallback order, the chosen one first. Tolerance: the targets
        within the tolerance of the best, cheapest first. Value: every target, by expected net
        value ``value * p - cost`` (best first; ties: cheaper, then lower index); ``value = inf``
        orders by ``p``. ``p`` and ``costs`` are ``(T,)``."""
        p, costs = np.asarray(p, dtype=np.float64), np.asarray(costs, dtype=np.float64)
        by_cost = np.argsort(costs, kind="stable")
        if self.policy == "tolerance":
            near = within_tolerance(p[None, :], self.param)[0]
            return [int(i) for i in by_cost if near[i]]
        score = p if np.isinf(self.param) else self.param * p - costs
        chosen = int(self.route(p[None, :], costs[None, :])[0])  # near-ties as route_by_value breaks them
        rest = [int(i) for i in by_cost[np.argsort(-score[by_cost], kind="stable")] if i != chosen]
        return [chosen, *rest]
