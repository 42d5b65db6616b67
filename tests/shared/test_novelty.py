"""The novelty gate (shared.novelty): its score, its calibration, and a real artifact routing by it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from shared.novelty import NoveltyGate, apply_gate, block_novelty, block_variances, calibrate, novelty, reduced_blocks
from tests.procs import ROOT
from tests.shared.test_committed_artifacts import random_features


def test_block_novelty_of_vectors_and_of_windows_by_hand():
    z = np.array([[1.0, 2.0], [0.0, 0.0]])
    assert block_novelty(z, [1.0, 4.0]).tolist() == [1.0, 0.0]  # (1/1 + 4/4) / 2
    windows = np.array([[[1.0, 2.0], [3.0, 0.0], [np.nan, np.nan]],
                        [[np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan]]])
    got = block_novelty(windows, [1.0, 4.0])
    assert got[0] == pytest.approx((1.0 + 4.5) / 2) and np.isnan(got[1])  # padded rows ignored; none: NaN
    blocks = {"a": z, "b": 2 * z}
    assert novelty(blocks, {"a": [1.0, 4.0], "b": [4.0, 16.0]}).tolist() == [1.0, 0.0]


def test_variances_skip_padded_tokens():
    windows = np.array([[[1.0, 0.0], [3.0, 2.0], [np.nan, np.nan]]])
    assert block_variances({"w": windows})["w"] == [1.0, 1.0]


def test_calibrated_gate_passes_its_quantile_and_stops_a_shifted_cluster():
    rng = np.random.default_rng(0)
    train, calib, fresh = ({"x": rng.normal(size=(n, 8))} for n in (2000, 2000, 2000))
    gate = calibrate(train, calib, prior=np.array([0.2, 0.7, 0.5]), prior_source="test", quantile=0.95)
    assert gate.n_calibration == 2000 and np.mean(novelty(calib, gate.variances) > gate.threshold) == pytest.approx(
        0.05, abs=0.002)
    assert np.mean(novelty(fresh, gate.variances) > gate.threshold) == pytest.approx(0.05, abs=0.02)
    shifted = {"x": rng.normal(size=(500, 8)) + 3.0}
    assert np.mean(novelty(shifted, gate.variances) > gate.threshold) > 0.99


def test_apply_gate_replaces_only_novel_rows_with_the_prior():
    gate = NoveltyGate(quantile=0.9, threshold=2.0, variances={"x": [1.0]}, prior=[0.1, 0.9], prior_source="t",
                       n_calibration=10)
    P = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    gated, novel = apply_gate(P, np.array([1.0, 5.0, np.nan]), gate)
    assert novel.tolist() == [False, True, False]
    assert gated.tolist() == [[0.8, 0.2], [0.1, 0.9], [0.6, 0.4]]
    assert apply_gate(P, None, None)[1].tolist() == [False] * 3
    with pytest.raises(ValueError, match="prior has 2 targets"):
        apply_gate(np.ones((1, 3)), np.array([9.0]), gate)


@pytest.mark.parametrize("path", ["data/routerbench/router", "data/routerdc/router"])
def test_a_shipped_artifact_with_a_gate_routes_unusual_prompts_by_its_prior(path, tmp_path):
    """Vector blocks (RouterBench) and an attention-pooled block (RouterDC): the gate is written into meta.json,
    read back, and a prompt far from the calibration rows gets the prior; typical ones keep their prediction."""
    from shared.artifact import load_artifact, update_meta

    uri = tmp_path / "router"
    shutil.copytree(ROOT / path, uri)
    router = load_artifact(str(uri))
    rng = np.random.default_rng(0)
    train, calib = (random_features(router.meta, rng, 400) for _ in range(2))
    T = len(router.target_names)
    prior = np.linspace(0.1, 0.9, T)
    gate = calibrate(reduced_blocks(router.transform, train), reduced_blocks(router.transform, calib), prior,
                     "test", quantile=0.9)
    update_meta(str(uri), policy=router.meta.policy.model_copy(update={"novelty": gate}))
    gated = load_artifact(str(uri))
    assert gated.meta.policy.novelty == gate and gated.meta.policy.operating_point == router.meta.policy.operating_point

    typical = random_features(router.meta, rng, 200)
    far = {k: v * 6.0 for k, v in random_features(router.meta, rng, 50).items()}
    P, novel = gated.predict(typical)
    assert 0.02 < novel.mean() < 0.25  # about the 10% the quantile lets through
    np.testing.assert_allclose(P[~novel], router.predict_proba(typical)[~novel])
    P, novel = gated.predict(far)
    assert novel.all() and np.allclose(P, prior)
    assert gated.route(P, np.full(50, 100.0)).tolist() == gated.route(prior[None].repeat(50, 0), np.full(50, 100.0)).tolist()


def test_the_routerdc_router_head_says_when_its_gate_decided():
    """The shipped RouterDC artifact carries a gate; the serving RouterHead marks a decision it made (``novel``),
    which then goes to the prior's best target (dolphin-2.9-llama3-8b: argmax, equal prices); a prompt of the kind
    it was calibrated on keeps its own prediction."""
    from serving.messages import EncodedPrompt
    from serving.replicas import RouterHeadReplica

    head = RouterHeadReplica(artifact=str(ROOT / "data/routerdc/router"))
    meta = head.router.meta
    gate = meta.policy.novelty
    assert gate is not None and gate.quantile == 0.99 and len(gate.prior) == len(meta.targets)
    rng = np.random.default_rng(0)
    typical = {b: x * 0.0 for b, x in random_features(meta, rng, 1).items()}  # reduced values at their mean (0)
    far = {b: x * 50.0 for b, x in random_features(meta, rng, 1).items()}
    calm = head.decide(EncodedPrompt({b: x[0] for b, x in typical.items()}, 50, meta.encoder.name, "x"), None)
    wild = head.decide(EncodedPrompt({b: x[0] for b, x in far.items()}, 50, meta.encoder.name, "x"), None)
    assert not calm.novel and wild.novel
    assert wild.target == meta.targets[int(np.argmax(gate.prior))].name == "dolphin-2.9-llama3-8b"
    assert list(wild.probabilities.values()) == pytest.approx(gate.prior)
    assert wild.model_dump()["novel"] is True
