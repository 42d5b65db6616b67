"""Every router artifact committed under ``data/`` still loads and routes with today's code.

A change to the artifact format, the model class or the registry that would break a shipped
router (the demo's, the RouterBench ones) fails here, not on a user's first request. Each is
checked against the registry: the encoder it names exists and is the pinned file it was
trained on, and its targets' prices are the registry's.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.procs import ROOT

ARTIFACTS = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "data").rglob("meta.json"))


def test_the_shipped_routers_are_all_found():
    assert {"data/router", "data/routerbench/router", "data/routerbench-qwen/router"} <= set(ARTIFACTS)


@pytest.mark.parametrize("path", ARTIFACTS)
def test_a_committed_artifact_loads_and_routes(path):
    from shared.artifact import EncoderInfo, is_artifact, load_artifact, read_meta
    from shared.registry import load_registry

    uri = str(ROOT / path)
    assert is_artifact(uri)
    registry = load_registry()
    spec = registry.encoder(read_meta(uri).encoder.name)
    router = load_artifact(uri, expected_encoder=EncoderInfo(name=spec.name, sha256=spec.sha256, revision=spec.revision))
    meta = router.meta
    assert spec.sha256 and meta.encoder.sha256 == spec.sha256
    for t in meta.targets:
        target = registry.target(t.name)
        assert (t.price_in, t.price_out) == (target.price_input_per_m, target.price_output_per_m), t.name

    rng = np.random.default_rng(0)
    features = {b.name: rng.normal(size=(4, b.d_in)).astype(np.float32) for b in meta.transform.blocks}
    P = router.predict_proba(features)
    assert P.shape == (4, len(meta.targets)) and np.all((P >= 0) & (P <= 1))
    chosen = np.asarray(router.route(P, [200] * 4))
    assert chosen.shape[0] == 4 and np.all((chosen >= 0) & (chosen < len(meta.targets)))


def test_the_routerbench_router_head_routes_by_its_value_operating_point():
    """The shipped RouterBench artifact's operating point is the value policy chosen on val; the
    serving RouterHead (no rule in the request) routes by it and orders fallbacks by net value."""
    from serving.messages import EncodedPrompt
    from serving.replicas import RouterHeadReplica
    from shared.policy import Policy

    head = RouterHeadReplica(artifact=str(ROOT / "data/routerbench/router"))
    rule = head.router.meta.policy.rule()
    assert rule.name == "value" and rule == Policy.of("value", head.router.meta.policy.operating_point.param)
    rng = np.random.default_rng(1)
    feats = {b.name: rng.normal(size=b.d_in).astype(np.float32) for b in head.router.meta.transform.blocks}
    d = head.decide(EncodedPrompt(feats, 900, head.router.meta.encoder.name, "x"), None)
    net = {t: rule.param * d.probabilities[t] - d.expected_cost[t] for t in d.eligible}
    assert (d.policy, d.value, d.tolerance) == ("value", rule.param, None) and d.target == max(net, key=net.get)
    assert list(net.values()) == sorted(net.values(), reverse=True) and len(d.eligible) == 11
    assert head.decide(EncodedPrompt(feats, 900, head.router.meta.encoder.name, "x"), Policy.of("tolerance", 1.0)) \
        .target == min(d.expected_cost, key=d.expected_cost.get)  # a request's own rule wins
