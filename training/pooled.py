"""Training ``h{layer}_attn`` blocks: :class:`shared.pooling.PooledTrunkNet` end to end on the same
masked, soft-label objective as SharedTrunkNet (:mod:`training.objectives`, :func:`training.loop.early_stopping`).

- :class:`PoolConfig`: the token PCA size, the number of learned queries, the window;
- :func:`fit_inputs`: on one fold, the frozen transforms fitted on its training rows only (per-block
  standardise->PCA for the vector blocks, :class:`shared.pooling.TokenTransform` for each attn block) and
  the network's inputs ``(X, z_1, m_1, ...)`` for every row;
- :func:`train_pooled_one` / :func:`ensemble_proba`: one seed, and the mean of the members' sigmoids.

Shapes: ``n`` rows, ``T`` targets; an attn block is ``(states (n, W, D) fp16, mask (n, W) bool)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field

from shared.config import StrictConfig
from shared.pooling import PooledTrunkNet, TokenTransform
from training.loop import TrainResult, TrunkConfig, early_stopping, input_tensor
from training.objectives import objective

Tokens = tuple[np.ndarray, np.ndarray]  # (states (n, W, D), mask (n, W))


class PoolConfig(StrictConfig):
    """How an ``h{layer}_attn`` block pools its token states."""

    n_components: int = Field(64, gt=0, description="PCA components per token (fitted on training tokens).")
    n_queries: int = Field(1, gt=0, description="Learned attention queries per attn block (pooled vectors "
                                                "concatenated).")
    window: int | None = Field(None, gt=0, description="Last prompt tokens pooled; None: the capture's "
                                                       "token_window.")
    position_bias: bool = Field(False, description="Add a learned bias per distance from the last token to each "
                                                   "query's scores (can learn last-token pooling); False: content only.")
    lr_scale: float = Field(1.0, gt=0, description="The pooling's learning rate over the trunk's (Adam moves each "
                                                   "weight about lr per step).")
    fit_tokens: int = Field(200_000, gt=0, description="Most training tokens (a seeded sample) the token "
                                                       "standardise->PCA is fitted on.")


def fit_transforms(dense: Mapping[str, np.ndarray], tokens: Mapping[str, Tokens], fit_rows: np.ndarray,
                   n_components: int, pool: PoolConfig, seed: int = 0) -> tuple[Any, list[TokenTransform]]:
    """The frozen transforms, fitted on the rows ``fit_rows`` only: the vector blocks' per-block
    standardise->PCA (a :class:`shared.trunk.FeatureTransform`, no blocks without ``dense``) and one
    :class:`shared.pooling.TokenTransform` per attn block (on its real training tokens), in ``tokens`` order."""
    from shared.trunk import FeatureTransform

    ft = FeatureTransform.fit({b: x[fit_rows] for b, x in dense.items()}, n_components=n_components, seed=seed) \
        if dense else FeatureTransform([], [])
    return ft, [TokenTransform.fit(states[fit_rows][mask[fit_rows]], pool.n_components, seed, pool.fit_tokens)
                for states, mask in tokens.values()]


def apply_transforms(ft: Any, tts: Sequence[TokenTransform], dense: Mapping[str, np.ndarray],
                     tokens: Mapping[str, Tokens]) -> tuple[np.ndarray, ...]:
    """``(X (n, d_dense) float32, z_1 (n, W, k) float32, m_1 (n, W) bool, ...)``: :func:`fit_transforms`'
    transforms applied to every row (``X`` is ``(n, 0)`` without vector blocks)."""
    n = len(next(iter(tokens.values()))[1]) if tokens else len(next(iter(dense.values())))
    out: list[np.ndarray] = [ft.transform(dense) if ft.names else np.zeros((n, 0), dtype=np.float32)]
    for tt, (states, mask) in zip(tts, tokens.values()):
        out += [tt.apply(states, mask), mask]
    return tuple(out)


def fit_inputs(dense: Mapping[str, np.ndarray], tokens: Mapping[str, Tokens], fit_rows: np.ndarray,
               n_components: int, pool: PoolConfig, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(X (n, d_dense) float32, z_1 (n, W, k) float32, m_1 (n, W) bool, ...)`` for all ``n`` rows, the
    transforms fitted on ``fit_rows`` only (``X`` is ``(n, 0)`` without vector blocks)."""
    return apply_transforms(*fit_transforms(dense, tokens, fit_rows, n_components, pool, seed), dense, tokens)


def train_pooled_one(train: tuple, val: tuple, seed: int, trunk: TrunkConfig, pool: PoolConfig) -> TrainResult:
    """One :class:`PooledTrunkNet` through :func:`training.loop.early_stopping` on ``trunk.objective``;
    ``train``/``val`` are ``(inputs, Y)`` with ``inputs`` as :func:`fit_inputs` returns (their rows)."""
    (xtr, ytr), (xva, yva) = train, val
    d_dense, dims, n_t = xtr[0].shape[1], [z.shape[2] for z in xtr[1::2]], ytr.shape[1]
    window = xtr[1].shape[1] if pool.position_bias else 0
    out = early_stopping(lambda: PooledTrunkNet(d_dense, dims, n_t, pool.n_queries, trunk.hidden, trunk.dropout,
                                                window, pool.lr_scale),
                         (xtr, ytr, None), (xva, yva, None), seed, lr=trunk.lr, weight_decay=trunk.weight_decay,
                         batch_size=trunk.batch_size, max_epochs=trunk.max_epochs, patience=trunk.patience,
                         min_delta=trunk.min_delta, loss=objective(trunk.objective))
    return TrainResult(seed, out.val_loss, out.best_epoch, out.epochs_run, out.state_dict, out.net.spec())


def build_pooled(result: TrainResult) -> PooledTrunkNet:
    net = PooledTrunkNet(**result.spec)
    net.load_state_dict(result.state_dict)
    return net.eval()


@torch.no_grad()
def ensemble_proba(results: Sequence[TrainResult], inputs: tuple[np.ndarray, ...], chunk: int = 512) -> np.ndarray:
    """``(n, T)`` float64: the mean over members of ``sigmoid(net(*inputs))``."""
    nets = [build_pooled(r) for r in results]
    n, out = len(inputs[0]), []
    for i in range(0, n, chunk):
        x = [input_tensor(a[i:i + chunk]) for a in inputs]
        out.append(torch.stack([torch.sigmoid(net(*x)) for net in nets]).mean(dim=0).double().numpy())
    return np.concatenate(out, axis=0)


def take(inputs: tuple[np.ndarray, ...], rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows ``rows`` of every input."""
    return tuple(a[rows] for a in inputs)
