"""The router's numeric core, shared by training and serving.

- :class:`FeatureTransform`: per feature block ``StandardScaler -> PCA`` fitted on train
  only, blocks concatenated. Fitting uses scikit-learn (imported inside :meth:`fit`);
  applying it is plain numpy on stored arrays, so serving never needs scikit-learn.
- :class:`SharedTrunkNet`: ``d_in -> 256 -> ReLU -> Dropout(0.3) -> 128 -> ReLU ->
  Dropout(0.2) -> n_targets`` logits (sizes configurable).
- :func:`masked_bce_loss`, :func:`train_one` (one seed, early stopping on validation
  loss; callable from a Ray Train worker), :func:`select_ensemble`, :class:`Ensemble`.
- :func:`route_with_tolerance`: the serving policy (cheapest target whose predicted
  P(correct) is within ``tol`` of the best).

Shapes: ``n`` queries, ``T`` targets, ``d`` features. Labels ``Y`` are ``(n, T)`` in
[0, 1] with NaN for missing; a mask ``M`` is ``(n, T)`` with 1 = label present.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from pydantic import Field

from shared.config import StrictConfig

GAP_DECIMALS = 12


# ----------------------------------------------------------------------------- policy
def probability_gaps(P: np.ndarray) -> np.ndarray:
    """``(n, T)`` gaps ``max_j P[i, j] - P[i, j]``, rounded to 1e-12 so that decimal
    tolerances behave as written (``0.8 - 0.6`` counts as a gap of exactly ``0.2``)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or not np.all(np.isfinite(P)):
        raise ValueError("P must be a finite (n_queries, n_targets) array")
    return np.round(P.max(axis=1, keepdims=True) - P, GAP_DECIMALS)


def cost_matrix(costs: np.ndarray, n: int) -> np.ndarray:
    """Broadcast per-target costs ``(T,)`` or per-query costs ``(n, T)`` to ``(n, T)``."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim == 1:
        costs = np.broadcast_to(costs, (n, costs.shape[0]))
    if costs.ndim != 2 or costs.shape[0] != n:
        raise ValueError(f"costs must be (T,) or ({n}, T); got shape {costs.shape}")
    return costs


def cheapest_where(eligible: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Per row, the index of the cheapest eligible column; ties go to the lower index
    (``argmin`` returns the first minimum). ``eligible`` and ``costs`` are ``(n, T)``."""
    masked = np.where(eligible, costs, np.inf)
    return np.argmin(masked, axis=1)


def route_with_tolerance(P: np.ndarray, costs: np.ndarray, tol: float) -> np.ndarray:
    """Chosen target per query: the cheapest target ``j`` with
    ``max_k P[i, k] - P[i, j] <= tol`` (gaps rounded to 1e-12); ties by cost, then index.

    ``P`` is ``(n, T)`` predicted P(correct); ``costs`` is ``(T,)`` or ``(n, T)``.
    ``tol = 0`` picks the (cheapest) most likely target; ``tol >= 1`` the cheapest.
    Returns int ``(n,)``.
    """
    if not tol >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tol}")
    gaps = probability_gaps(P)
    return cheapest_where(gaps <= tol, cost_matrix(costs, gaps.shape[0]))


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
class TrunkConfig(StrictConfig):
    """SharedTrunkNet architecture and training loop settings (reference recipe defaults)."""

    hidden: list[int] = Field([256, 128], description="Hidden layer widths.")
    dropout: list[float] = Field([0.3, 0.2], description="Dropout after each hidden layer.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay.")
    batch_size: int = Field(512, gt=0, description="Minibatch size.")
    max_epochs: int = Field(150, gt=0, description="Upper bound on epochs.")
    patience: int = Field(15, gt=0, description="Epochs without validation improvement before stopping.")
    min_delta: float = Field(1e-6, ge=0, description="Smallest validation-loss drop that counts as improvement.")


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


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """One seed's outcome: the best-epoch weights and its validation loss."""

    seed: int
    val_loss: float
    best_epoch: int
    epochs_run: int
    state_dict: dict = field(repr=False)
    spec: dict = field(default_factory=dict)

    def build(self) -> SharedTrunkNet:
        net = SharedTrunkNet(**self.spec)
        net.load_state_dict(self.state_dict)
        return net.eval()


def _tensors(X, Y, M):
    X = torch.as_tensor(np.asarray(X, dtype=np.float32))
    Y = torch.as_tensor(np.asarray(Y, dtype=np.float32))
    M = ~torch.isnan(Y) if M is None else torch.as_tensor(np.asarray(M, dtype=bool))
    return X, Y, M


def train_one(Xtr, Ytr, Mtr, Xva, Yva, Mva, seed: int, cfg: TrunkConfig | None = None) -> TrainResult:
    """Train one SharedTrunkNet with Adam on :func:`masked_bce_loss`, early-stopped on the
    validation loss (``patience`` epochs without a ``min_delta`` improvement).

    ``X*`` are ``(n, d)``, ``Y*`` ``(n, T)`` (NaN = missing), ``M*`` ``(n, T)`` masks or
    None (derived from NaN). The global torch RNG is left untouched (``fork_rng``), so the
    result depends only on the inputs and ``seed``. Returns the best epoch's weights.
    """
    cfg = cfg or TrunkConfig()
    Xtr, Ytr, Mtr = _tensors(Xtr, Ytr, Mtr)
    Xva, Yva, Mva = _tensors(Xva, Yva, Mva)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SharedTrunkNet(Xtr.shape[1], Ytr.shape[1], cfg.hidden, cfg.dropout)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, best_epoch, stale, epoch = float("inf"), None, -1, 0, 0
        for epoch in range(cfg.max_epochs):
            net.train()
            order = torch.as_tensor(rng.permutation(Xtr.shape[0]))
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                opt.zero_grad()
                masked_bce_loss(net(Xtr[idx]), Ytr[idx], Mtr[idx]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val = float(masked_bce_loss(net(Xva), Yva, Mva))
            if val < best - cfg.min_delta:
                best, best_state, best_epoch, stale = val, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    return TrainResult(seed, best, best_epoch, epoch + 1, best_state, net.spec())


def select_ensemble(results: Sequence[TrainResult], k: int) -> list[TrainResult]:
    """The ``k`` results with the lowest validation loss (ties by seed), best first."""
    if k < 1:
        raise ValueError("k must be >= 1")
    return sorted(results, key=lambda r: (r.val_loss, r.seed))[:k]


def build_ensemble(results: Sequence[TrainResult]) -> Ensemble:
    """An :class:`Ensemble` of the given results' best weights."""
    return Ensemble([r.build() for r in results])
