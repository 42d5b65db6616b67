"""The router's numeric core, shared by training and serving (inference only).

- :class:`FeatureTransform`: per feature block ``StandardScaler -> PCA`` fitted on train
  only, blocks concatenated. Fitting uses scikit-learn (imported inside :meth:`fit`);
  applying it is plain numpy on stored arrays, so serving never needs scikit-learn.
- :class:`SharedTrunkNet`: ``d_in -> 256 -> ReLU -> Dropout(0.3) -> 128 -> ReLU ->
  Dropout(0.2) -> n_targets`` logits (sizes configurable).
- :func:`masked_bce_loss` (the objective) and :class:`Ensemble` (mean of member sigmoids).

The training loop is :mod:`training.loop`; the policy is :mod:`shared.policy`.

Shapes: ``n`` queries, ``T`` targets, ``d`` features. Labels ``Y`` are ``(n, T)`` in
[0, 1] with NaN for missing; a mask ``M`` is ``(n, T)`` with 1 = label present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------- feature transform
@dataclass
class BlockTransform:
    """Arrays of one block: ``z = ((x - mean) / scale - pca_mean) @ components.T``."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    pca_mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return ((x - self.mean) / self.scale - self.pca_mean) @ self.components.T


@dataclass
class FeatureTransform:
    """Per-block StandardScaler -> PCA, blocks concatenated in ``names`` order.

    ``transform(blocks)`` maps ``{name: (n, d_b)}`` to ``(n, sum_b k_b)`` float32 with
    ``k_b = min(n_components, n_train, d_b)``; ``n_components=None`` keeps all ``d_b``
    dimensions (a rotation, no reduction).
    """

    names: list[str]
    blocks: list[BlockTransform]

    @classmethod
    def fit(
        cls, blocks: Mapping[str, np.ndarray], n_components: int | None = 128, seed: int = 0,
        svd_solver: str = "full",
    ) -> "FeatureTransform":
        """Fit on the TRAIN features only (``{name: (n, d_b)}``, same ``n`` for all).
        ``svd_solver="randomized"`` (seeded) is faster for wide blocks."""
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        names, fitted = list(blocks), []
        sizes = {np.asarray(b).shape[0] for b in blocks.values()}
        if len(sizes) != 1:
            raise ValueError(f"all blocks need the same number of rows; got {sorted(sizes)}")
        for name in names:
            x = np.asarray(blocks[name], dtype=np.float64)
            n, d = x.shape
            k = min(n, d) if n_components is None else min(n_components, n, d)
            scaler = StandardScaler().fit(x)
            pca = PCA(n_components=k, svd_solver=svd_solver, random_state=seed).fit(scaler.transform(x))
            fitted.append(BlockTransform(scaler.mean_, scaler.scale_, pca.mean_, pca.components_))
        return cls(names, fitted)

    @property
    def d_out(self) -> int:
        return sum(b.components.shape[0] for b in self.blocks)

    def transform(self, blocks: Mapping[str, np.ndarray]) -> np.ndarray:
        """numpy-only application; raises ``ValueError`` on missing blocks or wrong widths."""
        missing = [n for n in self.names if n not in blocks]
        if missing:
            raise ValueError(f"feature blocks missing: {missing}; expected {self.names}")
        out = []
        for name, bt in zip(self.names, self.blocks):
            x = np.asarray(blocks[name])
            if x.ndim != 2 or x.shape[1] != bt.mean.shape[0]:
                raise ValueError(f"block {name!r}: expected (n, {bt.mean.shape[0]}), got {x.shape}")
            out.append(bt.apply(x))
        return np.concatenate(out, axis=1).astype(np.float32)

    def spec(self) -> list[dict]:
        """``[{name, d_in, d_out}]`` per block, for the artifact's metadata."""
        return [
            {"name": n, "d_in": int(b.mean.shape[0]), "d_out": int(b.components.shape[0])}
            for n, b in zip(self.names, self.blocks)
        ]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat ``{"b{i}.mean": ...}`` arrays (block ``i`` in ``names`` order) for safetensors."""
        out = {}
        for i, b in enumerate(self.blocks):
            for key in ("mean", "scale", "pca_mean", "components"):
                out[f"b{i}.{key}"] = np.ascontiguousarray(getattr(b, key), dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, names: Sequence[str], arrays: Mapping[str, np.ndarray]) -> "FeatureTransform":
        blocks = [
            BlockTransform(*(np.asarray(arrays[f"b{i}.{k}"]) for k in ("mean", "scale", "pca_mean", "components")))
            for i in range(len(names))
        ]
        return cls(list(names), blocks)


# ------------------------------------------------------------------------------ network
class SharedTrunkNet(torch.nn.Module):
    """``(n, d_in) -> (n, n_targets)`` logits through Linear/ReLU/Dropout hidden layers."""

    def __init__(self, d_in: int, n_targets: int, hidden: Sequence[int] = (256, 128),
                 dropout: Sequence[float] = (0.3, 0.2)):
        super().__init__()
        if len(hidden) != len(dropout):
            raise ValueError("hidden and dropout need the same length")
        self.d_in, self.n_targets = int(d_in), int(n_targets)
        self.hidden, self.dropout = [int(h) for h in hidden], [float(p) for p in dropout]
        layers: list[torch.nn.Module] = []
        width = self.d_in
        for h, p in zip(self.hidden, self.dropout):
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), torch.nn.Dropout(p)]
            width = h
        layers.append(torch.nn.Linear(width, self.n_targets))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def spec(self) -> dict:
        return {"d_in": self.d_in, "n_targets": self.n_targets, "hidden": self.hidden, "dropout": self.dropout}


def masked_bce_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits over present labels only:
    ``sum(mask * bce(logits, y)) / max(sum(mask), 1)``.

    ``logits``, ``y``, ``mask`` are ``(n, T)``; ``y`` may be a soft score in [0, 1] and may
    hold NaN (or anything) where ``mask == 0`` — those entries contribute neither loss nor
    gradient. ``mask=None`` means ``~isnan(y)``.
    """
    if mask is None:
        mask = ~torch.isnan(y)
    mask = mask.to(logits.dtype)
    y_safe = torch.where(mask > 0, torch.nan_to_num(y, nan=0.0), torch.zeros_like(y))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_safe, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp_min(1.0)


class Ensemble(torch.nn.Module):
    """Several trunks; ``predict_proba`` averages their sigmoid outputs (eval mode)."""

    def __init__(self, members: Sequence[SharedTrunkNet]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of member sigmoids, ``(n, T)``."""
        return torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n, d_in)`` features -> ``(n, T)`` float64 probabilities."""
        self.eval()
        return self(torch.as_tensor(np.asarray(X, dtype=np.float32))).double().numpy()
