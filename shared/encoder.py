"""Prefill-only encoder: pooled hidden states of a registry LLM at chosen layers.

Layer index convention (the one Hugging Face's ``hidden_states`` uses):

- index ``0`` is the **embedding output** (``model.model.embed_tokens``, scaled where
  the architecture scales it, e.g. Gemma), before any decoder block;
- index ``i`` (``1 <= i <= L``) is the output of decoder block ``i``;
- index ``L`` (the last block) has the model's **final norm applied**, exactly like HF's
  ``hidden_states[L]``; every other index is the raw residual stream.

The encoder runs the prompt's prefill only and **stops at the deepest requested layer**:
it calls the base model (no ``lm_head``) with its decoder stack truncated to the first
``k = max(layers)`` blocks, and with the final norm replaced by identity unless
``k == L``; the requested layers are read by temporary forward hooks. The loaded model is not modified (the truncated base model is a shallow view
that shares its parameters), so one loaded model can back several encoders.

Prompts are rendered with the tokenizer's chat template
(``apply_chat_template(messages, add_generation_prompt=True)``), truncated to the
*last* ``max_tokens`` tokens (the generation prompt and the end of the question are what
``last`` pooling reads), sorted by length and cut into buckets of similar length so a
forward pass pads little. Pooling: ``last`` is the hidden state of the last real token,
``mean`` the mean over the real tokens; padding (left or right) is masked out. ``next``
(only with the last layer ``L`` among the layers; it implies ``last``) is the model's LM head
over ``h{L}_last`` summarised by :func:`shared.features.next_token_stats`: block ``h{L}_next``.

Prefix sharing (``min_shared_prefix`` > 0, off by default): prompts of one ``encode``
call that share their first ``min_shared_prefix`` or more tokens run that prefix once and
then only their suffixes (:mod:`shared.prefix`); the features equal the full forward's
up to float reassociation. Unshared prompts go the length-bucket way above.

Token states (``token_layers``, off by default): the encoder also returns, per prompt, the
hidden states of its last ``token_window`` real tokens at each token layer (the input of an
``h{layer}_attn`` block, :mod:`shared.pooling`), as fp16 ``(t, D)`` arrays, ``t <= token_window``.
A prefix-shared prompt returns only its suffix's (last ``token_window``) states and refers to
its prefix (``Encoded.prefix_keys``), whose last ``token_window`` states are returned once per
prefix (``Encoded.prefixes``); :func:`shared.pooling.assemble_window` rebuilds the window.

Adapted blocks (``adapter``, a :class:`shared.adapter.AdaptedTop`): the encoder keeps the last ``window``
states of the adapter's ``from_layer`` (as token states, fp16, exactly as a capture stores them), runs the
adapter over each prompt's window and adds its blocks (``h{L+k}a{L}_{pooling}``) to the features; the token
states themselves are not returned. A prefix-shared prompt (here or in the serving prefix cache) assembles
its window from the prefix's states and its suffix's, so the frozen part still runs its prefix once.
``layers`` may then be empty (only adapted blocks).

Attn blocks (``attn``, a :class:`shared.pooled_head.TokenReducer`): likewise the encoder keeps the last
``window`` states of each attn layer, assembles each prompt's window (prefix-shared prompts too) and returns,
per ``h{layer}_attn`` block, the window reduced by the block's frozen token transform, ``(W, k)`` float32 per
prompt with NaN on padded rows (:func:`shared.pooling.reduce_window`); the router head pools it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from shared.batching import PREFIX, TOKENS, length_buckets, pad_batch, window_states
from shared.errors import BadInput
from shared.features import block_name, block_width, encoder_columns, hidden_poolings, next_token_stats, pool


def resolve_layers(layers: Sequence[int] | str, num_layers: int, model_name: str = "encoder") -> list[int]:
    """Sorted unique layer indices; ``"all"`` is ``0..L``. Raises ValueError on an index out of range."""
    if layers == "all":
        return list(range(num_layers + 1))
    if isinstance(layers, str):
        raise BadInput(f"layers must be a list of ints or 'all', got {layers!r}")
    bad = [i for i in layers if not 0 <= int(i) <= num_layers]
    if bad:
        raise BadInput(
            f"unknown layer(s) {bad}: {model_name} has {num_layers} decoder blocks; valid indices are "
            f"0 (embedding output) to {num_layers} (last block, final norm applied)"
        )
    if not layers:
        raise BadInput("layers is empty: name at least one layer index")
    return sorted({int(i) for i in layers})


@dataclass
class Encoded:
    """Result of :meth:`Encoder.encode`: ``features[column] -> (n, hidden)`` float32 arrays."""

    features: dict[str, np.ndarray]
    n_tokens: np.ndarray  # tokens fed to the model per prompt (after truncation)
    truncated: np.ndarray  # bool: prompt was longer than max_tokens
    padded: np.ndarray  # padded length of the forward batch each prompt ran in
    stats: dict[str, float] = field(default_factory=dict)
    computed: np.ndarray | None = None  # tokens computed per prompt (a shared prefix counts on one prompt)
    tokens: list[dict[int, np.ndarray]] | None = None  # per prompt {token layer: (t, D) fp16}, its own last tokens
    prefix_keys: list[str] | None = None  # per prompt: the key of the prefix its window continues, or ""
    prefixes: dict[str, dict[int, np.ndarray]] | None = None  # {prefix key: {token layer: (t, D) fp16}}


class Encoder:
    """Prefill-only feature extractor over a loaded causal LM (:class:`shared.models.LoadedModel`)."""

    def __init__(self, loaded: Any, layers: Sequence[int] | str, poolings: Sequence[str] = ("last",),
                 max_tokens: int = 2048, batch_size: int = 8, max_batch_tokens: int | None = None,
                 padding_side: str = "right", min_shared_prefix: int | None = None,
                 token_layers: Sequence[int] = (), token_window: int = 256, adapter: Any = None, attn: Any = None):
        if padding_side not in ("left", "right"):
            raise BadInput(f"padding_side must be left or right, got {padding_side!r}")
        self.loaded, self.tokenizer, self.device = loaded, loaded.tokenizer, loaded.device
        self.num_layers, self.hidden_size = loaded.num_layers, loaded.hidden_size
        self.adapter, self.attn = adapter, attn
        if attn is not None:
            if token_layers or adapter is not None:
                raise BadInput("an encoder for attn blocks returns their reduced windows: drop token_layers/adapter")
            token_layers, token_window = attn.layers, attn.window
        if adapter is not None:
            if token_layers:
                raise BadInput("an encoder with an adapter returns adapted blocks, not token states: drop token_layers")
            token_layers, token_window = [adapter.spec.from_layer], adapter.spec.window
        self.emit_tokens = adapter is None and attn is None and bool(token_layers)
        derived = (adapter.block_names if adapter else []) + (attn.block_names if attn else [])
        self.layers = resolve_layers(layers, self.num_layers, loaded.spec.name) if layers or not derived else []
        self._columns = (encoder_columns(self.layers, poolings, self.num_layers) if self.layers else []) + derived
        self.next_token = "next" in poolings
        self.poolings = hidden_poolings(poolings)  # what the forward pools; 'next' is derived from h{L}_last
        self.head = loaded.model.get_output_embeddings() if self.next_token else None
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.max_batch_tokens, self.padding_side = max_batch_tokens, padding_side
        self.min_shared_prefix = min_shared_prefix or 0
        self.token_layers = resolve_layers(list(token_layers), self.num_layers, loaded.spec.name) if token_layers \
            else []
        if token_window <= 0:
            raise BadInput(f"token_window must be positive, got {token_window}")
        self.token_window = int(token_window)
        self.depth = max(self.layers + self.token_layers)
        self.base = truncated_base(loaded.model, self.depth)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_registry(cls, name: str, layers: Sequence[int] | str, registry_path: str | None = None,
                      device: str | None = None, **kwargs: Any) -> "Encoder":
        from shared.models import load_causal_lm
        from shared.registry import load_registry

        spec = load_registry(registry_path).encoder(name)
        return cls(load_causal_lm(spec, device=device), layers, **kwargs)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def width(self, column: str) -> int:
        """Features per row of ``column`` (:func:`shared.features.block_width`)."""
        return block_width(column, self.hidden_size)

    def shape(self, column: str) -> tuple[int, ...]:
        """One prompt's value of ``column``: ``(width,)``, or ``(W, k)`` for an attn block."""
        return self.attn.shape(column) if self.attn is not None and column in self.attn.block_names \
            else (self.width(column),)

    def with_next_token(self, feats: dict[str, Any]) -> dict[str, Any]:
        """``feats`` (``{column: (B, D) tensor}``) plus ``h{L}_next`` when asked for: the LM head over
        ``h{L}_last`` (final logit soft-capping applied where the model has it), summarised."""
        if not self.next_token:
            return feats
        import torch

        with torch.inference_mode():
            last = feats[block_name(self.num_layers, "last")]
            logits = self.head(last.to(self.head.weight.dtype))
            cap = getattr(self.loaded.model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits.float() / cap) * cap
            return {**feats, block_name(self.num_layers, "next"): next_token_stats(logits)}

    @property
    def params_used(self) -> int:
        """Parameters a prefill touches: embeddings + the first ``depth`` blocks (+ final norm) + the adapter's."""
        extra = sum(p.numel() for p in self.adapter.parameters()) if self.adapter is not None else 0
        return sum(p.numel() for p in self.base.parameters()) + extra

    def with_adapter(self, feats: dict[str, Any], n_tokens: Any) -> dict[str, Any]:
        """``feats`` with the adapter's blocks added and the token states (and prefix state) it read taken
        out; ``n_tokens`` ``(B,)`` the prompts' lengths (the windows' positions end at ``n - 1``).
        With attn blocks instead, their reduced windows are added the same way (:class:`TokenReducer`)."""
        if self.attn is not None:
            import torch

            own, state = feats.pop(TOKENS), feats.pop(PREFIX, None)
            windows = self.attn.features(own, state.tokens if state is not None else None)
            return {**feats, **{name: torch.from_numpy(value) for name, value in windows.items()}}
        if self.adapter is None:
            return feats
        import torch

        from shared.pooling import assemble_window, pad_windows

        layer, window = self.adapter.spec.from_layer, self.adapter.spec.window
        own, state = feats.pop(TOKENS), feats.pop(PREFIX, None)
        prefix = state.tokens[layer].numpy() if state is not None else None
        states, mask = pad_windows([assemble_window(row[layer].numpy(), prefix, window) for row in own], window)
        out = self.adapter.features(states, mask, np.asarray(n_tokens.cpu() if hasattr(n_tokens, "cpu") else n_tokens))
        return {**feats, **{name: torch.from_numpy(value) for name, value in out.items()}}

    # ------------------------------------------------------------------ tokenizing
    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat-templated prompt text, ending with the generation prompt."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def token_ids(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
        """Token ids of each chat-templated conversation, untruncated."""
        return self.tokenizer([self.render(m) for m in conversations], add_special_tokens=False)["input_ids"]

    def tokenize(self, conversations: Sequence[list[dict[str, str]]]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per conversation (last ``max_tokens`` kept) and whether each was truncated."""
        ids = self.token_ids(conversations)
        truncated = np.array([len(x) > self.max_tokens for x in ids], dtype=bool)
        return [list(x[-self.max_tokens:]) for x in ids], truncated

    # ------------------------------------------------------------------ forward
    def forward_padded(self, batch: Sequence[Sequence[int]]) -> dict[str, Any]:
        """One padded forward pass over token-id lists; returns ``{column: (B, D) tensor}``."""
        import torch

        input_ids, mask = pad_batch(batch, self.pad_id, self.padding_side)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding must not shift positions
        input_ids, mask, position_ids = (t.to(self.device) for t in (input_ids, mask, position_ids))
        with torch.inference_mode():
            states = self._run(input_ids, mask, position_ids)
            feats = {block_name(layer, p): pool(states[layer], mask, p) for layer in self.layers for p in self.poolings}
            if self.token_layers:
                feats[TOKENS] = window_states(states, mask, self.token_layers, self.token_window)
        return self.with_adapter(self.with_next_token(feats), mask.sum(dim=1))

    def _run(self, input_ids: Any, mask: Any, position_ids: Any, cache: Any = None) -> dict[int, Any]:
        """Forward the truncated base model; ``{layer index: (B, T, D)}`` captured by temporary hooks.

        Hooks (not ``output_hidden_states``) so that only the requested layers are kept and
        the shared model's own output-capturing machinery is never touched. ``cache``: a KV
        cache to extend (``mask`` then covers cached + new tokens); None: no cache.
        """
        states: dict[int, Any] = {}

        def tap(index: int):
            def hook(module: Any, args: Any, output: Any) -> None:
                states[index] = output[0] if isinstance(output, tuple) else output
            return hook

        targets = {0: self.base.embed_tokens}
        targets.update({i: self.base.layers[i - 1] for i in self.layers + self.token_layers if i >= 1})
        if self.depth == self.num_layers:
            targets[self.depth] = self.base.norm  # index L: HF's normed last hidden state
        handles = [targets[i].register_forward_hook(tap(i)) for i in sorted(set(self.layers + self.token_layers))]
        try:
            extend = {"cache": cache, "use_cache": True} if cache is not None else {"use_cache": False}
            self.base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **extend)
        finally:
            for handle in handles:
                handle.remove()
        return states

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
        """Features for token-id lists in input order, computed in length buckets.

        Returns ``(features, padded length per row, stats)``.
        """
        features, padded, _, stats = self.encode_rows(ids)
        return features, padded, stats

    def encode_rows(self, ids: Sequence[Sequence[int]]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray,
                                                                 dict[str, float]]:
        """:meth:`encode_ids` plus the tokens computed per row: ``(features, padded, computed, stats)``.

        With ``min_shared_prefix`` set, rows sharing a long enough prefix run it once
        (:func:`shared.prefix.prefix_groups`); the others, and all rows when it is off, run
        whole in length buckets. ``padded`` of a prefix-shared row is its bucket's
        attention context (prefix + longest suffix).
        """
        return self._encode_rows(ids)[:4]

    def _encode_rows(self, ids: Sequence[Sequence[int]]) -> tuple[Any, ...]:
        """:meth:`encode_rows`' four results plus the token states, ``(tokens, prefix keys, prefixes)``
        as :class:`Encoded` holds them, or ``(None, None, None)`` without ``token_layers``."""
        from shared.prefix import encode_group, prefix_groups, tokens_computed

        if any(len(x) == 0 for x in ids):
            raise BadInput("cannot encode an empty prompt (0 tokens)")
        lengths = [len(x) for x in ids]
        groups, singles = prefix_groups(ids, self.min_shared_prefix)
        out = {c: np.empty((len(ids), *self.shape(c)), dtype=np.float32) for c in self.columns}
        padded = np.zeros(len(ids), dtype=np.int32)
        tokens: list[Any] = [None] * len(ids)
        keys, prefixes = [""] * len(ids), {}

        def store(rows: list[int], feats: dict[str, Any], width: int) -> None:
            padded[rows] = width
            for row, states in zip(rows, feats.pop(TOKENS, [None] * len(rows))):
                tokens[row] = states and {layer: t.numpy() for layer, t in states.items()}
            if PREFIX in feats:
                state = feats.pop(PREFIX)
                prefixes[state.key] = {layer: t.numpy() for layer, t in state.tokens.items()}
                for row in rows:
                    keys[row] = state.key
            for col, tensor in feats.items():
                out[col][rows] = tensor.float().cpu().numpy()

        buckets = [[singles[b] for b in bucket]
                   for bucket in length_buckets([lengths[i] for i in singles], self.batch_size, self.max_batch_tokens)]
        for bucket in buckets:
            store(bucket, self.forward_padded([ids[i] for i in bucket]), max(lengths[i] for i in bucket))
        passes = len(buckets) + sum(encode_group(self, ids, group, store) for group in groups)
        computed = tokens_computed(lengths, groups)
        width = int(padded.sum())
        stats = {"forward_passes": passes, "padding_waste": 1.0 - sum(lengths) / width if width else 0.0,
                 "tokens": float(sum(lengths)), "computed_tokens": float(computed.sum()),
                 "prefix_groups": len(groups)}
        token_part = (tokens, keys, prefixes) if self.emit_tokens else (None, None, None)
        return (out, padded, computed, stats, *token_part)

    def encode(self, conversations: Sequence[list[dict[str, str]]]) -> Encoded:
        """Chat-template, tokenize, bucket and encode a list of conversations."""
        ids, truncated = self.tokenize(conversations)
        features, padded, computed, stats, tokens, keys, prefixes = self._encode_rows(ids)
        return Encoded(features, np.array([len(x) for x in ids], dtype=np.int32), truncated, padded, stats,
                       computed.astype(np.int32), tokens, keys, prefixes)


def truncated_base(model: Any, depth: int) -> Any:
    """A view of ``model.model`` running only the first ``depth`` decoder blocks, without lm_head.

    The final norm is kept only when ``depth`` is the full depth (so index ``L`` matches
    HF's normed last hidden state); otherwise it is identity, so index ``depth`` is the
    raw output of block ``depth``. Parameters are shared with ``model``; ``model`` is
    left unchanged.
    """
    import torch

    full = model.model
    layers = full.layers
    if depth > len(layers):
        raise BadInput(f"depth {depth} exceeds the model's {len(layers)} blocks")
    base = copy.copy(full)
    base._modules = dict(full._modules)  # own module table: the original keeps all its blocks
    base.layers = torch.nn.ModuleList(list(layers)[:depth])
    if depth < len(layers):
        base.norm = torch.nn.Identity()
    return base
