"""The operating point chosen on val (training.evaluate.scoring.choose_operating_point): both
policies calibrated, the better kept; the sweeps it calibrates on match direct routing."""

from types import SimpleNamespace

import numpy as np
import pytest

from shared.policy import Policy
from training.dataset import RoutingData
from training.evaluate import routing_metrics as M
from training.evaluate.scoring import choose_operating_point


def _val(n=300, seed=0):
    """Val rows where a dear target is right more often than two cheap ones, and noisy P(correct)."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, 3)) < [0.9, 0.7, 0.6]).astype(float)
    P = np.clip(0.3 * Y + 0.7 * rng.random((n, 3)), 0, 1)
    C = np.tile([15.0, 1.0, 0.5], (n, 1)) * rng.uniform(0.8, 1.2, (n, 1))
    data = RoutingData(query_ids=np.array([f"v{i}" for i in range(n)]), split=np.array(["val"] * n), blocks={},
                       targets=["dear", "mid", "cheap"], Y=Y, cost=C, input_tokens=np.zeros((n, 3)),
                       output_tokens=np.zeros((n, 3)))
    return P, data, C


def op(policy="auto", target_cost=None, target_accuracy=None):
    return SimpleNamespace(policy=policy, target_cost=target_cost, target_accuracy=target_accuracy)


def test_auto_keeps_the_policy_that_reaches_the_target_cheaper():
    P, val, C = _val()
    default = Policy.of("tolerance", 0.2)
    got = choose_operating_point(P, val, C, C, op(target_accuracy="best_single"), default)
    assert {c["policy"] for c in got["candidates"]} == {"tolerance", "value"}
    for c in got["candidates"]:  # each candidate's val numbers are its rule's routing outcome
        routed = M.routing_outcome(val.Y, C, Policy.of(c["policy"], c["param"]).route(P, C))
        assert (c["val_accuracy"], c["val_cost"]) == pytest.approx(routed)
    reached = [c for c in got["candidates"] if c["status"] == "calibrated"]
    assert reached and got["status"] == "calibrated" and got["target_accuracy"] == pytest.approx(val.Y[:, 0].mean())
    assert got["val_cost"] == min(c["val_cost"] for c in reached) and got[got["policy"]] is not None
    assert got["tolerance" if got["policy"] == "value" else "value"] is None
    for policy in ("tolerance", "value"):  # one policy asked for: only that one
        one = choose_operating_point(P, val, C, C, op(policy, target_accuracy="best_single"), default)
        assert one["policy"] == policy and [c["policy"] for c in one["candidates"]] == [policy]
    # a budget: the more accurate within it
    budget = choose_operating_point(P, val, C, C, op(target_cost=3.0), default)
    assert budget["val_cost"] <= 3.0 and budget["val_accuracy"] == max(
        c["val_accuracy"] for c in budget["candidates"] if c["status"] == "calibrated")


def test_unreachable_targets_missing_val_and_no_target():
    P, val, C = _val()
    default = Policy.of("value", 0.5)
    far = choose_operating_point(P, val, C, C, op(target_accuracy=1.01), default)
    assert far["status"] == "fallback" and far["val_accuracy"] == max(c["val_accuracy"] for c in far["candidates"])
    poor = choose_operating_point(P, val, C, C, op(target_cost=0.01), default)  # below the cheapest target
    assert poor["status"] == "fallback" and poor["val_cost"] == min(c["val_cost"] for c in poor["candidates"])
    none = choose_operating_point(P, val, C, C, op(), default)
    assert (none["policy"], none["value"], none["tolerance"], none["status"]) == ("value", 0.5, None, "default")
    assert (none["val_accuracy"], none["val_cost"]) == pytest.approx(M.routing_outcome(val.Y, C, default.route(P, C)))
    empty = choose_operating_point(P[:0], None, C[:0], C[:0], op(target_accuracy=0.5), default)
    assert empty["status"] == "default" and "not calibrated" in empty["note"] and empty["value"] == 0.5


def test_sweep_with_separate_decision_costs_matches_direct_routing():
    rng = np.random.default_rng(3)
    P, Y = rng.random((50, 3)), (rng.random((50, 3)) < 0.6).astype(float)
    C_route, C = rng.random((50, 3)), rng.random((50, 3))
    sweep = M.tolerance_sweep(P, Y, C, C_route)
    for tol, acc, cost in zip(*sweep):
        assert (acc, cost) == pytest.approx(M.routing_outcome(Y, C, M.route_with_tolerance(P, C_route, tol)))
    assert M.tolerance_sweep(P, Y, C, None).cost.tolist() == M.tolerance_sweep(P, Y, C).cost.tolist()


def test_each_calibrated_policy_is_scored_with_its_own_parameter_on_other_rows():
    from training.evaluate.policy_scoring import candidate_points, headline
    from training.evaluate.scoring import references

    P, val, C = _val()
    got = choose_operating_point(P, val, C, C, op(target_accuracy="best_single"), Policy.of("tolerance", 0.2))
    P2, test, C2 = _val(seed=1)  # the test rows
    test.Y[0, 1] = test.Y[3, :2] = np.nan
    refs = references(test.Y, C2, test.targets)
    assert refs["n_all_labelled"] == len(test.Y) - 2  # rows 0 and 3 lack a label
    points = candidate_points(P2, test.Y, C2, C2, got, refs)
    assert set(points) == {"tolerance", "value"}
    for c in got["candidates"]:
        acc, cost = M.routing_outcome(test.Y, C2, Policy.of(c["policy"], c["param"]).route(P2, C2))
        assert points[c["policy"]] == pytest.approx({"param": c["param"], "status": c["status"],
                                                     **headline(acc, cost, refs)})
    none = choose_operating_point(P, val, C, C, op(), Policy.of("tolerance", 0.2))  # not calibrated: no candidates
    assert candidate_points(P2, test.Y, C2, C2, none, refs) == {}
