"""The Encoder replica's prefix cache: a shared prompt prefix is prefilled once, then reused.

Production prompts share long prefixes: a system prompt, a template, few-shot examples.
:class:`PrefixCache` keeps, for such a prefix, the encoder's KV cache and (for ``mean``
pooling) its per-layer hidden-state sums (:class:`shared.prefix.PrefixState`), keyed by the
prefix's exact token ids. A later prompt that begins with a cached prefix runs only its
suffix on that cache (:func:`shared.prefix.forward_suffixes`); its features are the
full-prompt forward's up to float reassociation (see :mod:`shared.prefix`).

What is cached (admission), for a prompt of ``T`` tokens, prefixes of ``P < T`` tokens only:

- **a system prompt**: the tokens the prompt shares with its leading system message
  rendered alone, when ``P >= min_tokens``;
- **a prefix seen ``min_seen`` times**: prefixes are counted at every multiple of
  ``block_tokens`` (a hash chain over blocks, as vLLM counts blocks); the longest one of at
  least ``min_tokens`` counted ``min_seen`` times is cached. The counts are an LRU of at
  most ``history`` prefixes.

Memory: an entry's size is the bytes of its KV tensors and sums. The cache holds at most
``max_bytes``; admitting an entry evicts the least recently used ones until it fits, and
an entry larger than the whole bound is not cached (the prompt runs whole). Lookup tries
the distinct cached lengths, longest first, so a longer shared prefix wins.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from serving.messages import PrefixUse
from shared.prefix import PrefixState, common_prefix, run_prefix

log = logging.getLogger(__name__)


@dataclass
class CacheCounters:
    """Totals over the cache's life (the replica's ``ready()`` reports them)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    tokens_saved: int = 0
    admitted: int = 0
    too_large: int = 0


def state_bytes(state: PrefixState) -> int:
    """Bytes held by a prefix's KV tensors (every cache layer), its hidden-state sums and its kept token
    states (an adapter's or attn blocks' window)."""
    total = sum(t.nbytes for t in state.sums.values()) + sum(t.nbytes for t in (state.tokens or {}).values())
    for layer in state.cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += tensor.nbytes
    return int(total)


@dataclass
class SeenCounter:
    """Counts of token prefixes at multiples of ``block`` tokens, an LRU of at most ``capacity``.

    The key of the prefix of ``k * block`` tokens is the hash chain
    ``h_k = hash((h_{k-1}, ids[(k-1)*block : k*block]))``, ``h_0 = 0``: O(T) per prompt. A
    hash collision can only make a prefix look more common (it is then cached by its exact
    ids), never change a feature.
    """

    block: int
    capacity: int
    counts: OrderedDict[int, int] = field(default_factory=OrderedDict)

    def add(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """Count ``ids``'s block prefixes (the last token excluded); ``[(length, count after), ...]``."""
        out, h = [], 0
        for end in range(self.block, len(ids), self.block):
            h = hash((h, tuple(ids[end - self.block:end])))
            count = self.counts.pop(h, 0) + 1
            self.counts[h] = count
            out.append((end, count))
        while len(self.counts) > self.capacity:
            self.counts.popitem(last=False)
        return out


class PrefixCache:
    """Bounded LRU of prefix KV caches over one :class:`shared.encoder.Encoder`."""

    def __init__(self, encoder: Any, max_bytes: int, min_tokens: int = 64, min_seen: int = 2,
                 block_tokens: int = 16, history: int = 65536):
        if max_bytes <= 0:
            raise ValueError("a prefix cache needs max_bytes > 0 (0 means: no cache, do not build one)")
        self.encoder, self.max_bytes = encoder, int(max_bytes)
        self.min_tokens, self.min_seen = max(1, min_tokens), max(1, min_seen)
        self.seen = SeenCounter(max(1, block_tokens), max(1, history))
        self.entries: OrderedDict[tuple[int, ...], tuple[PrefixState, int]] = OrderedDict()
        self.lengths: Counter[int] = Counter()
        self.bytes = 0
        self.counters = CacheCounters()

    # ------------------------------------------------------------------ lookup and admission
    def lookup(self, ids: Sequence[int]) -> PrefixState | None:
        """The cached state of the longest cached prefix of ``ids`` shorter than ``ids``, or None."""
        for length in sorted(self.lengths, reverse=True):
            if length < len(ids):
                key = tuple(ids[:length])
                if key in self.entries:
                    self.entries.move_to_end(key)
                    return self.entries[key][0]
        return None

    def candidate(self, ids: Sequence[int], system_ids: Sequence[int] | None) -> int:
        """Length of the prefix of ``ids`` to cache (0: none); counts ``ids`` toward the seen rule."""
        counted = self.seen.add(ids)
        if system_ids is not None:
            shared = min(common_prefix(ids, system_ids), len(ids) - 1)
            if shared >= self.min_tokens:
                return shared
        frequent = [end for end, count in counted if count >= self.min_seen and end >= self.min_tokens]
        return max(frequent, default=0)

    def admit(self, prefix: Sequence[int]) -> tuple[PrefixState, int, bool]:
        """Run ``prefix`` once and cache it; ``(state, entries evicted, cached?)``."""
        state = run_prefix(self.encoder, prefix)
        size = state_bytes(state)
        if size > self.max_bytes:
            self.counters.too_large += 1
            return state, 0, False
        evicted = 0
        while self.bytes + size > self.max_bytes:
            key, (old, old_size) = self.entries.popitem(last=False)
            self.bytes -= old_size
            self.lengths[len(key)] -= 1
            if not self.lengths[len(key)]:
                del self.lengths[len(key)]
            evicted += 1
        self.entries[tuple(prefix)] = (state, size)
        self.lengths[len(prefix)] += 1
        self.bytes += size
        self.counters.evictions += evicted
        self.counters.admitted += 1
        return state, evicted, True

    def plan(self, ids: Sequence[int], system_ids: Sequence[int] | None) -> tuple[PrefixState | None, PrefixUse]:
        """The state one prompt's suffix should run on (None: run it whole) and what the cache did.

        A hit counts the prefix's tokens as saved. A miss may admit a prefix of this prompt
        (the prompt then runs on it: the prefix is computed once either way).
        """
        state = self.lookup(ids)
        if state is not None:
            self.counters.hits += 1
            self.counters.tokens_saved += state.length
            return state, PrefixUse(hit=True, tokens_saved=state.length)
        self.counters.misses += 1
        length = self.candidate(ids, system_ids)
        if not length:
            return None, PrefixUse(hit=False)
        state, evicted, cached = self.admit(ids[:length])  # this prompt runs on it even when not cached
        return state, PrefixUse(hit=False, evicted=evicted, admitted=cached)

    # ------------------------------------------------------------------ encoding
    def encode(self, ids: Sequence[Sequence[int]], system_ids: Sequence[Sequence[int] | None]
               ) -> tuple[dict[str, Any], list[PrefixUse]]:
        """Features ``{column: (B, D) float32 numpy}`` of every prompt, in order, and each one's use.

        Prompts on a cached prefix run only their suffixes (batched per prefix, in the
        encoder's length buckets); the others run whole through ``encoder.encode_ids``.
        """
        import numpy as np

        from shared.prefix import encode_suffixes

        out = {c: np.empty((len(ids), *self.encoder.shape(c)), dtype=np.float32) for c in self.encoder.columns}

        def store(rows: list[int], feats: dict[str, Any], _padded: int) -> None:
            for col, tensor in feats.items():
                out[col][rows] = tensor.float().cpu().numpy()

        groups: dict[int, tuple[PrefixState, list[int]]] = {}
        whole, uses = [], []
        for i, row in enumerate(ids):
            state, use = self.plan(row, system_ids[i])
            uses.append(use)
            if state is None:
                whole.append(i)
            else:
                groups.setdefault(id(state), (state, []))[1].append(i)
        if whole:
            feats, _, _ = self.encoder.encode_ids([ids[i] for i in whole])
            for col, values in feats.items():
                out[col][whole] = values
        for state, rows in groups.values():
            encode_suffixes(self.encoder, state, ids, rows, store)
        return out, uses

    def stats(self) -> dict[str, Any]:
        """Entries, bytes held and the life-time counters."""
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                **self.counters.__dict__}


def system_prompt_ids(encoder: Any, messages: list[dict[str, str]]) -> list[int] | None:
    """Token ids of ``messages``'s leading system message rendered alone by the chat template
    (None without one). Only the tokens it shares with the whole prompt are ever used."""
    if not messages or messages[0].get("role") != "system":
        return None
    try:
        text = encoder.tokenizer.apply_chat_template([messages[0]], add_generation_prompt=False, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template that refuses a lone system message (e.g. "roles must
        # alternate"): no system-prompt admission for it; the min_seen rule still caches the shared prefix
        log.debug("chat template cannot render a system message alone (%s): no system-prompt admission", exc)
        return None
    return encoder.tokenizer([text], add_special_tokens=False)["input_ids"][0]
