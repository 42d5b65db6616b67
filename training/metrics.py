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


def weighted_mean_auc(Y: np.ndarray, P: np.ndarray, W: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """``(B, T)`` AUC per target under each weighting ``W`` ``(B, n)``
    (:func:`weighted_auc`) over present labels; with ``groups`` ``(n,)``, within
    each group and averaged ``sum_g n_g AUC^g / sum_g n_g`` over the groups where it is defined
    (``n_g``: the group's rows)."""
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    masks = [np.ones(len(Y), bool)] if groups is None else [groups == g for g in np.unique(groups)]
    num, den = np.zeros((W.shape[0], Y.shape[1])), np.zeros((W.shape[0], Y.shape[1]))
    for m in masks:
        size = m.sum()
        for t in range(Y.shape[1]):
            keep = m & ~np.isnan(Y[:, t])
            auc = weighted_auc(Y[keep, t], P[keep, t], W[:, keep])
            ok = np.isfinite(auc)
            num[ok, t] += size * auc[ok]
            den[ok, t] += size
    with np.errstate(invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def within_group_auc(Y: np.ndarray, P: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``(T,)`` within-group AUC per target: ``AUC_t = sum_g n_g AUC_t^g / sum_g n_g`` over the
    groups ``g`` (e.g. tasks) where target ``t`` has both classes, ``n_g`` the group's rows.

    ``Y``, ``P``: ``(n, T)``; ``groups``: ``(n,)``. Ranking *across* groups does not count:
    a router that only tells tasks apart scores 0.5 here, however high its pooled AUC.
    NaN for a target with one class in every group."""
    return weighted_mean_auc(Y, P, np.ones((1, len(Y))), np.asarray(groups, dtype=object))[0]


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


def pairwise_terms(y_true: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query ``i``, ``(hits_i, weight_i)``, each ``(n,)``, over its pairs of targets ``a < b``
    with both labels present: ``d_iab = y_ia - y_ib``, ``weight_i = sum_ab |d_iab|``, ``hits_i =
    sum_ab |d_iab| ([sign(p_ia - p_ib) = sign(d_iab)] + 0.5 [p_ia = p_ib])``. A pair whose labels
    agree weighs 0; a soft label's margin weighs its pair (0/1 labels: each differing pair 1)."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(p, dtype=np.float64)
    a, b = np.triu_indices(y.shape[1], k=1)
    d, dp = y[:, a] - y[:, b], p[:, a] - p[:, b]  # (n, pairs)
    w = np.nan_to_num(np.abs(d))  # a missing label: weight 0
    hit = np.where(dp * d > 0, 1.0, np.where(dp == 0, 0.5, 0.0))
    return (w * hit).sum(axis=1), w.sum(axis=1)


def pairwise_auc(y_true: np.ndarray, p: np.ndarray) -> float:
    """How often the better of two targets is ranked higher: ``sum_i hits_i / sum_i weight_i`` of
    :func:`pairwise_terms` over each query's pairs of targets whose labels differ. It reads what a
    routing decision needs, which target is better for this query, where the per-target AUC reads
    which queries a target gets right; a per-query shift of ``p`` leaves it unchanged. ``(n, T)``
    inputs; nan when no pair differs; 0.5 for a ``p`` constant within each query."""
    hits, weight = pairwise_terms(y_true, p)
    total = weight.sum()
    return float(hits.sum() / total) if total > 0 else float("nan")


# ----------------------------------------------------------------- the best single target
BEST_SINGLE_TIE_BREAK = ("the higher accuracy first; among equal accuracies the lower mean cost; then the earlier "
                         "target in the targets' order")


def best_target(accs, costs) -> int:
    """Index of the best single target by :data:`BEST_SINGLE_TIE_BREAK`, from each target's
    accuracy ``(T,)`` (nan: no label, ranks last) and mean cost ``(T,)``. Equal accuracies are
    compared exactly: a tie is the same share of right answers."""
    accs, costs = np.asarray(accs, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    return int(np.lexsort((np.arange(len(accs)), costs, -np.nan_to_num(accs, nan=-np.inf)))[0])
