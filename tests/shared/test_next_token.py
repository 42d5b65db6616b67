"""The ``next`` block: the encoder's next-token confidence after the prompt (pure parts, then the
real SmolLM2 against its own full forward's logits)."""

import math

import numpy as np
import pytest
import torch

from shared.encoder import Encoder
from shared.policy import Policy
from shared.features import (NEXT_TOKEN_DIMS, block_width, encoder_columns, hidden_poolings, next_token_stats,
                             parse_block, pool)
from tests.shared.test_prefix import conversations


def test_next_token_stats_by_hand():
    uniform = torch.zeros(1, 8)
    peaked = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    got = next_token_stats(torch.cat([uniform[:, :3], peaked]))
    want = [[1 / 3, 0.0, math.log(3)], [0.7, 0.5, -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))]]
    assert got.shape == (2, NEXT_TOKEN_DIMS) and got.dtype == torch.float32
    assert np.allclose(got.numpy(), want, atol=1e-6)
    big = next_token_stats(torch.tensor([[1000.0, 0.0, -1000.0]]))  # no overflow: log-softmax
    assert np.allclose(big.numpy(), [[1.0, 1.0, 0.0]], atol=1e-6)


def test_encoder_columns_next_needs_the_last_layer_and_implies_last():
    assert encoder_columns([3, 30], ["mean", "next"], 30) == ["h3_mean", "h3_last", "h30_mean", "h30_last", "h30_next"]
    assert encoder_columns([30], ["next"], 30) == ["h30_last", "h30_next"]
    assert parse_block("h30_next") == (30, "next")
    assert hidden_poolings(["next", "mean", "last"]) == ["mean", "last"] and hidden_poolings(["mean"]) == ["mean"]
    assert block_width("h30_next", 576) == NEXT_TOKEN_DIMS and block_width("h30_last", 576) == 576
    with pytest.raises(ValueError, match="add 30"):
        encoder_columns([3, 12], ["last", "next"], 30)
    with pytest.raises(ValueError, match="LM head"):
        pool(torch.zeros(1, 2, 4), torch.ones(1, 2), "next")


def full_logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.fixture(scope="module")
def full_stats(smollm) -> np.ndarray:
    """The next-token stats of the full model's last-position logits, prompt by prompt (batch 1, no padding)."""
    ids, _ = Encoder(smollm, [30], ("next",)).tokenize(conversations())
    return next_token_stats(torch.stack([full_logits(smollm, x) for x in ids])).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_next_block_equals_the_models_own_last_logits(smollm, full_stats, side):
    """Padded batches (both sides) and the prefix-shared path give the stats of the full model's
    last-position logits, prompt by prompt."""
    convs = conversations()
    enc = Encoder(smollm, [6, 30], ("next",), batch_size=8, padding_side=side)
    got = enc.encode(convs)
    assert enc.columns == ["h6_last", "h30_last", "h30_next"]
    assert got.features["h30_next"].shape == (len(convs), NEXT_TOKEN_DIMS)
    want = full_stats
    assert np.allclose(got.features["h30_next"], want, atol=2e-4)
    shared = Encoder(smollm, [30], ("next",), batch_size=8, min_shared_prefix=32, padding_side=side).encode(convs)
    assert shared.stats["prefix_groups"] >= 1
    assert np.allclose(shared.features["h30_next"], want, atol=2e-4)
    assert np.ptp(want[:, 0]) > 1e-3, "the prompts' confidences differ, so equality means something"


@pytest.mark.slow
def test_next_needs_the_last_layer_on_a_real_encoder(smollm):
    with pytest.raises(ValueError, match="add 30 .* to layers \\[12\\]"):
        Encoder(smollm, [12], ("last", "next"))


@pytest.mark.slow
@pytest.mark.usefixtures("session_smollm")  # the Encoder replicas below read this SmolLM2 too
def test_an_artifact_reading_a_next_block_serves(smollm, tmp_path):
    """Fit -> artifact -> the serving replicas' plain classes: the Encoder replica computes the
    3-wide h30_next block the artifact names (with the cache on, too), and the head routes on it."""
    import asyncio

    from serving.replicas import EncoderReplica, RouterHeadReplica
    from shared.artifact import ArtifactMeta, save_artifact
    from shared.trunk import FeatureTransform
    from training.loop import TrunkConfig, build_ensemble, train_one

    convs = conversations() * 4
    feats = Encoder(smollm, [6, 30], ("next",), batch_size=8).encode(convs).features
    blocks = {"h6_last": feats["h6_last"], "h30_next": feats["h30_next"]}
    transform = FeatureTransform.fit(blocks, n_components=4)
    assert [b.mean.shape[0] for b in transform.blocks] == [576, NEXT_TOKEN_DIMS]
    X = transform.transform(blocks)
    Y = np.stack([feats["h30_next"][:, 0] > np.median(feats["h30_next"][:, 0]), np.arange(len(convs)) % 2], 1)
    member = train_one(X, Y.astype(np.float32), None, X, Y.astype(np.float32), None, seed=0,
                       cfg=TrunkConfig(max_epochs=3))
    meta = ArtifactMeta(encoder={"name": "smollm2-135m"}, layers=[6, 30],
                        pooling={"h6_last": "last", "h30_next": "next"},
                        targets=[{"name": t, "price_in": 1.0, "price_out": 1.0, "median_output_tokens": 1.0}
                                 for t in ("smollm2-135m", "gemma3-270m")])
    written = save_artifact(str(tmp_path / "router"), meta, transform, build_ensemble([member]))
    assert [b.d_in for b in written.transform.blocks] == [576, NEXT_TOKEN_DIMS]
    for cache in ({}, {"max_mb": 64, "min_tokens": 16, "min_seen": 1}):
        enc = EncoderReplica(artifact=str(tmp_path / "router"), device="cpu", prefix_cache=cache)
        assert enc.encoder.columns == ["h6_last", "h30_last", "h30_next"]
        for _ in range(2):  # with the cache, the second time runs suffixes on a cached prefix
            got = asyncio.run(enc.encode_many(convs[:3]))
            assert all(g.features["h30_next"].shape == (NEXT_TOKEN_DIMS,) for g in got)
            assert np.allclose(np.stack([g.features["h30_next"] for g in got]), feats["h30_next"][:3], atol=2e-4)
        assert any(g.prefix is not None and g.prefix.hit for g in got) == bool(cache)
    decision = RouterHeadReplica(artifact=str(tmp_path / "router")).decide(got[0], Policy.of("tolerance", 0.05))
    assert decision.target in ("smollm2-135m", "gemma3-270m") and set(decision.probabilities) == {
        "smollm2-135m", "gemma3-270m"}
