"""The network ``prefill-router adapt`` trains: adapted encoder blocks + frozen transform + SharedTrunkNet.

:class:`AdaptedRouter` ``(states, mask, n_tokens, dense) -> (logits (n, T), e (n, d_a))``:

- ``states`` ``(n, W, D)``, ``mask`` ``(n, W)``, ``n_tokens`` ``(n,)``: each prompt's window of layer-``L``
  states (:class:`shared.adapter.AdaptedTop`'s input) -> the adapted blocks' pooled vectors ``x_b`` ``(n, D)``;
- each through its *fixed* standardise->PCA ``z_b = ((x_b - mean_b) / scale_b - pca_mean_b) @ C_b.T``, fitted
  once on the untrained blocks' features of the training rows (:class:`shared.trunk.BlockTransform`, kept as a
  linear map ``z_b = x_b @ A_b + c_b`` the gradient flows through); ``e = [z_1, ..., z_m]`` ``(n, d_a)`` is the
  query's embedding (what RouterDC's contrastive loss reads);
- ``dense`` ``(n, d_dense)``: the frozen blocks' features after their own transform (``d_dense`` may be 0);
- SharedTrunkNet over ``[dense, e]``.

The artifact stores exactly this: the transform of ``[frozen blocks..., adapted blocks...]`` (the adapted
blocks' fixed maps as ordinary :class:`shared.trunk.BlockTransform` arrays), the trunk as a one-member
ensemble and the adapter's blocks, so the serving head reads the adapted blocks as ordinary feature blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from shared.adapter import AdaptedTop
from shared.trunk import BlockTransform, FeatureTransform, SharedTrunkNet


@dataclass
class AdaptInputs:
    """Rows of the adapt stage: windows ``states`` ``(n, W, D)`` fp16 and ``mask`` ``(n, W)`` (layer ``L``,
    right-padded), ``n_tokens`` ``(n,)`` prompt lengths, ``dense`` ``(n, d_dense)`` the frozen blocks'
    transformed features, ``Y`` ``(n, T)`` labels (NaN = missing)."""

    states: np.ndarray
    mask: np.ndarray
    n_tokens: np.ndarray
    dense: np.ndarray
    Y: np.ndarray

    def take(self, rows: np.ndarray) -> "AdaptInputs":
        return AdaptInputs(self.states[rows], self.mask[rows], self.n_tokens[rows], self.dense[rows], self.Y[rows])

    def __len__(self) -> int:
        return len(self.Y)

    def tensors(self, rows: np.ndarray | slice) -> tuple[torch.Tensor, ...]:
        """``(states float32, mask bool, n_tokens long, dense float32)`` of ``rows``, the windows cut to the
        longest real one among them (right padding: the cut columns are padding only, so nothing changes)."""
        mask = self.mask[rows]
        t = max(int(mask.sum(axis=1).max()), 1) if len(mask) else self.mask.shape[1]
        return (torch.as_tensor(self.states[rows][:, :t].astype(np.float32)), torch.as_tensor(mask[:, :t]),
                torch.as_tensor(self.n_tokens[rows].astype(np.int64)),
                torch.as_tensor(self.dense[rows].astype(np.float32)))


class FixedLinear(torch.nn.Module):
    """A :class:`shared.trunk.BlockTransform` as ``x @ A + c`` (buffers, not trained), float32:
    ``A = (C / scale).T`` ``(D, k)``, ``c = -(mean / scale + pca_mean) @ C.T`` ``(k,)``."""

    def __init__(self, bt: BlockTransform):
        super().__init__()
        comps = np.asarray(bt.components, dtype=np.float64)
        self.register_buffer("A", torch.as_tensor((comps / bt.scale).T, dtype=torch.float32))
        self.register_buffer("c", torch.as_tensor(-(bt.mean / bt.scale + bt.pca_mean) @ comps.T, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.A + self.c


class AdaptedRouter(torch.nn.Module):
    """See the module docstring. ``adapted``: the adapted blocks' transforms, in ``adapter.block_names`` order."""

    def __init__(self, adapter: AdaptedTop, adapted: Sequence[BlockTransform], d_dense: int, n_targets: int,
                 hidden: Sequence[int] = (256, 128), dropout: Sequence[float] = (0.3, 0.2)):
        super().__init__()
        self.adapter = adapter
        self.maps = torch.nn.ModuleList(FixedLinear(bt) for bt in adapted)
        self.d_dense, self.d_adapted = int(d_dense), sum(int(bt.components.shape[0]) for bt in adapted)
        self.trunk = SharedTrunkNet(self.d_dense + self.d_adapted, n_targets, hidden, dropout)

    def embed(self, states: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """``e`` ``(n, d_a)``: the adapted blocks' pooled vectors through their fixed transforms."""
        pooled = self.adapter(states, mask, n_tokens)
        return torch.cat([m(pooled[name]) for m, name in zip(self.maps, self.adapter.block_names)], dim=1)

    def forward(self, states, mask, n_tokens, dense) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(states, mask, n_tokens)
        return self.trunk(torch.cat([dense[:, :self.d_dense].float(), e], dim=1)), e


def adapted_transform(adapter: AdaptedTop, inputs: AdaptInputs, fit_rows: np.ndarray, n_components: int,
                      seed: int = 0) -> tuple[FeatureTransform, dict[str, np.ndarray]]:
    """The adapted blocks' standardise->PCA fitted on the *untrained* adapter's features of ``fit_rows``, and
    those features for every row (``{block: (n, D)}``, e.g. for warm-starting the trunk)."""
    feats = adapter.features(inputs.states, inputs.mask, inputs.n_tokens)
    return FeatureTransform.fit({b: x[fit_rows] for b, x in feats.items()}, n_components=n_components,
                                seed=seed), feats


def artifact_parts(model: AdaptedRouter, frozen: FeatureTransform | None,
                   adapted: FeatureTransform) -> tuple[FeatureTransform, torch.nn.Module]:
    """``(transform over [frozen..., adapted...] blocks, trunk in eval mode)`` for :func:`shared.artifact.save_artifact`."""
    names = (frozen.names if frozen else []) + list(adapted.names)
    blocks = (frozen.blocks if frozen else []) + list(adapted.blocks)
    return FeatureTransform(names, blocks), model.trunk.eval()


@torch.no_grad()
def predict_proba(adapter: AdaptedTop, transform: FeatureTransform, trunk: torch.nn.Module, inputs: AdaptInputs,
                  frozen_raw: dict[str, np.ndarray]) -> np.ndarray:
    """``(n, T)`` float64 P(correct) exactly as the serving head computes it: the adapter's features
    (:meth:`shared.adapter.AdaptedTop.features`) and the frozen blocks' raw ``frozen_raw`` through
    ``transform`` (numpy), then ``sigmoid(trunk(.))``."""
    from shared.trunk import Ensemble

    feats = {**frozen_raw, **adapter.features(inputs.states, inputs.mask, inputs.n_tokens)}
    return Ensemble([trunk]).predict_proba(transform.transform(feats))
