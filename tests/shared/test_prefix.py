"""Prefix-shared prefill: the grouping (pure) and its features against the full-prompt forward (real models)."""

import numpy as np
import pyarrow as pa
import pytest

from training.capture.run import pending_table
from shared.encoder import Encoder
from shared.prefix import PrefixGroup, common_prefix, prefix_groups, tokens_computed

# fp32 tolerance of prefix-shared features against the full-prompt forward, relative to the
# column's largest magnitude: |shared - full| <= REL_TOL * max|full| (README of bench/ has
# the measured figures: at most 5.5e-7 relative on both encoders).
REL_TOL = 1e-5

FEWSHOT = ("You answer science questions. Reply with the letter of the correct choice only.\n\n"
           "Question: Which gas do plants take in for photosynthesis? A) oxygen B) carbon dioxide C) helium "
           "D) nitrogen\nAnswer: B\n\n"
           "Question: What is the boiling point of water at sea level? A) 50 C B) 90 C C) 100 C D) 120 C\n"
           "Answer: C\n\n"
           "Question: Which planet is closest to the Sun? A) Venus B) Earth C) Mars D) Mercury\nAnswer: D\n\n")


def conversations(prefix: str = FEWSHOT) -> list[list[dict[str, str]]]:
    user = [prefix + "Question: Which organ pumps blood through the body? A) lungs B) heart C) liver D) skin\nAnswer:",
            prefix + "Question: What do bees make? A) milk B) silk C) honey D) wax paper\nAnswer:",
            prefix + "Question: What do bees make? A) milk B) silk C) honey D) wax cups\nAnswer:",  # differs at the end
            "Spell 'cat' backwards.",  # shares no prefix
            prefix + "Question: Which organ pumps blood through the body? A) lungs B) heart C) liver D) skin\nAnswer:"]
    return [[{"role": "user", "content": u}] for u in user]


# --------------------------------------------------------------------------- grouping (pure)
def check_partition(ids, groups, singles, min_shared):
    rows = sorted([i for g in groups for i in g.members] + singles)
    assert rows == list(range(len(ids)))
    for g in groups:
        assert len(g.members) >= 2 and g.length >= min_shared and list(g.members) == sorted(g.members)
        assert all(len(ids[i]) > g.length for i in g.members), "every member keeps a suffix token"
        assert len({tuple(ids[i][:g.length]) for i in g.members}) == 1


def test_prefix_groups_partition_and_cap():
    rng = np.random.default_rng(0)
    head = rng.integers(0, 50, size=80).tolist()
    ids = [head + rng.integers(0, 50, size=int(n)).tolist() for n in rng.integers(1, 30, size=12)]
    ids += [rng.integers(0, 50, size=40).tolist() for _ in range(5)]  # unshared
    ids += [head[:70], head[:70]]  # identical prompts, both a prefix of the others
    groups, singles = prefix_groups(ids, 64)
    check_partition(ids, groups, singles, 64)
    assert set(range(12, 17)) <= set(singles)
    grouped = {i for g in groups for i in g.members}
    assert set(range(12)) | {17, 18} <= grouped
    assert min(g.length for g in groups) == 69, "capped at the shortest member's length - 1"
    computed = tokens_computed([len(x) for x in ids], groups)
    assert computed.sum() == sum(len(x) for x in ids) - sum((len(g.members) - 1) * g.length for g in groups)
    assert (computed >= 1).all()


def test_prefix_groups_off_and_too_short():
    ids = [[1] * 100 + [2], [1] * 100 + [3]]
    assert prefix_groups(ids, 0) == ([], [0, 1]) and prefix_groups(ids, None) == ([], [0, 1])
    assert prefix_groups(ids, 101) == ([], [0, 1])
    assert prefix_groups(ids, 100) == ([PrefixGroup(100, (0, 1))], [])
    assert prefix_groups([[1] * 100], 4) == ([], [0])


def test_prefix_groups_prefer_the_split_that_saves_most():
    """Three rows share 10 tokens, a fourth only 5: one group of 4 at P=5 saves 15, the split saves 20."""
    long = [[1] * 10 + [k, 9] for k in (2, 3, 4)]
    short = [[1] * 5 + [7, 7, 7, 7, 7, 7]]
    groups, singles = prefix_groups(short + long, 4)
    assert groups == [PrefixGroup(10, (1, 2, 3))] and singles == [0]
    assert common_prefix([1, 2, 3], [1, 2]) == 2 and common_prefix([], [1]) == 0


def test_pending_table_sorts_by_prompt_within_shards_only():
    prompts = ["b", "a", "d", "c", "a", "z", "b"]
    table = pa.table({"query_id": [f"q{i}" for i in range(7)], "split": ["train"] * 7,
                      "messages": [[{"role": "user", "content": p}] for p in prompts]})
    plain = pending_table(table, 3, set())
    assert plain.column("_row").to_pylist() == list(range(7))
    ordered = pending_table(table, 3, {1}, by_prompt=True)
    assert ordered.column("_row").to_pylist() == [1, 0, 2, 6]
    assert ordered.column("_shard").to_pylist() == [0, 0, 0, 2]
    assert ordered.column("query_id").to_pylist() == ["q1", "q0", "q2", "q6"]


# --------------------------------------------------------------------------- features (real models)
def max_rel_diff(shared, full, columns) -> float:
    return max(float(np.abs(shared[c] - full[c]).max() / np.abs(full[c]).max()) for c in columns)


def compare(lm, layers, convs, min_shared=32, batch_size=8):
    """Shared (batched suffixes) and full-prompt (batch 1, no sharing) features of ``convs``."""
    shared_enc = Encoder(lm, layers, ("last", "mean"), batch_size=batch_size, min_shared_prefix=min_shared)
    full_enc = Encoder(lm, layers, ("last", "mean"), batch_size=1)
    shared, full = shared_enc.encode(convs), full_enc.encode(convs)
    assert shared.stats["prefix_groups"] >= 1 and shared.stats["computed_tokens"] < shared.stats["tokens"]
    assert int(shared.computed.sum()) == shared.stats["computed_tokens"]
    assert full.stats["computed_tokens"] == full.stats["tokens"] and full.computed.tolist() == full.n_tokens.tolist()
    return shared, full, shared_enc.columns


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[0, 5, 30], [3, 12]])
def test_shared_prefix_features_equal_full_forward_smollm(smollm, layers):
    shared, full, columns = compare(smollm, layers, conversations())
    assert max_rel_diff(shared.features, full.features, columns) <= REL_TOL
    assert_differ_after_prefix(shared.features, full.features, columns)
    ids, _ = Encoder(smollm, [1]).tokenize(conversations())
    assert prefix_groups(ids, 32)[1] == [3], "the unshared prompt runs whole, the others share their prefix"


def assert_differ_after_prefix(shared, full, columns):
    """Rows 1 and 2 differ only after the prefix: each is its own full forward's, and they differ
    from each other by far more than that error."""
    for col in columns:
        err = np.abs(shared[col][1:3] - full[col][1:3]).max()
        assert err <= REL_TOL * np.abs(full[col]).max(), col
        if col != "h0_last":  # same last token: the embedding output cannot differ
            assert np.abs(shared[col][1] - shared[col][2]).max() > max(50 * err, 1e-6), col


@pytest.mark.slow
def test_shared_prefix_batching_and_one_at_a_time_agree(smollm):
    convs = conversations()
    one = Encoder(smollm, [8], ("last", "mean"), batch_size=1, min_shared_prefix=32).encode(convs)
    many = Encoder(smollm, [8], ("last", "mean"), batch_size=8, min_shared_prefix=32).encode(convs)
    assert one.stats["forward_passes"] > many.stats["forward_passes"]
    assert max_rel_diff(many.features, one.features, ["h8_last", "h8_mean"]) <= REL_TOL


@pytest.mark.slow
def test_shared_prefix_features_equal_full_forward_gemma(gemma):
    """Gemma-3: layer 18 is the last block (final norm); the prefix outgrows the sliding window."""
    window = getattr(gemma.model.config, "sliding_window", None) or 0
    prefix = FEWSHOT
    while len(gemma.tokenizer(prefix, add_special_tokens=False)["input_ids"]) <= window + 16:
        prefix += FEWSHOT
    shared, full, columns = compare(gemma, [0, 9, 18], conversations(prefix))
    assert max_rel_diff(shared.features, full.features, columns) <= REL_TOL
    assert_differ_after_prefix(shared.features, full.features, columns)


@pytest.mark.slow
def test_gemma_token_states_beyond_float16_are_clipped_not_inf(gemma):
    """Gemma-3-270M's first token reaches ~1e5 at layer 12, past float16's 65504: stored as fp16 it became inf in
    a RouterDC capture (5,456 values) and every token PCA and loss over it NaN. Token states, own and a shared
    prefix's, are finite and clipped at 65504; the float32 pooled blocks are not clipped."""
    enc = Encoder(gemma, [12], ("last", "mean"), token_layers=[12], token_window=512, min_shared_prefix=32)
    result = enc.encode(conversations())
    states = [np.asarray(t[12], dtype=np.float32) for t in result.tokens]
    states += [np.asarray(p[12], dtype=np.float32) for p in result.prefixes.values()]
    assert result.prefixes and all(np.isfinite(s).all() for s in states)
    assert max(float(np.abs(s).max()) for s in states) == 65504.0  # the clip was needed, and held
    assert np.isfinite(result.features["h12_mean"]).all()
