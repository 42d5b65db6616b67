"""Feature block names, defined once: ``h{layer}_{pooling}``.

A *block* is one pooled hidden state of the encoder: layer ``layer`` (a transformers
``hidden_states`` index, 0 = the embedding output) pooled by ``pooling`` (``last``: the
last prompt token; ``mean``: the mean over prompt tokens). Capture writes one activation
column per block under this name, the artifact's transform names its blocks with it, and
the Encoder replica answers features keyed by it. :func:`pool` is the one definition of
the poolings, over a batch :func:`pad_batch` made from token ids.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

POOLINGS = ("last", "mean")
BLOCK_RE = re.compile(r"^h(\d+)_(" + "|".join(POOLINGS) + r")$")


def check_poolings(poolings: Sequence[str]) -> list[str]:
    """``poolings`` as a list; ``ValueError`` when empty or one is not in :data:`POOLINGS`."""
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise ValueError(f"unknown pooling(s) {bad or list(poolings)}; choose from {POOLINGS}")
    return list(poolings)


def block_name(layer: int, pooling: str) -> str:
    """The block of one (layer, pooling): ``(12, 'last')`` -> ``'h12_last'``."""
    check_poolings([pooling])
    return f"h{int(layer)}_{pooling}"


def parse_block(name: str) -> tuple[int, str]:
    """``'h12_last'`` -> ``(12, 'last')``; ``ValueError`` for anything else."""
    m = BLOCK_RE.match(name)
    if not m:
        raise ValueError(f"not a feature block name: {name!r} (expected h<layer>_<{'|'.join(POOLINGS)}>)")
    return int(m.group(1)), m.group(2)


def block_columns(names: Iterable[str]) -> list[str]:
    """The block names among ``names`` (e.g. a Parquet schema's), in layer, then pooling order."""
    return sorted((n for n in names if BLOCK_RE.match(n)), key=parse_block)


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
    raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
