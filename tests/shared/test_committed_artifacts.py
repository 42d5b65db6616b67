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


def random_features(meta, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random inputs of every block an artifact reads: ``(n, d_in)`` vectors and, for learned token pooling,
    the Encoder's ``(n, W, k)`` reduced windows (NaN at a short prompt's padded positions)."""
    features = {b.name: rng.normal(size=(n, b.d_in)).astype(np.float32) for b in meta.transform.blocks}
    for b in meta.pooled.blocks if meta.pooled else ():
        window = rng.normal(size=(n, b.window, b.d_out)).astype(np.float32)
        window[:, : b.window // 2] = np.nan
        features[b.name] = window
    return features


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

    features = random_features(meta, np.random.default_rng(0), 4)
    assert sorted(features) == sorted(router.block_names)
    P = router.predict_proba(features)
    assert P.shape == (4, len(meta.targets)) and np.all((P >= 0) & (P <= 1))
    chosen = np.asarray(router.route(P, [200] * 4))
    assert chosen.shape[0] == 4 and np.all((chosen >= 0) & (chosen < len(meta.targets)))


def test_the_routerbench_router_head_routes_by_its_calibrated_operating_point():
    """The shipped RouterBench artifact's operating point is the one calibrated on val (the tolerance policy,
    the cheaper of the two there); the serving RouterHead (no rule in the request) routes by it: the cheapest
    target within the tolerance of the best P(correct), the others within it as fallbacks, cheapest first."""
    from serving.messages import EncodedPrompt
    from serving.replicas import RouterHeadReplica
    from shared.policy import Policy

    head = RouterHeadReplica(artifact=str(ROOT / "data/routerbench/router"))
    meta, op = head.router.meta, head.router.meta.policy.operating_point
    rule = meta.policy.rule()
    assert op.policy == "tolerance" and rule == Policy.of("tolerance", op.param) and 0 < op.param < 1
    feats = {b: x[0] for b, x in random_features(meta, np.random.default_rng(1), 1).items()}
    d = head.decide(EncodedPrompt(feats, 900, meta.encoder.name, "x"), None)
    best = max(d.probabilities.values())
    near = [t for t, p in d.probabilities.items() if p >= best - rule.param - 1e-12]
    assert (d.policy, d.tolerance, d.value) == ("tolerance", rule.param, None) and sorted(d.eligible) == sorted(near)
    assert d.target == min(near, key=d.expected_cost.get)
    assert [d.expected_cost[t] for t in d.eligible] == sorted(d.expected_cost[t] for t in d.eligible)
    assert head.decide(EncodedPrompt(feats, 900, meta.encoder.name, "x"), Policy.of("tolerance", 0.0)) \
        .target == max(d.probabilities, key=d.probabilities.get)  # a request's own rule wins
