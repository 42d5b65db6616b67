"""Prediction quality of per-target P(correct), used by the fit and evaluate stages.

Conventions: ``n`` queries, ``T`` targets. ``Y`` is the ``(n, T)`` correctness matrix (0/1
or a soft score in [0, 1], e.g. the probability of the right answer or the share of samples
that passed); NaN marks a missing label and is never read as 0. ``P`` is ``(n, T)`` predicted
P(correct).

Soft labels are used as they are, never thresholded: a row with score ``y`` counts as a
positive with weight ``y`` and as a negative with weight ``1 - y`` (:func:`soft_rows`), so a
right answer given probability 0.4 counts 0.4 right. The AUCs (:func:`masked_auc`,
:func:`weighted_auc`), :func:`brier` and :func:`log_loss` all read soft scores so; with 0/1
labels they are the usual figures, unchanged. Layer-probe metrics are
:mod:`training.fit.separability`; routing metrics :mod:`training.evaluate.routing_metrics`.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score


def soft_rows(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft labels ``y`` ``(m,)`` in [0, 1] as weighted hard rows: ``(rows, labels, weights)``,
    each ``(k,)``, ``k <= 2m``. Row ``i`` appears as class 1 with weight ``y_i`` and as class 0
    with weight ``1 - y_i``, in row order (class 1 first), zero weights dropped; so 0/1 labels
    give ``rows = arange(m)``, ``labels = y``, ``weights = 1``. A weighted loss or AUC over them
    is the soft-target one, e.g. ``sum_k w_k log p(labels_k | x_rows_k) =
    sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)]``."""
    y = np.asarray(y, dtype=np.float64)
    rows = np.repeat(np.arange(len(y)), 2)
    labels = np.tile([1, 0], len(y))
    weights = np.column_stack([y, 1.0 - y]).ravel()
    keep = weights > 0
    return rows[keep], labels[keep], weights[keep]


# ----------------------------------------------------------------- prediction quality
def _auc_1d(y: np.ndarray, p: np.ndarray) -> float:
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if not (y.sum() > 0 and (1.0 - y).sum() > 0):
        return float("nan")
    rows, labels, weights = soft_rows(y)
    return float(roc_auc_score(labels, p[rows], sample_weight=weights))


def masked_auc(y_true: np.ndarray, p: np.ndarray):
    """Soft ROC AUC over present labels: sklearn's weighted ``roc_auc_score`` over
    :func:`soft_rows` (row ``i`` a positive with weight ``y_i``, a negative with ``1 - y_i``), i.e.
    ``AUC = sum_{i,j} y_i (1 - y_j) ([p_i > p_j] + 0.5 [p_i = p_j]) / (sum_i y_i sum_j (1 - y_j))``;
    with 0/1 labels exactly the plain ROC AUC. A soft label's own uncertainty caps it below 1 (even
    ``p = y`` ties each row's two halves), so soft and thresholded AUCs are not comparable figures.
    ``(n,)`` inputs give a float, ``(n, T)`` a ``(T,)`` array; nan for a target whose present labels
    are all 0 or all 1."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        return _auc_1d(y, p)
    return np.array([_auc_1d(y[:, j], p[:, j]) for j in range(y.shape[1])])


def weighted_auc(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``(B,)`` soft Mann-Whitney AUC of scores ``p`` ``(m,)`` against labels ``y`` ``(m,)`` in
    [0, 1] (no NaN) under ``B`` row weightings ``W`` ``(B, m)`` (a bootstrap's draw counts; all
    ones: the plain AUC). Row ``i`` is a positive of weight ``w_i y_i`` and a negative of weight
    ``w_i (1 - y_i)`` (:func:`soft_rows`); with ``a_i = w_i y_i``, ``b_j = w_j (1 - y_j)``,
    ``AUC = sum_i a_i (sum_{j: p_j < p_i} b_j + 0.5 sum_{j: p_j = p_i} b_j) / (sum a sum b)``, the
    rank formula on the data with row ``i`` repeated ``w_i`` times; :func:`masked_auc` up to float
    rounding. NaN where a weighting leaves no positive or no negative weight. One sort of ``p``
    serves every weighting, so a thousand bootstrap replicates cost little more than one."""
    B = W.shape[0]
    if len(p) == 0:
        return np.full(B, np.nan)
    order = np.argsort(p, kind="stable")
    p, y, W = p[order], np.asarray(y, dtype=np.float64)[order], W[:, order]
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # runs of tied scores
    neg_w = np.add.reduceat(W * (1.0 - y), starts, axis=1)  # (B, distinct scores)
    pos_w = np.add.reduceat(W * y, starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    u = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    n1, n0 = pos_w.sum(axis=1), neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


def _masked_mean(values: np.ndarray, y: np.ndarray):
    """Mean of ``values`` over present labels per column (``(n,)`` -> float, ``(n, T)`` -> ``(T,)``)."""
    masked = np.where(np.isnan(y), np.nan, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> nan
        out = np.nanmean(masked, axis=0)
    return float(out) if y.ndim == 1 else out


def brier(y_true: np.ndarray, p: np.ndarray):
    """Brier score ``mean((p - y)^2)`` over present labels (soft scores kept as is). ``(n,)``
    gives a float, ``(n, T)`` a ``(T,)`` array; nan where no label is present."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return _masked_mean((p - y) ** 2, y)


def log_loss(y_true: np.ndarray, p: np.ndarray, eps: float = 1e-15):
    """Soft-target log-loss ``mean(-(y log p + (1 - y) log(1 - p)))`` over present labels, ``p``
    clipped to ``[eps, 1 - eps]`` (the cross-entropy SharedTrunkNet minimises; its minimum over
    ``p`` is at ``p = y``). ``(n,)`` gives a float, ``(n, T)`` a ``(T,)`` array; nan where no
    label is present."""
    y, p = np.asarray(y_true, dtype=np.float64), np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y0 = np.nan_to_num(y)
    return _masked_mean(-(y0 * np.log(p) + (1.0 - y0) * np.log1p(-p)), y)


# ----------------------------------------------------------------- the best single target
BEST_SINGLE_TIE_BREAK = ("the higher accuracy first; among equal accuracies the lower mean cost; then the earlier "
                         "target in the targets' order")


def best_target(accs, costs) -> int:
    """Index of the best single target by :data:`BEST_SINGLE_TIE_BREAK`, from each target's
    accuracy ``(T,)`` (nan: no label, ranks last) and mean cost ``(T,)``. Equal accuracies are
    compared exactly: a tie is the same share of right answers."""
    accs, costs = np.asarray(accs, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    return int(np.lexsort((np.arange(len(accs)), costs, -np.nan_to_num(accs, nan=-np.inf)))[0])
