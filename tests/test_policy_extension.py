"""A routing policy is one class: a toy policy defined in this file alone is served by the real
ingress and RouterHead, kept in an artifact's operating point, and swept and calibrated by the
evaluation, with no other file knowing of it (shared.policy's registry)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import Field

from serving.http_app import make_fastapi_app
from serving.ingress import RouterIngress
from serving.messages import EncodedPrompt, TokenCount
from serving.replicas import RouterHeadReplica
from shared.artifact import OperatingPoint, copy_artifact, load_artifact, read_meta, save_artifact, update_policy
from shared.policy import REGISTRY, Policy, policy_names
from shared.routing import cheapest_where, cost_matrix, routing_outcome
from tests.serving.test_ingress_logic import MSG, Handle, target
from tests.shared.test_artifact import make_parts
from training.evaluate.report import policy_lines
from training.evaluate.results import ProbabilisticScores, jsonable
from training.evaluate.scoring import choose_operating_point, policy_points, references, score_probabilistic
from tests.training.evaluate.test_operating_point import _val, op


@pytest.fixture
def floor():
    """The toy policy, registered for one test: the cheapest target whose P(correct) is at least
    ``param``; a query no target reaches goes to its most likely one."""

    class Floor(Policy):
        name = "floor"
        param: float = Field(ge=0, le=1, description="Least P(correct) a target must have.")

        def route(self, P, costs):
            P = np.asarray(P, dtype=np.float64)
            ok = P >= self.param
            ok[~ok.any(axis=1)] = (P == P.max(axis=1, keepdims=True))[~ok.any(axis=1)]
            return cheapest_where(ok, cost_matrix(costs, P.shape[0]), P)

        @classmethod
        def grid(cls, P, C_route):
            return np.unique(np.concatenate([[0.0], np.asarray(P).ravel()]))

    try:
        yield Floor
    finally:
        REGISTRY.pop("floor")


def test_the_toy_policy_routes_and_orders_fallbacks(floor):
    P, costs = np.array([[0.9, 0.6, 0.3]]), np.array([10.0, 2.0, 1.0])
    assert policy_names() == ("tolerance", "value", "floor")
    assert Policy.of("floor", 0.5).route(P, costs).tolist() == [1] and floor(0.95).route(P, costs).tolist() == [0]
    assert floor(0.5).candidates(P[0], costs) == [1, 0, 2]  # the generic order: then by P(correct)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        Policy.of("floor", 1.5)


@pytest.fixture
def served(floor, tmp_path):
    """The real ingress over the real RouterHead on a saved artifact; encoder and targets are stand-ins."""
    meta, transform, ensemble, query = make_parts()
    uri = str(tmp_path / "router")
    save_artifact(uri, meta, transform, ensemble)
    head = RouterHeadReplica(artifact=uri)
    features = {k: np.asarray(v[0], dtype=np.float32) for k, v in query.items()}

    async def encode(messages):
        return EncodedPrompt(features, 300, meta.encoder.name, uri)

    async def count_tokens(messages):
        return TokenCount(3, 4096)

    async def decide(encoded, rule):
        return head.decide(encoded, rule)

    encoder = Handle(encode=encode, count_tokens=count_tokens, ready=lambda: None)
    ingress = RouterIngress(encoder, Handle(decide=decide), {n: target(n) for n in head.names}, {})
    P = head.router.predict_proba({k: v[None, :] for k, v in features.items()})
    names = head.router.target_names
    return TestClient(make_fastapi_app(lambda: ingress)), head, uri, names, P, head.router.costs([300])


def test_a_request_names_the_toy_policy_and_the_router_head_routes_by_it(served, floor):
    c, head, uri, names, P, costs = served
    for level in (0.0, 0.45, 1.0):
        want = names[int(floor(level).route(P, costs)[0])]
        r = c.post("/v1/route", json={"messages": MSG, "floor": level})
        assert r.status_code == 200, r.text
        d = r.json()
        assert (d["policy"], d["floor"], d["tolerance"], d["value"], d["target"]) == ("floor", level, None, None, want)
        keys = list(d)
        at = keys.index("policy")
        assert keys[0] == "id" and keys[at:at + 4] == ["policy", "tolerance", "value", "floor"]  # every policy's key
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG, "floor": 0.45})
    assert r.status_code == 200 and r.json()["route"]["policy"] == "floor"
    assert r.json()["model"] == names[int(floor(0.45).route(P, costs)[0])]
    for body, reason in (({"floor": 1.5}, "floor: Input should be less than or equal to 1"),
                         ({"floor": 0.4, "value": 1.0}, "at most one of value and floor"),
                         ({"model": "router:0.2", "floor": 0.4}, "sets a tolerance and the request a floor")):
        r = c.post("/v1/route", json={"messages": MSG, **body})
        assert r.status_code == 422 and reason in r.json()["detail"], r.text


def test_an_artifact_keeps_a_toy_operating_point(served, floor):
    c, head, uri, names, P, costs = served
    point = OperatingPoint(policy="floor", floor=0.45, target_accuracy=0.8, val_accuracy=0.81, val_cost=0.002)
    update_policy(uri, read_meta(uri).policy.model_copy(update={"operating_point": point}))
    written = json.loads(open(f"{uri}/meta.json").read())["policy"]["operating_point"]
    assert list(written)[:4] == ["policy", "tolerance", "value", "floor"]
    assert (written["policy"], written["floor"], written["tolerance"], written["value"]) == ("floor", 0.45, None, None)
    router = load_artifact(uri)
    assert router.meta.policy.rule() == floor(0.45)
    assert router.route(P, [300]).tolist() == floor(0.45).route(P, costs).tolist()
    copy_artifact(uri, uri + "-v2")
    head.reconfigure({"artifact": uri + "-v2"})  # a request without a rule: the new artifact's toy rule
    d = c.post("/v1/route", json={"messages": MSG}).json()
    assert (d["policy"], d["floor"]) == ("floor", 0.45) and d["target"] == names[int(floor(0.45).route(P, costs)[0])]


def test_evaluation_sweeps_and_calibrates_the_toy_policy(floor):
    P, val, C = _val()
    sweep = floor.sweep(P, val.Y, C, C)
    for v, a, cost in zip(*sweep):  # each sweep point is what routing with its parameter gives
        assert routing_outcome(val.Y, C, floor(v).route(P, C)) == pytest.approx((a, cost))
    assert np.all(np.diff(sweep[2]) >= 0)
    chosen = choose_operating_point(P, val, C, C, op("floor", target_accuracy="best_single"), floor(0.0))
    assert chosen["policy"] == "floor" and chosen["status"] == "calibrated"
    assert (chosen["tolerance"], chosen["value"]) == (None, None)
    assert chosen["val_accuracy"] >= chosen["target_accuracy"]
    auto = choose_operating_point(P, val, C, C, op(target_accuracy="best_single"), floor(0.0))
    assert [c["policy"] for c in auto["candidates"]] == ["tolerance", "value", "floor"]
    cfg = SimpleNamespace(pauccc_interpolation="linear", savings_threshold=0.5)
    refs = references(val.Y, C, val.targets, 0.5)
    row = score_probabilistic(P, val.Y, C, C, floor(chosen["floor"]), refs, val.targets, cfg)
    assert row["policy"] == "floor" and {"value_policy", "floor_policy"} <= set(row)
    assert set(row["floor_policy"]) >= {"pauccc", "max_gap_closed", "iso_accuracy_savings", "frontier"}
    typed = ProbabilisticScores.model_validate(jsonable({**row, "kind": "probabilistic"}))  # report.json's model
    assert typed.floor_policy.pauccc == pytest.approx(row["floor_policy"]["pauccc"])
    models = [SimpleNamespace(name="prefill-router", probabilistic=True)]
    points = policy_points(models, {"prefill-router": {"val": P, "test": P}}, val, C, C,
                           {"Y": val.Y, "C": C, "C_route": C}, refs)
    assert set(points["routers"]["prefill-router"]) == {"tolerance", "value", "floor"}
    routers = {"prefill-router": {**row, "kind": "probabilistic"}}
    report = {"subsets": {"test": {"references": refs, "routers": routers}}, "policy_operating_points": points}
    md = "\n".join(policy_lines(report))
    assert "## Tolerance, value or floor policy (same predictions)" in md and "| prefill-router | floor |" in md
