"""Prefix sharing for the prefill encoder: a token prefix shared by several prompts runs once.

Prompts whose token ids (after the chat template and truncation, i.e. exactly what the
encoder would feed) begin with the same ``P >= min_shared`` tokens form a *group*
(:func:`prefix_groups`). For each group the truncated model runs the prefix once, batch
1, and keeps its KV cache (a ``DynamicCache``) and, for ``mean`` pooling, the per-layer
sums of the prefix's hidden states (:func:`run_prefix`). Then only the suffixes run,
length-bucketed and batched, with that cache expanded to the batch (views, not copies)
and positions ``P, P + 1, ...`` (:func:`forward_suffixes`). Pooled features of a prompt of
``T`` tokens, suffix ``s = T - P``:

- ``last`` = the hidden state of the suffix's last real token (position ``T - 1``);
- ``mean`` = ``(sum_{t < P} h_t + sum_{P <= t < T} h_t) / T``.

Attention is causal, so the hidden states of positions ``< P`` depend on the prefix only
and both are the full-prompt forward's features up to float reassociation. The layer
convention is :mod:`shared.encoder`'s: layer ``L`` (the last block) is read after the
final norm, which is applied per token, so its prefix sum is a sum of normed states like
the full forward's; every other layer is the raw residual stream. Suffix batches are
always right-padded (the pad sits after each suffix, never between prefix and suffix).

Token states (the encoder's ``token_layers``): the prefix's last ``token_window`` states are
kept once (:attr:`PrefixState.tokens`, keyed by :func:`prefix_key`), each suffix returns its own
last ``token_window``; the window of a prompt is the prefix's tail followed by its suffix's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from shared.batching import to_fp16


@dataclass(frozen=True)
class PrefixGroup:
    """Rows (``members``, ascending) that share their first ``length`` tokens."""

    length: int
    members: tuple[int, ...]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(ids: Sequence[Sequence[int]], min_shared: int | None) -> tuple[list[PrefixGroup], list[int]]:
    """Partition rows into prefix groups (run the prefix once) and unshared rows (run whole).

    The rows are sorted lexicographically by token ids. A group is a contiguous run of
    ``k >= 2`` rows of that order; its shared length is
    ``P = min(min LCP of adjacent rows in the run, min row length in the run - 1)`` (the cap
    leaves every member at least one suffix token) and must be ``>= min_shared``. Tokens
    computed are ``sum(len) - sum over groups of (k - 1) * P``; the runs are chosen by
    dynamic programming to minimise that (optimal over contiguous runs of the sorted
    order, ``O(n * longest run)``). Returns ``(groups, unshared rows)``, both ascending;
    every row index appears exactly once. ``min_shared`` 0 or None: no groups.
    """
    n = len(ids)
    if not min_shared or min_shared <= 0 or n < 2:
        return [], list(range(n))
    order = sorted(range(n), key=lambda i: tuple(ids[i]))
    lcp = [0] + [common_prefix(ids[order[t - 1]], ids[order[t]]) for t in range(1, n)]
    best = [0] * (n + 1)  # best[j]: most tokens saved over the first j sorted rows
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last run, its P) achieving best[j]
    for j in range(n):
        best[j + 1], cut[j + 1] = best[j], (j, 0)  # row j alone
        shared, shortest = len(ids[order[j]]), len(ids[order[j]])
        for i in range(j - 1, -1, -1):
            shared, shortest = min(shared, lcp[i + 1]), min(shortest, len(ids[order[i]]))
            p = min(shared, shortest - 1)
            if p < min_shared:
                break  # p never grows as the run extends to the left
            if best[i] + (j - i) * p > best[j + 1]:
                best[j + 1], cut[j + 1] = best[i] + (j - i) * p, (i, p)
    groups, singles, j = [], [], n
    while j > 0:
        i, p = cut[j]
        rows = sorted(order[i:j])
        if p:
            groups.append(PrefixGroup(p, tuple(rows)))
        else:
            singles.extend(rows)
        j = i
    return sorted(groups, key=lambda g: g.members), sorted(singles)


def tokens_computed(lengths: Sequence[int], groups: Sequence[PrefixGroup]) -> np.ndarray:
    """Tokens the encoder computes per row: the row's suffix, plus the prefix on a group's first member."""
    computed = np.asarray(lengths, dtype=np.int64).copy()
    for group in groups:
        computed[list(group.members)] -= group.length
        computed[group.members[0]] += group.length
    return computed


# --------------------------------------------------------------------------- forward
@dataclass
class PrefixState:
    """A prefix run once: its length, KV cache (batch 1), per-layer hidden-state sums (``mean`` only) and,
    with token layers, its key and the states of its last ``token_window`` tokens ``{layer: (t, D)}`` fp16."""

    length: int
    cache: Any
    sums: dict[int, Any]
    key: str = ""
    tokens: dict[int, Any] | None = None


def prefix_key(ids: Sequence[int]) -> str:
    """A stable name of a token-id prefix: the first 16 hex digits of the SHA-256 of its ids."""
    import hashlib

    return hashlib.sha256(np.asarray(list(ids), dtype=np.int64).tobytes()).hexdigest()[:16]


def run_prefix(encoder: Any, ids: Sequence[int]) -> PrefixState:
    """Forward ``ids`` (batch 1) through ``encoder``'s truncated model, keeping the KV cache."""
    import torch
    from transformers import DynamicCache

    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=encoder.device)
    mask = torch.ones_like(input_ids)
    positions = torch.arange(len(ids), device=encoder.device).unsqueeze(0)
    cache = DynamicCache(config=encoder.base.config)
    with torch.inference_mode():
        states = encoder._run(input_ids, mask, positions, cache=cache)
        sums = {layer: states[layer][0].float().sum(dim=0) for layer in encoder.layers} \
            if "mean" in encoder.poolings else {}
        tokens = {layer: to_fp16(states[layer][0, -encoder.token_window:]).cpu() for layer in encoder.token_layers}
    return PrefixState(len(ids), cache, sums, prefix_key(ids) if tokens else "", tokens or None)


def expand_cache(cache: Any, batch: int) -> Any:
    """A new cache whose layers view ``cache``'s tensors expanded to ``batch`` rows.

    A forward appends with ``torch.cat`` (new tensors), so ``cache`` itself is never modified
    and serves every suffix batch of its group.
    """
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys.expand(batch, -1, -1, -1)
            layer.values = layer.values.expand(batch, -1, -1, -1)
        new.layers.append(layer)
    return new


def forward_suffixes(encoder: Any, state: PrefixState, suffixes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Features ``{column: (B, D) float32}`` of ``prefix + suffix`` for each suffix, computing only the suffixes."""
    import torch

    from shared.batching import PREFIX, TOKENS, pad_batch, window_states
    from shared.features import block_name, pool

    batch, p = len(suffixes), state.length
    input_ids, smask = pad_batch(suffixes, encoder.pad_id, "right")
    mask = torch.cat([torch.ones((batch, p), dtype=torch.long), smask], dim=1)
    positions = p + (smask.cumsum(dim=1) - 1).clamp(min=0)
    input_ids, mask, positions, smask = (t.to(encoder.device) for t in (input_ids, mask, positions, smask))
    out = {}
    with torch.inference_mode():
        states = encoder._run(input_ids, mask, positions, cache=expand_cache(state.cache, batch))
        total = (smask.sum(dim=1, keepdim=True) + p).float()
        for layer in encoder.layers:
            hidden = states[layer]
            for pooling in encoder.poolings:
                if pooling == "last":
                    value = pool(hidden, smask, "last").float()
                else:
                    summed = hidden.float().masked_fill(~smask.bool().unsqueeze(-1), 0.0).sum(dim=1)
                    value = (summed + state.sums[layer]) / total
                out[block_name(layer, pooling)] = value
        if encoder.token_layers:
            out[TOKENS], out[PREFIX] = window_states(states, smask, encoder.token_layers, encoder.token_window), state
    return encoder.with_adapter(encoder.with_next_token(out), p + smask.sum(dim=1))


def encode_suffixes(encoder: Any, state: PrefixState, ids: Sequence[Sequence[int]], members: Sequence[int],
                    store: Callable[[list[int], dict[str, Any], int], None]) -> int:
    """Run the suffixes of rows ``members`` of ``ids`` on ``state`` (their prefix, run once) in
    length buckets; returns the forward passes.

    Suffix buckets follow the encoder's ``batch_size`` and ``max_batch_tokens`` (counted
    over suffix tokens, the tokens computed). ``store(rows, feats, padded)`` receives each
    bucket's features; ``padded`` is the bucket's attention context (prefix + longest suffix).
    """
    from shared.batching import length_buckets

    p = state.length
    suffixes = [ids[i][p:] for i in members]
    lengths = [len(s) for s in suffixes]
    buckets = length_buckets(lengths, encoder.batch_size, encoder.max_batch_tokens)
    for bucket in buckets:
        feats = forward_suffixes(encoder, state, [suffixes[b] for b in bucket])
        store([members[b] for b in bucket], feats, p + max(lengths[b] for b in bucket))
    return len(buckets)


def encode_group(encoder: Any, ids: Sequence[Sequence[int]], group: PrefixGroup,
                 store: Callable[[list[int], dict[str, Any], int], None]) -> int:
    """Run one group: its prefix once, then its suffixes (:func:`encode_suffixes`); returns forward passes."""
    state = run_prefix(encoder, ids[group.members[0]][:group.length])
    return 1 + encode_suffixes(encoder, state, ids, group.members, store)
