"""Learned token pooling: the ``h{layer}_attn`` block, shared by training and serving.

A ``last`` block reads one token's state, a ``mean`` block dilutes the decisive tokens (the
question after a long few-shot header, the options) among all the others. An ``attn`` block
reads the frozen states of the prompt's last ``window`` tokens at one layer and *learns* which of
them matter:

- :func:`assemble_window`: a prompt's window from its own (suffix) states and its shared prefix's
  tail, as capture stores them (:mod:`shared.encoder`, token states);
- :class:`TokenTransform`: per-dimension standardisation then PCA to ``k`` dims, frozen arrays
  fitted on training tokens (the token analogue of :class:`shared.trunk.FeatureTransform`);
- :class:`AttentionPool`: ``n_queries`` learned queries, each a softmax over the real tokens;
- :class:`PooledTrunkNet`: the pooled vectors of every ``attn`` block concatenated with the
  other blocks' transformed features, then :class:`shared.trunk.SharedTrunkNet`.

Shapes: ``B`` prompts, ``W`` window positions (right-padded), ``D`` hidden size, ``k`` components,
``q`` queries. ``mask`` ``(B, W)`` bool, True = a real token. Padded positions are never read
(their values may be anything, NaN included): they are zeroed before any product and get zero
attention weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from shared.config import StrictConfig
from shared.features import is_attn, parse_block
from shared.trunk import SharedTrunkNet


def assemble_window(own: np.ndarray, prefix: np.ndarray | None, window: int) -> np.ndarray:
    """The last ``window`` token states of a prompt: ``own`` ``(t, D)`` (its own last tokens; a prefix-shared
    prompt's suffix) preceded, when ``t < window`` and there is a prefix, by the last ``window - t`` rows of
    ``prefix`` ``(p, D)``. Returns ``(min(t + p, window), D)``."""
    own = np.asarray(own)
    if prefix is None or len(own) >= window:
        return own[-window:]
    need = window - len(own)
    return np.concatenate([np.asarray(prefix)[-need:], own], axis=0) if need else own


def pad_windows(rows: Sequence[np.ndarray], window: int, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """``(states (n, window, D), mask (n, window) bool)``: each row's ``(t_i, D)`` states right-padded with 0."""
    d = int(np.asarray(rows[0]).shape[1])
    states = np.zeros((len(rows), window, d), dtype=dtype)
    mask = np.zeros((len(rows), window), dtype=bool)
    for i, r in enumerate(rows):
        t = min(len(r), window)
        states[i, :t] = np.asarray(r)[-window:][:t] if t else 0
        mask[i, :t] = True
    return states, mask


@dataclass
class TokenTransform:
    """Frozen ``z = ((x - mean) / scale) @ components.T`` per token, ``(.., D) -> (.., k)``.

    ``mean``, ``scale`` ``(D,)`` and ``components`` ``(k, D)`` (the top ``k`` principal axes of the
    standardised training tokens; the PCA's centre is 0 after standardisation)."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray, k: int, seed: int = 0, max_tokens: int = 200_000,
            chunk: int = 16_384) -> "TokenTransform":
        """Fit on training tokens ``(N, D)`` (real tokens only; a seeded sample of ``max_tokens`` when more):
        per-dimension mean and std, then the top ``k`` eigenvectors of the standardised tokens' covariance
        (accumulated in float64 over chunks: ``O(N D^2)``, no ``N x D`` SVD)."""
        x = np.asarray(tokens)
        if len(x) > max_tokens:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_tokens, replace=False))]
        n, d = x.shape
        total, sq = np.zeros(d), np.zeros(d)
        for i in range(0, n, chunk):
            c = x[i:i + chunk].astype(np.float64)
            total += c.sum(axis=0)
            sq += (c * c).sum(axis=0)
        mean = total / n
        scale = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
        scale = np.where(scale > 1e-8, scale, 1.0)
        cov = np.zeros((d, d))
        for i in range(0, n, chunk):
            z = ((x[i:i + chunk].astype(np.float64) - mean) / scale).astype(np.float32)
            cov += (z.T @ z).astype(np.float64)
        evals, evecs = np.linalg.eigh(cov / n)
        top = np.argsort(evals)[::-1][:min(k, d)]
        return cls(mean, scale, np.ascontiguousarray(evecs[:, top].T))

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def apply(self, states: np.ndarray, mask: np.ndarray, chunk: int = 256) -> np.ndarray:
        """``(n, W, D)`` states and ``(n, W)`` mask -> ``(n, W, k)`` float32, 0 at padded positions."""
        out = np.zeros(states.shape[:2] + (self.k,), dtype=np.float32)
        proj = (self.components / self.scale).T.astype(np.float32)  # (D, k)
        shift = (self.mean / self.scale) @ self.components.T  # (k,)
        for i in range(0, len(states), chunk):
            z = states[i:i + chunk].astype(np.float32) @ proj - shift.astype(np.float32)
            out[i:i + chunk] = np.where(mask[i:i + chunk, :, None], z, 0.0)
        return out

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": np.ascontiguousarray(getattr(self, k), dtype=np.float64)
                for k in ("mean", "scale", "components")}

    @classmethod
    def from_arrays(cls, prefix: str, arrays) -> "TokenTransform":
        return cls(*(np.asarray(arrays[f"{prefix}.{k}"]) for k in ("mean", "scale", "components")))


class AttentionPool(torch.nn.Module):
    """``(B, W, k)`` token vectors ``z`` and mask -> ``(B, q * k)``.

    Query ``j`` (a learned ``k``-vector ``u_j``) weighs token ``t`` by
    ``a_tj = softmax_t(z_t . u_j / sqrt(k) + b_j[r_t])`` over the real tokens only, with ``r_t`` the
    token's distance from the prompt's last real token (0 = last; ``b`` a learned ``(q, window)`` bias,
    all zero with ``window=0``: content only), and pools ``p_j = sum_t a_tj z_t``; the output is
    ``[p_1, ..., p_q]``. ``u_j = 0, b_j = 0`` is mean pooling, so mean pooling is the starting point the
    training moves away from (queries start small, biases at 0); a large ``b_j[0]`` is ``last`` pooling."""

    def __init__(self, k: int, n_queries: int = 1, window: int = 0):
        super().__init__()
        self.k, self.n_queries, self.window = int(k), int(n_queries), int(window)
        self.queries = torch.nn.Parameter(0.01 * torch.randn(self.n_queries, self.k))
        self.bias = torch.nn.Parameter(torch.zeros(self.n_queries, max(self.window, 1)), requires_grad=window > 0)

    @property
    def d_out(self) -> int:
        return self.k * self.n_queries

    def weights(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, W, q)`` attention weights; 0 at padded positions, each column sums to 1 over real tokens."""
        mask = mask.bool()
        z = z.masked_fill(~mask.unsqueeze(-1), 0.0)
        scores = (z @ self.queries.T) / self.k ** 0.5
        if self.window:
            from_end = (mask.sum(dim=1, keepdim=True) - 1 - torch.arange(mask.shape[1], device=mask.device)).clamp(0)
            scores = scores + self.bias.T[from_end.clamp(max=self.window - 1)]
        scores = scores.masked_fill(~mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=1) * mask.unsqueeze(-1).to(scores.dtype)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.weights(z, mask)
        z = z.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        return torch.einsum("bwq,bwk->bqk", a, z).reshape(z.shape[0], -1)


class PooledTrunkNet(torch.nn.Module):
    """``forward(x, z_1, m_1, ..., z_a, m_a)`` -> ``(B, n_targets)`` logits: ``x`` ``(B, d_dense)`` the other
    blocks' transformed features (``d_dense`` may be 0), ``z_i``/``m_i`` the ``i``-th ``attn`` block's token
    vectors ``(B, W, k_i)`` and mask; the trunk reads ``[x, pool_1(z_1, m_1), ..., pool_a(z_a, m_a)]``."""

    def __init__(self, d_dense: int, token_dims: Sequence[int], n_targets: int, n_queries: int = 1,
                 hidden: Sequence[int] = (256, 128), dropout: Sequence[float] = (0.3, 0.2), window: int = 0,
                 pool_lr_scale: float = 1.0):
        super().__init__()
        self.d_dense, self.token_dims, self.n_queries = int(d_dense), [int(k) for k in token_dims], int(n_queries)
        self.window, self.pool_lr_scale = int(window), float(pool_lr_scale)
        self.pools = torch.nn.ModuleList(AttentionPool(k, self.n_queries, self.window) for k in self.token_dims)
        self.trunk = SharedTrunkNet(self.d_dense + sum(p.d_out for p in self.pools), n_targets, hidden, dropout)

    def forward(self, x: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
        if len(tokens) != 2 * len(self.pools):
            raise ValueError(f"expected {len(self.pools)} (states, mask) pairs, got {len(tokens) / 2:g}")
        pooled = [p(tokens[2 * i], tokens[2 * i + 1]) for i, p in enumerate(self.pools)]
        return self.trunk(torch.cat([x[:, :self.d_dense], *pooled], dim=1))

    def param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups: the trunk at ``lr``, the pooling (queries, position biases) at
        ``lr * pool_lr_scale`` (Adam moves a parameter about ``lr`` per step, and a few hundred steps at the
        trunk's rate leave the attention near uniform)."""
        return [{"params": list(self.trunk.parameters()), "lr": lr},
                {"params": [p for p in self.pools.parameters() if p.requires_grad], "lr": lr * self.pool_lr_scale}]

    def spec(self) -> dict:
        t = self.trunk.spec()
        return {"d_dense": self.d_dense, "token_dims": self.token_dims, "n_targets": t["n_targets"],
                "n_queries": self.n_queries, "hidden": t["hidden"], "dropout": t["dropout"], "window": self.window,
                "pool_lr_scale": self.pool_lr_scale}


# ------------------------------------------------------------------ in an artifact (shared.pooled_head)
class AttnBlockSpec(StrictConfig):
    """One ``h{layer}_attn`` block of an artifact: its window and its :class:`TokenTransform`'s sizes."""

    name: str = Field(description="The block, h<layer>_attn (layer: a hidden_states index of the frozen encoder).")
    window: int = Field(gt=0, description="Last prompt tokens whose layer states are pooled (right-padded to it).")
    d_in: int = Field(gt=0, description="Width of a token state (the encoder's hidden size).")
    d_out: int = Field(gt=0, description="TokenTransform components k per token.")

    @model_validator(mode="after")
    def _attn_name(self) -> "AttnBlockSpec":
        if not is_attn(self.name):
            raise ValueError(f"{self.name!r} is not an h<layer>_attn block")
        return self

    @property
    def layer(self) -> int:
        return parse_block(self.name)[0]


class PooledSpec(StrictConfig):
    """An artifact's learned token pooling (``meta.pooled``): its attn blocks and the
    :class:`PooledTrunkNet` settings beyond ``meta.trunk`` (whose ``d_in`` is the trunk's input)."""

    blocks: list[AttnBlockSpec] = Field(min_length=1, description="Attn blocks, in the network's input order.")
    n_queries: int = Field(gt=0, description="Learned queries per attn block.")
    position_window: int = Field(ge=0, description="PooledTrunkNet window: positions with a learned bias "
                                                   "(0: content only).")
    pool_lr_scale: float = Field(gt=0, description="The pooling's learning-rate scale it was trained with.")

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def layers(self) -> list[int]:
        return sorted({b.layer for b in self.blocks})

    @property
    def window(self) -> int:
        """The longest window: how many last token states the encoder keeps."""
        return max(b.window for b in self.blocks)


def reduce_window(transform: TokenTransform, states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What an attn block's input travels as: ``(n, W, D)`` states and ``(n, W)`` mask -> ``(n, W, k)``
    float32, :meth:`TokenTransform.apply` on the real tokens and NaN at padded positions (the mask, in-band)."""
    z = transform.apply(states, mask)
    z[~np.asarray(mask, bool)] = np.nan
    return z


def split_reduced(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reduce_window`'s ``(n, W, k)`` -> ``(z (n, W, k) float32 with 0 at padded positions,
    mask (n, W) bool)``, exactly the :class:`PooledTrunkNet` inputs :meth:`TokenTransform.apply` gives."""
    z = np.asarray(z, dtype=np.float32)
    mask = ~np.isnan(z).any(axis=-1)
    return np.where(mask[..., None], z, np.float32(0.0)), mask
