"""The Encoder replica's prefix cache: real SmolLM2/Gemma features against the full-prompt forward,
admission (system prompt, seen N times), the memory bound, the 413 limit and the counters."""

import asyncio

import numpy as np
import pytest

from serving.messages import PrefixUse, PromptTooLong
from serving.metrics import RouterMetrics
from serving.prefix_cache import PrefixCache, SeenCounter, state_bytes
from serving.replicas import EncoderReplica
from shared.encoder import Encoder
from tests.serving.serving_fixtures import router_artifact
from tests.shared.test_prefix import FEWSHOT, REL_TOL, max_rel_diff

SYSTEM = ("You are the support assistant of a bicycle shop. Answer in one short sentence, politely, and never "
          "invent prices. The shop opens at nine and closes at six, Monday to Saturday. Repairs take two days. "
          "Rental bikes need an identity document and a deposit. Helmets are free with every rental. ") * 2
QUESTIONS = ["When do you open on Saturday?", "How long does a brake repair take?",
             "Do I need a deposit to rent a bike?", "Is a helmet included with a rental?"]


def chat(question: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return router_artifact(tmp_path_factory.mktemp("router"))


def replica(artifact, **cache):
    return EncoderReplica(artifact=artifact, max_prompt_tokens=1024, prefix_cache=cache or None)


def full_features(rep: EncoderReplica, convs) -> dict[str, np.ndarray]:
    """The cache-free, batch-1 full-prompt forward of each conversation."""
    rows = [rep.encoder.encode_ids(rep.encoder.token_ids([c]))[0] for c in convs]
    return {col: np.concatenate([r[col] for r in rows]) for col in rep.encoder.columns}


def stacked(results) -> dict[str, np.ndarray]:
    return {col: np.stack([r.features[col] for r in results]) for col in results[0].features}


async def encode_all(rep, convs, batch: bool):
    return await rep.encode_many(convs) if batch else [await rep.encode(c) for c in convs]


# --------------------------------------------------------------------------- pure logic
def test_seen_counter_counts_block_prefixes_and_stays_bounded():
    seen = SeenCounter(block=4, capacity=6)
    assert seen.add(list(range(10))) == [(4, 1), (8, 1)]  # the last token is never part of a prefix
    assert seen.add(list(range(8)) + [99, 98]) == [(4, 2), (8, 2)]
    assert seen.add(list(range(4)) + [7, 7, 7, 7, 1]) == [(4, 3), (8, 1)]
    for k in range(10):
        seen.add([k + 100] * 9)
    assert len(seen.counts) == 6


def test_metrics_count_prefix_uses():
    m = RouterMetrics.create()
    for use in (PrefixUse(hit=False, admitted=True), PrefixUse(hit=True, tokens_saved=120),
                PrefixUse(hit=False, evicted=2, admitted=True), None):
        m.count_prefix(use)
    text = m.render().decode()
    for line in ("prefill_router_prefix_cache_hits_total 1.0", "prefill_router_prefix_cache_misses_total 2.0",
                 "prefill_router_prefix_cache_evictions_total 2.0",
                 "prefill_router_prefix_cache_tokens_saved_total 120.0"):
        assert line in text


# --------------------------------------------------------------------------- real encoder
@pytest.mark.slow
@pytest.mark.usefixtures("session_smollm")  # each replica reads the session's SmolLM2
@pytest.mark.parametrize("batch", [False, True])
def test_system_prompt_hits_equal_the_full_forward(artifact, batch):
    asyncio.run(check_system_prompt_hits_equal_the_full_forward(artifact, batch))


async def check_system_prompt_hits_equal_the_full_forward(artifact, batch):
    rep = replica(artifact, max_mb=64)
    convs = [chat(q) for q in QUESTIONS]
    first = await rep.encode(convs[0])
    assert first.prefix == PrefixUse(hit=False, admitted=True)
    results = await encode_all(rep, convs[1:], batch)
    saved = results[0].prefix.tokens_saved
    assert all(r.prefix.hit and r.prefix.tokens_saved == saved for r in results) and saved >= 64
    assert saved < min(r.n_tokens for r in results)
    full = full_features(rep, convs)
    got = stacked([first, *results])
    assert max_rel_diff(got, full, rep.encoder.columns) <= REL_TOL
    # the questions differ only after the cached prefix: different features, each its own forward's
    for col in rep.encoder.columns:
        err = np.abs(got[col] - full[col]).max()
        assert min(np.abs(got[col][i] - got[col][j]).max() for i in range(4) for j in range(i)) > 50 * err + 1e-6
    stats = rep.ready()["prefix_cache"]
    assert stats["hits"] == 3 and stats["misses"] == 1 and stats["entries"] == 1
    assert stats["tokens_saved"] == 3 * saved and 0 < stats["bytes"] <= stats["max_bytes"]


@pytest.mark.slow
@pytest.mark.usefixtures("session_smollm")  # each replica reads the session's SmolLM2
def test_cache_off_is_the_plain_forward_byte_for_byte(artifact):
    asyncio.run(check_cache_off_is_the_plain_forward_byte_for_byte(artifact))


async def check_cache_off_is_the_plain_forward_byte_for_byte(artifact):
    off, on = replica(artifact), replica(artifact, max_mb=64)
    convs = [chat(q) for q in QUESTIONS[:2]] + [[{"role": "user", "content": "Spell cat backwards."}]]
    plain = off.encoder.encode_ids(off.encoder.token_ids(convs))[0]
    got = await off.encode_many(convs)
    assert off.cache is None and off.ready()["prefix_cache"] is None
    assert all(r.prefix is None for r in got)
    for col, values in plain.items():
        assert np.array_equal(np.stack([r.features[col] for r in got]), values)
    # with the cache on, a prompt that shares nothing runs the same plain forward
    alone = await on.encode(convs[2])
    assert alone.prefix == PrefixUse(hit=False)
    single = off.encoder.encode_ids(off.encoder.token_ids(convs[2:]))[0]
    for col in plain:
        assert np.array_equal(alone.features[col], single[col][0])


@pytest.mark.slow
@pytest.mark.usefixtures("session_smollm")  # each replica reads the session's SmolLM2
def test_a_prefix_seen_twice_is_cached_at_a_block_boundary(artifact):
    asyncio.run(check_a_prefix_seen_twice_is_cached_at_a_block_boundary(artifact))


async def check_a_prefix_seen_twice_is_cached_at_a_block_boundary(artifact):
    rep = replica(artifact, max_mb=64, min_tokens=64, min_seen=2, block_tokens=16)
    convs = [[{"role": "user", "content": FEWSHOT + f"Question: {q}\nAnswer:"}] for q in QUESTIONS]
    uses = [(await rep.encode(c)).prefix for c in convs]
    assert uses[0] == PrefixUse(hit=False) and uses[1] == PrefixUse(hit=False, admitted=True)
    assert uses[2].hit and uses[3].hit and uses[2].tokens_saved % 16 == 0 and uses[2].tokens_saved >= 64
    got = stacked([await rep.encode(c) for c in convs])  # all four hit now
    assert max_rel_diff(got, full_features(rep, convs), rep.encoder.columns) <= REL_TOL


@pytest.mark.slow
@pytest.mark.usefixtures("session_smollm")  # each replica reads the session's SmolLM2
def test_memory_bound_evicts_and_limit_still_refuses(artifact):
    asyncio.run(check_memory_bound_evicts_and_limit_still_refuses(artifact))


async def check_memory_bound_evicts_and_limit_still_refuses(artifact):
    probe = replica(artifact, max_mb=64)
    await probe.encode(chat(QUESTIONS[0]))
    one = next(iter(probe.cache.entries.values()))[1]
    rep = replica(artifact, max_mb=1.5 * one / 2**20)  # room for one such entry, not two
    systems = [SYSTEM, SYSTEM.replace("bicycle", "tandem"), SYSTEM.replace("bicycle", "scooter")]
    uses = [(await rep.encode(chat(QUESTIONS[1], s))).prefix for s in systems]
    assert [u.admitted for u in uses] == [True, True, True] and [u.evicted for u in uses] == [0, 1, 1]
    stats = rep.cache.stats()
    assert stats["entries"] == 1 and stats["evictions"] == 2 and stats["bytes"] <= stats["max_bytes"]
    assert (await rep.encode(chat(QUESTIONS[2], systems[2]))).prefix.hit  # the survivor is the latest
    assert not (await rep.encode(chat(QUESTIONS[2], systems[0]))).prefix.hit

    tiny = replica(artifact, max_mb=0.01)  # smaller than any entry: computed for the prompt, never kept
    res = await tiny.encode(chat(QUESTIONS[0]))
    assert res.prefix == PrefixUse(hit=False) and tiny.cache.stats()["too_large"] == 1
    assert tiny.cache.stats()["entries"] == 0 and tiny.cache.bytes == 0
    assert max_rel_diff(stacked([res]), full_features(tiny, [chat(QUESTIONS[0])]), tiny.encoder.columns) <= REL_TOL

    long = chat("Tell me about the shop. " * 400)
    refused = await rep.encode(long)
    assert isinstance(refused, PromptTooLong) and refused.n_tokens > 1024
    assert rep.cache.stats()["misses"] == stats["misses"] + 1, "a refused prompt never reaches the cache"


@pytest.mark.slow
def test_gemma_hits_past_its_sliding_window_equal_the_full_forward(gemma):
    """Gemma-3's sliding-window layers: a cached prefix longer than the 512-token window, reused twice."""
    from serving.prefix_cache import system_prompt_ids

    # blocks 1-3 are sliding-window layers (window 512): depth 3 exercises them at a third of the cost
    enc = Encoder(gemma, [0, 3], ("last", "mean"))
    cache = PrefixCache(enc, 256 * 2**20)
    convs = [chat(q, SYSTEM * 5) for q in QUESTIONS[:3]]  # about 600 tokens
    ids = enc.token_ids(convs)
    systems = [system_prompt_ids(enc, c) for c in convs]
    feats, uses = cache.encode(ids[:1], systems[:1])
    rest, more = cache.encode(ids[1:], systems[1:])
    assert uses[0].admitted and all(u.hit and u.tokens_saved > 512 for u in more)
    got = {c: np.concatenate([feats[c], rest[c]]) for c in feats}
    full = {c: np.concatenate([enc.encode_ids([x])[0][c] for x in ids]) for c in feats}
    assert max_rel_diff(got, full, enc.columns) <= REL_TOL
    entry = next(iter(cache.entries.values()))
    assert entry[1] == state_bytes(entry[0]) == cache.bytes


def test_a_template_that_refuses_a_lone_system_message_falls_back_to_the_seen_rule():
    from serving.prefix_cache import system_prompt_ids

    class Strict:
        def apply_chat_template(self, messages, **kwargs):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    class Enc:
        tokenizer = Strict()

    assert system_prompt_ids(Enc(), chat("hello")) is None
    assert system_prompt_ids(Enc(), [{"role": "user", "content": "hi"}]) is None
