"""Sampling uncertainty of evaluation numbers (pure functions).

A test split of a few hundred queries moves a per-target AUC by a few hundredths from
one draw to the next, so a margin between two routers is reported with a paired
bootstrap interval: both routers are rescored on the same resampled queries. Where
queries come in tasks, the pooled AUC also rewards telling tasks apart, which any router
told the task does for free; :func:`training.metrics.within_group_auc` scores the ranking inside each task.

A bootstrap replicate is a weighting of the rows (how often each was drawn), so every
replicate's AUC comes from one sort of the scores (:func:`training.metrics.weighted_auc`),
vectorised over replicates: a thousand replicates over sixty tasks cost a second, not minutes.
Soft labels (a score in [0, 1]) count as a positive with weight ``y`` and a negative with
weight ``1 - y``, as everywhere in :mod:`training.metrics`; 0/1 labels are the usual AUC.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.metrics import pairwise_terms, weighted_mean_auc


def rank_auc(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``(T,)`` ROC AUC per column by the Mann-Whitney statistic (ties get average ranks):
    ``AUC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0)`` over present labels
    (soft labels weighted, :func:`training.metrics.weighted_auc`); nan where a column has one
    class. Equals ``training.metrics.masked_auc`` (up to float rounding) at a fraction of its overhead."""
    return weighted_mean_auc(Y, P, np.ones((1, len(Y))))[0]


def _resample(rng: np.random.Generator, members: list[np.ndarray] | None, n: int) -> np.ndarray:
    """``n`` indices drawn with replacement; within each group's ``members`` (its size kept) when given."""
    if members is None:
        return rng.integers(0, n, size=n)
    return np.concatenate([rng.choice(rows, size=len(rows)) for rows in members])


def _weights(n: int, n_boot: int, seed: int, members: list[np.ndarray] | None = None) -> np.ndarray:
    """``(n_boot + 1, n)`` row weights: row 0 the full sample (all ones), then one row of draw counts
    per replicate (:func:`_resample`)."""
    rng = np.random.default_rng(seed)
    W = np.ones((n_boot + 1, n))
    for b in range(n_boot):
        W[b + 1] = np.bincount(_resample(rng, members, n), minlength=n)
    return W


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the finite replicates; NaN if none."""
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return float("nan"), float("nan")
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_weights(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot + 1, n)`` row weights of a plain (unstratified) bootstrap: row 0 all ones (the full
    sample), then each replicate's draw counts. Public name of :func:`_weights` for other modules."""
    return _weights(n, n_boot, seed)


def percentile_interval(reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the finite replicates (NaN if none)."""
    return _interval(np.asarray(reps, dtype=np.float64), level)


def _margins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(B,)`` mean over targets of ``a - b`` (``(B, T)``), over targets finite in both; NaN if none."""
    both = np.isfinite(a) & np.isfinite(b)
    diff = np.where(both, a - b, 0.0).sum(axis=1)
    count = both.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, diff / np.maximum(count, 1), np.nan)


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
    members = None if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]
    W = _weights(len(Y), n_boot, seed, members)
    m = _margins(weighted_mean_auc(Y, P, W, groups), weighted_mean_auc(Y, Q, W, groups))
    reps = m[1:][np.isfinite(m[1:])]
    lo, hi = _interval(reps, level)
    return {"margin": float(m[0]), "low": lo, "high": hi,
            "p_le_zero": float(np.mean(reps <= 0)) if len(reps) else float("nan")}


def paired_bootstrap_pairwise_margin(Y: np.ndarray, P: np.ndarray, Q: np.ndarray, n_boot: int = 1000,
                                     level: float = 0.95, seed: int = 0, groups: np.ndarray | None = None
                                     ) -> dict[str, float]:
    """Margin ``m = pairwise AUC(P) - pairwise AUC(Q)`` (:func:`training.metrics.pairwise_auc`) with a
    percentile bootstrap interval: a replicate reweights the queries by their draw counts ``w``,
    ``AUC = sum_i w_i hits_i / sum_i w_i weight_i`` (:func:`training.metrics.pairwise_terms`), both
    routers on the same draws, stratified by ``groups`` ``(n,)`` when given. ``Y``, ``P``, ``Q``:
    ``(n, T)``. Returns ``{"margin", "low", "high", "p_le_zero"}`` as
    :func:`paired_bootstrap_auc_margin`."""
    groups = None if groups is None else np.asarray(groups, dtype=object)
    members = None if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]
    W = _weights(len(Y), n_boot, seed, members)
    (hp, wp), (hq, wq) = pairwise_terms(Y, P), pairwise_terms(Y, Q)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (W @ hp) / (W @ wp) - (W @ hq) / (W @ wq)
    reps = m[1:][np.isfinite(m[1:])]
    lo, hi = _interval(reps, level)
    return {"margin": float(m[0]), "low": lo, "high": hi,
            "p_le_zero": float(np.mean(reps <= 0)) if len(reps) else float("nan")}


def bootstrap_operating_point(Y: np.ndarray, C: np.ndarray, choice: np.ndarray, best: int, dear: int,
                              n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """One routing's test figures with percentile bootstrap intervals over the queries.

    ``Y``: ``(n, T)`` labels in [0, 1], NaN = missing; ``C``: ``(n, T)`` outcome costs; ``choice``:
    ``(n,)`` the target routed to; ``best``, ``dear``: the best single and the most expensive target.
    Per replicate (query weights ``w``, draw counts): ``acc = sum w y_choice / sum w`` over present
    labels (as :func:`training.evaluate.routing_metrics.routing_outcome`), ``acc - acc_best`` (paired:
    the same queries), and ``savings = 1 - sum w c_choice / sum w c_dear``. Returns
    ``{"accuracy", "accuracy_minus_best", "cost_savings"}``, each ``[full-sample value, low, high]``.
    """
    Y, C = np.asarray(Y, dtype=np.float64), np.asarray(C, dtype=np.float64)
    if Y.ndim != 2 or C.shape != Y.shape or len(choice) != len(Y):
        raise ValueError(f"Y and C must be the same (n, T) shape with one choice per row; got "
                         f"{Y.shape}, {C.shape}, {len(choice)}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    rows, W = np.arange(len(Y)), _weights(len(Y), n_boot, seed)

    def accuracy(y: np.ndarray) -> np.ndarray:
        present = ~np.isnan(y)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (W * np.where(present, y, 0.0)).sum(axis=1) / (W * present).sum(axis=1)

    acc = accuracy(Y[rows, choice])
    with np.errstate(invalid="ignore", divide="ignore"):
        savings = 1.0 - (W @ C[rows, choice]) / (W @ C[:, dear])
    pairs = (("accuracy", acc), ("accuracy_minus_best", acc - accuracy(Y[:, best])), ("cost_savings", savings))
    return {name: [float(v[0]), *_interval(v[1:], level)] for name, v in pairs}


def bootstrap_task_averaged(ours: np.ndarray, others: dict[str, np.ndarray], tasks: np.ndarray, n_boot: int = 1000,
                            level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """A routing's task-averaged accuracy and its paired differences from other routings, with
    percentile bootstrap intervals stratified by task (each replicate redraws every task's
    queries within the task, its size kept, so every task stays in every replicate).

    ``ours``: ``(n,)`` the score of the target our routing chose per query (NaN = missing);
    ``others``: ``{name: (n,)}`` the same for each reference routing (e.g. the best single
    target, the task-aware router); ``tasks``: ``(n,)``. Per replicate ``b`` with draw counts
    ``w``: ``acc_b = mean_g (sum_{i in g} w_i s_i / sum_{i in g} w_i)``
    (:func:`training.evaluate.task_metrics.task_averaged_rows`). Returns ``{"accuracy": [value,
    low, high], "minus": {name: [value, low, high]}}`` (``value``: the full sample)."""
    from training.evaluate.task_metrics import task_averaged_rows

    tasks = np.asarray(tasks, dtype=object).astype(str)
    if len(ours) != len(tasks) or any(len(v) != len(tasks) for v in others.values()):
        raise ValueError(f"every routing needs one score per query ({len(tasks)} tasks given)")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    members = [np.flatnonzero(tasks == g) for g in np.unique(tasks)]
    W = _weights(len(tasks), n_boot, seed, members)
    acc = task_averaged_rows(ours, tasks, W)

    def cell(v: np.ndarray) -> list[float]:
        return [float(v[0]), *_interval(v[1:], level)]

    return {"accuracy": cell(acc),
            "minus": {name: cell(acc - task_averaged_rows(s, tasks, W)) for name, s in others.items()}}
