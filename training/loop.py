"""The early-stopping training loop, one for every network training fits.

- :func:`early_stopping`: Adam on a loss (default :func:`shared.trunk.masked_bce_loss`; the
  trunk's :mod:`training.objectives` choice) over shuffled minibatches, stopped once the
  validation loss has not improved by ``min_delta`` for ``patience`` epochs; returns the best epoch's weights. SharedTrunkNet
  (:func:`train_one`) and the matrix-factorisation baseline both train through it.
- :class:`TrunkConfig`: SharedTrunkNet's architecture and loop settings.
- :func:`train_one`, :func:`select_ensemble`, :func:`build_ensemble`: one seed of
  SharedTrunkNet (callable from a Ray Train worker), and the ensemble kept from several.

Shapes: ``X`` is ``(n, d)``, ``Y`` ``(n, T)`` in [0, 1] with NaN for a missing label, a
mask ``M`` ``(n, T)`` with 1 = label present (None: derived from NaN). ``M`` may instead be float
weights per cell (0 = missing), e.g. inverse propensities (:func:`propensity_weights`): the masked
BCE is then ``sum(M * bce) / sum(M)``, so a cell of weight 10 counts ten times one of weight 1;
the ranking terms of :mod:`training.objectives` read only which cells are present.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from shared.config import StrictConfig
from shared.errors import BadInput
from shared.trunk import Ensemble, SharedTrunkNet, masked_bce_loss
from training.objectives import ObjectiveConfig, objective


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
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig,
                                       description="Loss: the masked BCE, or it plus a ranking term.")


PropensityWeighting = Literal["none", "ips", "clipped"]


def propensity_weights(Y: np.ndarray, propensity: np.ndarray | None, mode: PropensityWeighting = "none",
                       clip: float = 10.0) -> np.ndarray | None:
    """``(n, T)`` loss weights of the labelled cells of ``Y`` ``(n, T)`` from their propensities
    P(target | decision) (``(n, T)``, NaN where a cell has none, e.g. a pinned request: weight 1):
    ``ips``: ``1 / p``; ``clipped``: ``min(1 / p, clip)``; a missing label: 0. The weighted BCE then
    estimates the loss over every (query, target) cell, not just those the logging router chose
    (explored cells are rare and weigh more). ``none`` (or no propensities): None, the plain mask."""
    if mode == "none" or propensity is None:
        return None
    if mode not in ("ips", "clipped"):
        raise ValueError(f"unknown propensity weighting {mode!r}; known: none, ips, clipped")
    p = np.asarray(propensity, dtype=np.float64)
    if (p[~np.isnan(p)] <= 0).any():
        raise ValueError("a propensity <= 0 cannot weight a logged cell")
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(np.isnan(p), 1.0, 1.0 / p)
    if mode == "clipped":
        w = np.minimum(w, clip)
    return np.where(np.isnan(np.asarray(Y, dtype=np.float64)), 0.0, w).astype(np.float32)


@dataclass
class LoopResult:
    """What :func:`early_stopping` found: the network with its best weights loaded."""

    net: torch.nn.Module
    val_loss: float
    best_epoch: int
    epochs_run: int
    state_dict: dict = field(repr=False)


def input_tensor(x) -> torch.Tensor:
    """One network input as a tensor: a bool array (a mask) stays bool, anything else becomes float32."""
    return torch.as_tensor(x if np.asarray(x).dtype == bool else np.asarray(x, dtype=np.float32))


def _tensors(X, Y, M):
    """``X`` an array ``(n, d)`` or a tuple of arrays with ``n`` rows each (a network of several inputs, e.g.
    :class:`shared.pooling.PooledTrunkNet`'s), each through :func:`input_tensor`."""
    X = tuple(input_tensor(x) for x in (X if isinstance(X, tuple) else (X,)))
    Y = torch.as_tensor(np.asarray(Y, dtype=np.float32))
    if M is None:
        return X, Y, ~torch.isnan(Y)
    M = np.asarray(M)
    return X, Y, torch.as_tensor(M if M.dtype == bool else M.astype(np.float32))  # float: weights per cell


def early_stopping(make_net: Callable[[], torch.nn.Module], train: tuple, val: tuple, seed: int, *,
                   lr: float, weight_decay: float, batch_size: int, max_epochs: int, patience: int,
                   min_delta: float, loss: Callable = masked_bce_loss) -> LoopResult:
    """Train ``make_net()`` with Adam on ``loss(logits, y, mask)`` (default the masked BCE),
    early-stopped on the same loss over the validation rows.

    ``train`` and ``val`` are ``(X, Y, M)`` with ``X (n, d)``, ``Y (n, T)`` (NaN = missing)
    and ``M (n, T)`` or None: a bool mask, or float weights per cell (0 = missing; the loss weighs each
    cell's BCE by it) (``X`` may be a tuple of such arrays: the network's inputs, ``net(*X)``).
    Minibatch order comes from ``numpy.default_rng(seed)``, the
    initial weights from ``torch.manual_seed(seed)`` inside ``fork_rng``: the result
    depends only on the inputs and ``seed``, and the global torch RNG is left untouched.
    """
    Xtr, Ytr, Mtr = _tensors(*train)
    Xva, Yva, Mva = _tensors(*val)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_net()
        groups = net.param_groups(lr) if hasattr(net, "param_groups") else net.parameters()  # per-group rates
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
        best, best_state, best_epoch, stale, epoch = float("inf"), None, -1, 0, 0
        for epoch in range(max_epochs):
            net.train()
            order = torch.as_tensor(rng.permutation(Xtr[0].shape[0]))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                opt.zero_grad()
                loss(net(*(x[idx] for x in Xtr)), Ytr[idx], Mtr[idx]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val_loss = float(loss(net(*Xva), Yva, Mva))
            if val_loss < best - min_delta:
                best, best_state, best_epoch, stale = val_loss, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is None:
        raise BadInput(f"the validation loss was never finite ({val_loss}) in {epoch + 1} epoch(s): the inputs hold "
                       "NaN or inf (e.g. encoder states beyond float16's range in a capture made before they were "
                       "clipped: capture again), or the learning rate diverges")
    net.load_state_dict(best_state)
    return LoopResult(net.eval(), best, best_epoch, epoch + 1, best_state)


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


def train_one(Xtr, Ytr, Mtr, Xva, Yva, Mva, seed: int, cfg: TrunkConfig | None = None) -> TrainResult:
    """One SharedTrunkNet through :func:`early_stopping` on ``cfg.objective`` (``patience`` epochs
    without a ``min_delta`` improvement of the validation loss). Returns the best epoch's weights."""
    cfg = cfg or TrunkConfig()
    d_in, n_targets = np.shape(Xtr)[1], np.shape(Ytr)[1]
    out = early_stopping(lambda: SharedTrunkNet(d_in, n_targets, cfg.hidden, cfg.dropout),
                         (Xtr, Ytr, Mtr), (Xva, Yva, Mva), seed, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, patience=cfg.patience,
                         min_delta=cfg.min_delta, loss=objective(cfg.objective))
    return TrainResult(seed, out.val_loss, out.best_epoch, out.epochs_run, out.state_dict, out.net.spec())


def select_ensemble(results: Sequence[TrainResult], k: int) -> list[TrainResult]:
    """The ``k`` results with the lowest validation loss (ties by seed), best first."""
    if k < 1:
        raise ValueError("k must be >= 1")
    return sorted(results, key=lambda r: (r.val_loss, r.seed))[:k]


def build_ensemble(results: Sequence[TrainResult]) -> Ensemble:
    """An :class:`~shared.trunk.Ensemble` of the given results' best weights."""
    return Ensemble([r.build() for r in results])
