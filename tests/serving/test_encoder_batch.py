"""One prompt's fault never fails its batch-mates in the Encoder replica (real SmolLM2, the
reference artifact): a text its tokenizer cannot read is refused alone, and a forward pass that
fails on one prompt is retried prompt by prompt so only that prompt gets the failure."""

import asyncio

import numpy as np
import pytest

from serving.messages import EncodedPrompt, EncodeFailed, PromptRejected, PromptTooLong
from serving.replicas import EncoderReplica
from tests.serving.serving_fixtures import router_artifact

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("session_smollm")]  # replicas read the session's SmolLM2
GOOD = [[{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Spell cat backwards, then count its letters."}]]
BAD = [{"role": "user", "content": "a\ud800b"}]  # a lone surrogate: no tokenizer reads it


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return router_artifact(tmp_path_factory.mktemp("router"))


def alone(rep: EncoderReplica, conv) -> dict[str, np.ndarray]:
    """The batch-1 forward of one conversation (no batch-mates, no cache)."""
    feats, _, _ = rep.encoder.encode_ids(rep.encoder.token_ids([conv]))
    return {col: v[0] for col, v in feats.items()}


def assert_same_features(encoded: EncodedPrompt, expected: dict[str, np.ndarray]) -> None:
    assert isinstance(encoded, EncodedPrompt), encoded
    for col, value in expected.items():
        np.testing.assert_allclose(encoded.features[col], value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_mb", [0, 32])
def test_an_unreadable_prompt_is_refused_alone_and_its_batch_mates_answered(artifact, cache_mb):
    rep = EncoderReplica(artifact=artifact, max_prompt_tokens=1024, prefix_cache={"max_mb": cache_mb})
    got = asyncio.run(rep.encode_many([GOOD[0], BAD, GOOD[1]]))
    assert isinstance(got[1], PromptRejected) and "cannot tokenize" in got[1].reason
    for conv, encoded in zip(GOOD, (got[0], got[2])):
        assert_same_features(encoded, alone(rep, conv))
    assert isinstance(rep.count_tokens(BAD), PromptRejected)
    assert rep.count_tokens(GOOD[0]).n_tokens == got[0].n_tokens


class FailsOn:
    """The replica's real encoder, whose forward pass raises whenever one given prompt is in it."""

    def __init__(self, encoder, poison: list[int]):
        self.encoder, self.poison, self.calls = encoder, poison, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_ids(self, ids):
        self.calls.append(len(ids))
        if any(list(x) == self.poison for x in ids):
            raise RuntimeError("forward failed on this prompt")
        return self.encoder.encode_ids(ids)


def test_a_forward_that_fails_on_one_prompt_fails_that_prompt_only(artifact):
    rep = EncoderReplica(artifact=artifact, max_prompt_tokens=80)
    poison_conv = [{"role": "user", "content": "This prompt breaks the forward pass."}]
    expected = [alone(rep, conv) for conv in GOOD]
    rep.encoder = FailsOn(rep.encoder, rep.encoder.token_ids([poison_conv])[0])
    long = [{"role": "user", "content": "many words " * 60}]
    got = asyncio.run(rep.encode_many([GOOD[0], poison_conv, long, GOOD[1]]))
    assert got[1] == EncodeFailed("RuntimeError", "forward failed on this prompt")
    assert isinstance(got[2], PromptTooLong)  # refused before any forward, as before
    for encoded, exp in zip((got[0], got[3]), expected):
        assert_same_features(encoded, exp)
    assert rep.encoder.calls == [3, 1, 1, 1]  # the batch, then each of its prompts alone
