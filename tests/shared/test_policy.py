"""The routing policies (shared.policy): routing and fallback order under both built-in
policies, the registry, and the parameter checks."""

import numpy as np
import pytest
from pydantic import ValidationError

from shared.policy import Policy, Tolerance, Value, policy_names
from shared.routing import route_by_value, route_with_tolerance

P = np.array([[0.9, 0.8, 0.5]])
COSTS = np.array([10.0, 2.0, 1.0])


@pytest.mark.parametrize("rule, order", [
    (Tolerance(0.15), [1, 0]),  # within 0.15 of 0.9: targets 0 and 1, cheapest first
    (Tolerance(0.0), [0]),
    (Tolerance(1.0), [2, 1, 0]),
    (Value(10.0), [1, 2, 0]),  # net values -1, 6, 4
    (Value(100.0), [0, 1, 2]),  # 80, 78, 49
    (Value(0.0), [2, 1, 0]),  # the cheapest first
    (Value(np.inf), [0, 1, 2]),  # by P(correct)
])
def test_rule_routes_first_candidate_and_orders_the_rest(rule, order):
    assert rule.candidates(P[0], COSTS) == order
    assert rule.route(P, COSTS).tolist() == [order[0]]
    direct = route_by_value if rule.name == "value" else route_with_tolerance
    assert rule.route(P, COSTS).tolist() == direct(P, COSTS, rule.param).tolist()


def test_rule_ties_go_to_the_cheaper_target_and_bad_rules_are_refused():
    assert Value(np.inf).candidates(np.array([0.5, 0.5]), np.array([2.0, 1.0])) == [1, 0]
    assert Policy.of("value", 3) == Value(3.0) != Tolerance(3.0) and policy_names()[:2] == ("tolerance", "value")
    with pytest.raises(ValueError, match="unknown routing policy 'cheap'"):
        Policy.of("cheap", 1.0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValidationError, match="greater than or equal to 0"):
            Policy.of("value", bad)


def test_request_bounds_the_one_rule_check_and_the_flat_fields():
    """A request may not ask for a tolerance over 1 or an infinite value (a stored rule may);
    at most one policy is set; the flat form names every registered policy."""
    assert Tolerance(2.0).route(P, COSTS).tolist() == [2] and Value(np.inf).param == np.inf
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        Tolerance.from_request(2.0)
    with pytest.raises(ValidationError, match="finite"):
        Value.from_request(float("inf"))
    assert Policy.pick({"default_tolerance": None, "default_value": 0.5}, prefix="default_") == Value(0.5)
    assert Policy.pick({"tolerance": None}) is None
    with pytest.raises(ValueError, match="at most one of tolerance and value"):
        Policy.pick({"tolerance": 0.1, "value": 0.5})
    assert Value(0.5).fields() == {"policy": "value", "tolerance": None, "value": 0.5}
    with pytest.raises(ValueError, match="already registered"):
        type("Again", (Policy,), {"__annotations__": {}, "name": "tolerance", "route": Tolerance.route})
