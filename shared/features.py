"""Feature block names, defined once: ``h{layer}_{pooling}``.

A *block* is one pooled hidden state of the encoder: layer ``layer`` (a transformers
``hidden_states`` index, 0 = the embedding output) pooled by ``pooling`` (``last``: the
last prompt token; ``mean``: the mean over prompt tokens). Capture writes one activation
column per block under this name, the artifact's transform names its blocks with it, and
the Encoder replica answers features keyed by it. :func:`pool` is the one definition of
the poolings, over a batch :func:`pad_batch` made from token ids.

``next`` is the one pooling that is not a hidden state: the encoder's own next-token
distribution after the prompt (its LM head over the last layer's ``last`` state), summarised
by :func:`next_token_stats` in :data:`NEXT_TOKEN_DIMS` numbers. It exists only for the last
layer ``L`` (``h{L}_next``): how sure the encoder is of the first token of its own answer
(on a multiple-choice prompt, the letter), a prefill-only signal of how hard the prompt is.

``attn`` (:data:`ATTN`) names a block that is not captured as a vector: ``h{layer}_attn`` is pooled by a
learned attention over the per-token states of layer ``layer`` (:mod:`shared.pooling`), trained with the
router; capture keeps those states with ``token_layers``.

Adapted blocks (:mod:`shared.adapter`): ``h{to}a{from}_{pooling}`` (e.g. ``h14a12_last``) is the output of
``to - from`` decoder blocks *fine-tuned* on the routing labels, run over the last states of layer ``from``
of the frozen encoder, pooled by ``last`` or ``mean`` over that window (:func:`adapted_block_name`,
:func:`adapted_from`). :func:`parse_block` reads it as ``(to, pooling)``; it is never a frozen layer's block.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from shared.errors import BadInput

POOLINGS = ("last", "mean", "next")
ATTN = "attn"  # a learned pooling over the per-token states of a layer (shared.pooling), not a captured column
NEXT_TOKEN_DIMS = 3  # width of a ``next`` block: top-1 probability, top-1 minus top-2, entropy
BLOCK_RE = re.compile(r"^h(\d+)(?:a(\d+))?_(" + "|".join(POOLINGS + (ATTN,)) + r")$")
ADAPTED_POOLINGS = ("last", "mean")  # what an adapted block may pool over its window


def check_poolings(poolings: Sequence[str]) -> list[str]:
    """``poolings`` as a list; ``ValueError`` when empty or one is not in :data:`POOLINGS`."""
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise BadInput(f"unknown pooling(s) {bad or list(poolings)}; choose from {POOLINGS}")
    return list(poolings)


def block_name(layer: int, pooling: str) -> str:
    """The block of one (layer, pooling): ``(12, 'last')`` -> ``'h12_last'``."""
    check_poolings([pooling])
    return f"h{int(layer)}_{pooling}"


def encoder_columns(layers: Sequence[int], poolings: Sequence[str], num_layers: int) -> list[str]:
    """The blocks an encoder computes for ``layers`` x ``poolings`` of a model with ``num_layers``
    blocks: every hidden-state pooling at every layer (``next`` implies ``last``), then
    ``h{L}_next``. ``ValueError`` when ``next`` is asked for without the last layer ``L``."""
    check_poolings(poolings)
    nxt = "next" in poolings
    if nxt and num_layers not in layers:
        raise BadInput(f"pooling 'next' reads the last layer: add {num_layers} (the model's last block) "
                         f"to layers {sorted(layers)}")
    columns = [block_name(layer, p) for layer in layers for p in hidden_poolings(poolings)]
    return columns + ([block_name(num_layers, "next")] if nxt else [])


def hidden_poolings(poolings: Sequence[str]) -> list[str]:
    """The hidden-state poolings a forward pass computes for ``poolings`` (distinct, in order):
    ``next`` is not one, and implies ``last``, the state its LM head reads."""
    nxt = "next" in poolings
    return list(dict.fromkeys([p for p in poolings if p != "next"] + (["last"] if nxt else [])))


def block_width(name: str, hidden_size: int) -> int:
    """Features per row of block ``name``: :data:`NEXT_TOKEN_DIMS` for a ``next`` block, else ``hidden_size``."""
    return NEXT_TOKEN_DIMS if parse_block(name)[1] == "next" else hidden_size


def parse_block(name: str) -> tuple[int, str]:
    """``'h12_last'`` -> ``(12, 'last')``; ``ValueError`` for anything else."""
    m = BLOCK_RE.match(name)
    if not m or (m.group(2) is not None and m.group(3) not in ADAPTED_POOLINGS):
        raise BadInput(f"not a feature block name: {name!r} (expected h<layer>_<{'|'.join(POOLINGS + (ATTN,))}>, "
                       f"or h<to>a<from>_<{'|'.join(ADAPTED_POOLINGS)}> for an adapted block)")
    return int(m.group(1)), m.group(3)


def adapted_block_name(to_layer: int, from_layer: int, pooling: str) -> str:
    """The block of adapted blocks ``from_layer + 1 .. to_layer`` pooled by ``pooling``:
    ``(14, 12, 'last')`` -> ``'h14a12_last'``."""
    if pooling not in ADAPTED_POOLINGS or not 0 <= int(from_layer) < int(to_layer):
        raise BadInput(f"an adapted block needs 0 <= from_layer < to_layer and a pooling in {ADAPTED_POOLINGS}; "
                       f"got from {from_layer}, to {to_layer}, pooling {pooling!r}")
    return f"h{int(to_layer)}a{int(from_layer)}_{pooling}"


def adapted_from(name: str) -> int | None:
    """The frozen layer an adapted block starts from (``'h14a12_last'`` -> 12); None for any other block."""
    parse_block(name)
    m = BLOCK_RE.match(name)
    return int(m.group(2)) if m.group(2) is not None else None


def block_columns(names: Iterable[str]) -> list[str]:
    """The block names among ``names`` (e.g. a Parquet schema's), in layer, then pooling order."""
    return sorted((n for n in names if BLOCK_RE.match(n)), key=parse_block)


def is_attn(name: str) -> bool:
    """Whether block ``name`` is a learned token pooling (``h{layer}_attn``)."""
    return bool(BLOCK_RE.match(name)) and parse_block(name)[1] == ATTN


def pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """Pool ``hidden`` ``(B, T, D)`` over real tokens (``mask`` ``(B, T)``, 1 = token) to ``(B, D)``.

    ``last`` takes the last position whose mask is 1 (works for left and right padding);
    ``mean`` averages the real positions. Padded positions are never read, even if NaN.
    """
    import torch

    mask = mask.bool()
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        summed = hidden.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    if pooling == "next":
        raise ValueError("'next' does not pool hidden states: the encoder computes it with its LM head from "
                         "the last layer's 'last' state (shared.encoder.Encoder)")
    raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")


def next_token_stats(logits: Any) -> Any:
    """Summary of next-token distributions: ``logits`` ``(B, V)`` -> ``(B, 3)`` float32.

    With ``p = softmax(logits)`` (float32) and ``p_(1) >= p_(2)`` its two largest entries:
    ``[p_(1), p_(1) - p_(2), H]``, ``H = -sum_v p_v log p_v`` in nats (0 <= H <= log V).
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(2, dim=-1).values.exp()
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return torch.stack([top[:, 0], top[:, 0] - top[:, 1], entropy], dim=-1)
