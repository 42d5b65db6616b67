"""Sampling uncertainty of evaluation numbers (pure functions).

A test split of a few hundred queries moves a per-target AUC by a few hundredths from
one draw to the next, so a margin between two routers is reported with a paired
bootstrap interval: both routers are rescored on the same resampled queries. Where
queries come in tasks, the pooled AUC also rewards telling tasks apart, which any router
told the task does for free; :func:`within_group_auc` scores the ranking inside each task.
"""

from __future__ import annotations

import numpy as np


def rank_auc(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``(T,)`` ROC AUC per column by the Mann-Whitney statistic (ties get average ranks):
    ``AUC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0)`` over present labels
    (``y >= 0.5`` positive); nan where a column has one class. Equals sklearn's
    ``roc_auc_score`` (``training.metrics.masked_auc``) at a fraction of its overhead."""
    from scipy.stats import rankdata

    out = np.full(Y.shape[1], np.nan)
    for j in range(Y.shape[1]):
        keep = ~np.isnan(Y[:, j])
        pos = Y[keep, j] >= 0.5
        n1 = int(pos.sum())
        n0 = len(pos) - n1
        if n1 and n0:
            out[j] = (rankdata(P[keep, j])[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def within_group_auc(Y: np.ndarray, P: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``(T,)`` within-group AUC per target: ``AUC_t = sum_g n_g AUC_t^g / sum_g n_g`` over the
    groups ``g`` (e.g. tasks) where target ``t`` has both classes, ``n_g`` the group's rows.

    ``Y``, ``P``: ``(n, T)``; ``groups``: ``(n,)``. Ranking *across* groups does not count:
    a router that only tells tasks apart scores 0.5 here, however high its pooled AUC.
    NaN for a target with one class in every group."""
    groups = np.asarray(groups)
    num, den = np.zeros(Y.shape[1]), np.zeros(Y.shape[1])
    for g in np.unique(groups):
        m = groups == g
        with np.errstate(invalid="ignore"):
            auc = rank_auc(Y[m], P[m])
        ok = np.isfinite(auc)
        num[ok] += m.sum() * auc[ok]
        den[ok] += m.sum()
    with np.errstate(invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _resample(rng: np.random.Generator, groups: np.ndarray | None, n: int) -> np.ndarray:
    """``n`` indices drawn with replacement; within each group (its size kept) when ``groups`` is given."""
    if groups is None:
        return rng.integers(0, n, size=n)
    return np.concatenate([rng.choice(np.flatnonzero(groups == g), size=int((groups == g).sum()))
                           for g in np.unique(groups)])


def paired_bootstrap_auc_margin(Y: np.ndarray, P: np.ndarray, Q: np.ndarray, n_boot: int = 1000,
                                level: float = 0.95, seed: int = 0, groups: np.ndarray | None = None
                                ) -> dict[str, float]:
    """Margin ``m = mean_t AUC_t(P) - mean_t AUC_t(Q)`` with a percentile bootstrap interval.

    ``Y``: ``(n, T)`` labels in [0, 1], NaN = missing; ``P``, ``Q``: ``(n, T)`` two routers'
    P(correct). Each of ``n_boot`` replicates draws ``n`` query indices with replacement
    and recomputes ``m`` on them (targets with a single class in a replicate are skipped by
    the NaN-mean). With ``groups`` (``(n,)``, e.g. each query's task) ``AUC_t`` is
    :func:`within_group_auc` and the draws are stratified by group. Returns ``{"margin",
    "low", "high", "p_le_zero"}``: the full-sample margin, the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the replicates, and the share of replicates with ``m <= 0``.
    """
    Y, P, Q = (np.asarray(a, dtype=np.float64) for a in (Y, P, Q))
    if not (Y.shape == P.shape == Q.shape) or Y.ndim != 2:
        raise ValueError(f"Y, P and Q must be the same (n, T) shape; got {Y.shape}, {P.shape}, {Q.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    if groups is not None and len(groups) != len(Y):
        raise ValueError(f"groups has {len(groups)} entries for {len(Y)} rows")
    groups = None if groups is None else np.asarray(groups, dtype=object)

    def margin(idx: np.ndarray) -> float:
        with np.errstate(invalid="ignore"):
            if groups is None:
                a, b = rank_auc(Y[idx], P[idx]), rank_auc(Y[idx], Q[idx])
            else:
                a, b = within_group_auc(Y[idx], P[idx], groups[idx]), within_group_auc(Y[idx], Q[idx], groups[idx])
        both = np.isfinite(a) & np.isfinite(b)
        return float(np.mean(a[both] - b[both])) if both.any() else float("nan")

    rng = np.random.default_rng(seed)
    n = len(Y)
    reps = np.array([margin(_resample(rng, groups, n)) for _ in range(n_boot)])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if len(reps) else (np.nan, np.nan)
    return {"margin": margin(np.arange(n)), "low": float(lo), "high": float(hi),
            "p_le_zero": float(np.mean(reps <= 0)) if len(reps) else float("nan")}
