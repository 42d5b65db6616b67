"""Epsilon-greedy exploration over the policy's eligible targets, with the propensity it logs.

Production observes only the target that answered, so a target the policy rarely chooses
never gets labels. With probability ``epsilon`` a routed request goes instead to one of the
*candidates*, uniformly: every other target the decision scored that is served and whose expected
cost is at most ``max_cost_ratio`` times the choice's. The candidates are not limited to the
policy's ``eligible`` band (the targets within the tolerance of the best): that band is the
policy's preference, which at tolerance 0 (accuracy routing, equal prices) is the choice alone,
and what the router believes worse is what exploration must label. The cost cap is the guard.
The propensity is the probability of the target that was sent, given the decision::

    candidates C (|C| = k >= 1):  P(chosen) = 1 - epsilon,  P(c) = epsilon / k  for c in C
    no candidate, or epsilon 0:   P(chosen) = 1

so an inverse-propensity estimate over the log is unbiased for any policy whose targets lie in
the support. Pinned and degraded requests are never explored (the ingress does not call this).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection

from serving.config import ExplorationConfig
from serving.schemas import RouteDecision


@dataclass(frozen=True)
class Explored:
    target: str  # where the request goes
    explored: bool  # True when that is not the policy's choice
    propensity: float  # P(target | decision)


def candidates(decision: RouteDecision, served: Collection[str], max_cost_ratio: float | None) -> list[str]:
    """The targets the decision scored other than its choice, served, within the cost cap (the eligible ones
    first, in their order, then the rest in the decision's order)."""
    cap = None if max_cost_ratio is None else max_cost_ratio * decision.expected_cost.get(decision.target, 0.0)
    scored = dict.fromkeys([*decision.eligible, *decision.probabilities])
    return [t for t in scored if t != decision.target and t in served
            and (cap is None or decision.expected_cost.get(t, float("inf")) <= cap)]


def explore(decision: RouteDecision, served: Collection[str], cfg: ExplorationConfig, rng: random.Random) -> Explored:
    """The target a routed request goes to, whether exploration chose it, and its propensity."""
    pool = candidates(decision, served, cfg.max_cost_ratio) if cfg.epsilon > 0 else []
    if not pool:
        return Explored(decision.target, False, 1.0)
    if rng.random() < cfg.epsilon:
        return Explored(rng.choice(pool), True, cfg.epsilon / len(pool))
    return Explored(decision.target, False, 1.0 - cfg.epsilon)
