"""Prediction quality of per-target P(correct), used by the fit and evaluate stages.

Conventions: ``n`` queries, ``T`` targets. ``Y`` is the ``(n, T)`` correctness matrix (0/1
or a score in [0, 1]); NaN marks a missing label and is never read as 0. Where a binary
label is needed, ``y >= 0.5`` is "correct". ``P`` is ``(n, T)`` predicted P(correct).
Layer-probe metrics are :mod:`training.fit.separability`; routing metrics
:mod:`training.evaluate.routing_metrics`.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score


# ----------------------------------------------------------------- prediction quality
def _auc_1d(y: np.ndarray, p: np.ndarray) -> float:
    keep = ~np.isnan(y)
    yb = y[keep] >= 0.5
    if yb.all() or not yb.any():
        return float("nan")
    return float(roc_auc_score(yb, p[keep]))


def masked_auc(y_true: np.ndarray, p: np.ndarray):
    """ROC AUC over present labels (``y >= 0.5`` positive). ``(n,)`` inputs give a float,
    ``(n, T)`` a ``(T,)`` array; nan for a target with only one class present."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        return _auc_1d(y, p)
    return np.array([_auc_1d(y[:, j], p[:, j]) for j in range(y.shape[1])])


def brier(y_true: np.ndarray, p: np.ndarray):
    """Brier score ``mean((p - y)^2)`` over present labels (scores kept as is). ``(n,)``
    gives a float, ``(n, T)`` a ``(T,)`` array; nan where no label is present."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(p, dtype=np.float64)
    sq = np.where(np.isnan(y), np.nan, (p - y) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> nan
        out = np.nanmean(sq, axis=0)
    return float(out) if y.ndim == 1 else out


# ----------------------------------------------------------------- the best single target
BEST_SINGLE_TIE_BREAK = ("the higher accuracy first; among equal accuracies the lower mean cost; then the earlier "
                         "target in the targets' order")


def best_target(accs, costs) -> int:
    """Index of the best single target by :data:`BEST_SINGLE_TIE_BREAK`, from each target's
    accuracy ``(T,)`` (nan: no label, ranks last) and mean cost ``(T,)``. Equal accuracies are
    compared exactly: a tie is the same share of right answers."""
    accs, costs = np.asarray(accs, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    return int(np.lexsort((np.arange(len(accs)), costs, -np.nan_to_num(accs, nan=-np.inf)))[0])
