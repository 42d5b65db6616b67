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


def test_equal_costs_fall_to_the_higher_p_never_to_registry_order():
    """Among equally cheap eligible targets the higher P(correct) wins; differing costs still
    pick the cheapest eligible target; the first candidate is the routed one."""
    same = np.ones(3)
    for p in ([0.50, 0.55, 0.58], [0.55, 0.58, 0.50], [0.58, 0.50, 0.55]):
        P = np.array([p])
        best = int(np.argmax(p))
        assert route_with_tolerance(P, same, 0.1).tolist() == [best]
        assert Tolerance(0.1).candidates(P[0], same)[0] == best
        for value in (0.0, 1.0, np.inf):
            assert route_by_value(P, same, value).tolist() == [best] == Value(value).route(P, same).tolist()
    P = np.array([[0.50, 0.55, 0.58]])
    assert route_with_tolerance(P, np.array([1.0, 2.0, 3.0]), 0.1).tolist() == [0]  # cheapest eligible
    assert route_with_tolerance(P, np.array([3.0, 2.0, 1.0]), 0.05).tolist() == [2]
    assert route_with_tolerance(P, np.array([1.0, 1.0, 3.0]), 0.1).tolist() == [1]  # cheapest two tie: higher P
    assert Tolerance(0.1).candidates(P[0], np.array([1.0, 1.0, 3.0])) == [1, 0, 2]
    assert route_with_tolerance(np.array([[0.5, 0.5]]), same[:2], 0.0).tolist() == [0]  # equal in both: index
    assert "most likely of the cheapest" in Tolerance(0.1).explain({"a": 0.5, "b": 0.6}, {"a": 1, "b": 1}, ["b", "a"])


@pytest.mark.parametrize("price", [np.ones(4), np.array([1.0, 1.0, 2.0, 2.0])])
def test_sweeps_match_per_query_routing_when_costs_tie(price):
    """The exact sweeps reproduce the per-query rule (cost, then higher P, then index) when
    prices tie; with every price equal each sweep holds one routing: the most likely target."""
    from shared.routing import routing_outcome, tolerance_sweep, value_sweep

    rng = np.random.default_rng(5)
    P, Y = rng.random((60, 4)), rng.random((60, 4))  # soft labels
    C = price * rng.uniform(0.5, 1.5, (60, 1))       # per-query costs, tied across targets
    for tol, acc, cost in zip(*tolerance_sweep(P, Y, C)):
        assert (acc, cost) == pytest.approx(routing_outcome(Y, C, route_with_tolerance(P, C, tol)))
    for value, acc, cost in zip(*value_sweep(P, Y, C)):
        assert (acc, cost) == pytest.approx(routing_outcome(Y, C, route_by_value(P, C, value)))
    for tol in (0.0, 0.05, 0.3, 1.0):  # a grid: every routing is a sweep point
        routed = routing_outcome(Y, C, route_with_tolerance(P, C, tol))
        assert any((a, c) == pytest.approx(routed) for _, a, c in zip(*tolerance_sweep(P, Y, C)))
    if np.all(price == price[0]):
        likeliest = routing_outcome(Y, C, np.argmax(P, axis=1))
        for sweep in (tolerance_sweep(P, Y, C), value_sweep(P, Y, C)):
            assert np.allclose(sweep.accuracy, likeliest[0]) and np.allclose(sweep.cost, likeliest[1])
