"""Batching token-id lists for the prefill forward pass: length buckets that keep padding low,
``pad_batch`` for the tensors, and the padding waste a bucketing leaves. Shared by the
encoder (:mod:`shared.encoder`) and the prefix-shared path (:mod:`shared.prefix`)."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)
TOKENS, PREFIX = "_tokens", "_prefix"  # reserved keys of a forward's feature dict (token states, prefix state)
FP16_MAX = 65504.0  # float16's largest finite value
_clip_logged = False


def to_fp16(states: Any) -> Any:
    """Torch ``states`` as float16, clipped to its finite range ``[-65504, 65504]``. Some encoders' residual
    streams exceed it (Gemma-3-270M's reach 1e5 at a few tokens by layer 12): cast as they are, those values
    become inf, and every PCA and loss over the token states turns NaN. The first clip is logged."""
    global _clip_logged
    if not _clip_logged and states.numel() and float(states.abs().amax()) > FP16_MAX:
        _clip_logged = True
        log.warning("encoder states exceed float16's range (max |x| %.3g): clipped to +-%g where stored as "
                    "float16 (token states, capture's float16 blocks)", float(states.abs().amax()), FP16_MAX)
    return states.clamp(-FP16_MAX, FP16_MAX).half()


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Any, Any]:
    """Token-id lists to ``(input_ids, mask)`` long tensors ``(B, longest)``, padded on ``side``."""
    import torch

    longest = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ids in enumerate(batch):
        sl = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
        input_ids[row, sl] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, sl] = 1
    return input_ids, mask


def length_buckets(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Group row indices into forward batches of similar length.

    Rows are sorted by length (stable) and cut greedily: a bucket closes when it holds
    ``batch_size`` rows or when adding the next row would make its padded size
    ``rows * longest`` exceed ``max_batch_tokens`` (a single over-long row still gets a
    bucket of its own). Every index appears in exactly one bucket.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    current: list[int] = []
    for i in order:
        padded = (len(current) + 1) * max(lengths[i], 1)  # sorted: row i is the longest so far
        full = len(current) >= batch_size or (max_batch_tokens is not None and current and padded > max_batch_tokens)
        if full:
            buckets.append(current)
            current = []
        current.append(i)
    if current:
        buckets.append(current)
    return buckets


def padding_waste(lengths: Sequence[int], buckets: Iterable[Sequence[int]]) -> float:
    """Fraction of padded positions that are padding, over the given buckets."""
    real = padded = 0
    for bucket in buckets:
        lens = [lengths[i] for i in bucket]
        real += sum(lens)
        padded += len(lens) * max(lens)
    return 1.0 - real / padded if padded else 0.0


def window_states(states: dict[int, Any], mask: Any, layers: Sequence[int], window: int) -> list[dict[int, Any]]:
    """Per row of a batch, ``{layer: (t, D)}``: the states of its last ``t = min(real tokens, window)`` real
    tokens (``mask`` ``(B, T)``, 1 = token; padding on either side is never read), as fp16 on the CPU."""
    out = []
    for row in range(mask.shape[0]):
        real = mask[row].bool().nonzero().flatten()[-window:]
        out.append({layer: to_fp16(states[layer][row, real]).cpu() for layer in layers})
    return out
