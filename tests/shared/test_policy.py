"""The routing rule (shared.policy.Rule): routing and fallback order under both policies."""

import numpy as np
import pytest

from shared.policy import POLICIES, Rule, route_by_value, route_with_tolerance

P = np.array([[0.9, 0.8, 0.5]])
COSTS = np.array([10.0, 2.0, 1.0])


@pytest.mark.parametrize("rule, order", [
    (Rule("tolerance", 0.15), [1, 0]),  # within 0.15 of 0.9: targets 0 and 1, cheapest first
    (Rule("tolerance", 0.0), [0]),
    (Rule("tolerance", 1.0), [2, 1, 0]),
    (Rule("value", 10.0), [1, 2, 0]),  # net values -1, 6, 4
    (Rule("value", 100.0), [0, 1, 2]),  # 80, 78, 49
    (Rule("value", 0.0), [2, 1, 0]),  # the cheapest first
    (Rule("value", np.inf), [0, 1, 2]),  # by P(correct)
])
def test_rule_routes_first_candidate_and_orders_the_rest(rule, order):
    assert rule.candidates(P[0], COSTS) == order
    assert rule.route(P, COSTS).tolist() == [order[0]]
    direct = route_by_value if rule.policy == "value" else route_with_tolerance
    assert rule.route(P, COSTS).tolist() == direct(P, COSTS, rule.param).tolist()


def test_rule_ties_go_to_the_cheaper_target_and_bad_rules_are_refused():
    assert Rule("value", np.inf).candidates(np.array([0.5, 0.5]), np.array([2.0, 1.0])) == [1, 0]
    assert Rule.of("value", 3) == Rule("value", 3.0) and POLICIES == ("tolerance", "value")
    with pytest.raises(ValueError, match="unknown routing policy 'cheap'"):
        Rule.of("cheap", 1.0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="must be >= 0"):
            Rule.of("value", bad)
