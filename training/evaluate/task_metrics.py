"""Task-averaged accuracy, RouterDC's metric (pure functions).

RouterDC scores a router by the mean score of the targets it picks within each task, then the
unweighted mean of those task means: a task of 115 queries weighs as much as one of 2,000,
where the pooled accuracy weighs every query alike. Scores may be soft (a probability of the
right answer, a share of samples that passed); every mean here averages them as they are.

Conventions: ``n`` queries, ``T`` targets. ``Y`` is ``(n, T)`` scores in [0, 1], NaN = missing
(never counted, as in :func:`training.evaluate.routing_metrics.routing_outcome`); ``tasks`` is
``(n,)`` each query's task; ``W`` is ``(n, T)`` choice weights (rows sum to 1; one-hot for a
routing, :func:`one_hot`). A task with no labelled query chosen counts in no mean.
"""

from __future__ import annotations

import numpy as np

__all__ = ["one_hot", "task_averaged", "task_averaged_rows", "task_averaged_singles", "task_averaged_oracle",
           "task_count"]


def one_hot(choice: np.ndarray, n_targets: int) -> np.ndarray:
    """``(n, T)`` choice weights of a routing ``choice`` ``(n,)`` (target index per query)."""
    choice = np.asarray(choice, dtype=np.int64)
    W = np.zeros((len(choice), n_targets))
    W[np.arange(len(choice)), choice] = 1.0
    return W


def _members(tasks: np.ndarray) -> np.ndarray:
    """``(n, G)`` one-hot task membership, tasks in sorted order."""
    _, index = np.unique(np.asarray(tasks, dtype=object).astype(str), return_inverse=True)
    return one_hot(index.reshape(-1), int(index.max()) + 1 if len(index) else 0)


def _mean_over_tasks(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``(B,)`` unweighted mean over tasks of ``num / den`` (``(B, G)``), over tasks with ``den > 0``;
    NaN where no task has any."""
    ok = den > 0
    per_task = np.divide(num, den, out=np.zeros_like(num), where=ok)
    count = ok.sum(axis=1)
    return np.divide(per_task.sum(axis=1), count, out=np.full(len(count), np.nan), where=count > 0)


def task_averaged_rows(scores: np.ndarray, tasks: np.ndarray, R: np.ndarray | None = None) -> np.ndarray:
    """``(B,)`` task-averaged mean of per-query ``scores`` ``(n,)`` (NaN = missing) under row weights
    ``R`` ``(B, n)`` (a bootstrap's draw counts; None: one row of ones, the plain value):
    ``acc = (1 / |G'|) sum_{g in G'} (sum_{i in g} R_i s_i) / (sum_{i in g} R_i [s_i present])``
    over the tasks ``G'`` with a present, drawn score."""
    s = np.asarray(scores, dtype=np.float64)
    R = np.ones((1, len(s))) if R is None else np.asarray(R, dtype=np.float64)
    present = ~np.isnan(s)
    M = _members(tasks)
    return _mean_over_tasks(R @ (np.where(present, s, 0.0)[:, None] * M), R @ (present[:, None] * M))


def task_averaged(Y: np.ndarray, W: np.ndarray, tasks: np.ndarray) -> float:
    """Task-averaged accuracy of choice weights ``W``: within task ``g``,
    ``acc_g = sum_{i in g, j} W_ij Y_ij / sum_{i in g, j} W_ij`` over present labels (the pooled
    :func:`training.evaluate.routing_metrics.expected_outcome` of the task's rows), then the
    unweighted mean of ``acc_g`` over tasks. NaN when no task has a present label chosen."""
    Y, W = np.asarray(Y, dtype=np.float64), np.asarray(W, dtype=np.float64)
    present = ~np.isnan(Y)
    mass, score = (W * present).sum(axis=1), np.where(present, W * np.nan_to_num(Y), 0.0).sum(axis=1)
    M = _members(tasks)
    return float(_mean_over_tasks((score[:, None] * M).sum(axis=0)[None], (mass[:, None] * M).sum(axis=0)[None])[0])


def task_averaged_singles(Y: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """``(T,)`` task-averaged accuracy of always choosing each target (its task means over its
    present labels, averaged over the tasks where it has one)."""
    Y = np.asarray(Y, dtype=np.float64)
    return np.array([task_averaged_rows(Y[:, t], tasks)[0] for t in range(Y.shape[1])])


def task_averaged_oracle(Y: np.ndarray, tasks: np.ndarray) -> float:
    """Task-averaged accuracy of the oracle: each query's best present score, task means, then
    their unweighted mean (rows with no label count in no task)."""
    Y = np.asarray(Y, dtype=np.float64)
    labelled = (~np.isnan(Y)).any(axis=1)
    best = np.where(labelled, np.where(np.isnan(Y), -np.inf, Y).max(axis=1, initial=-np.inf), np.nan)
    return float(task_averaged_rows(best, tasks)[0])


def task_count(Y: np.ndarray, tasks: np.ndarray) -> int:
    """Tasks with at least one labelled query: the ones a task-averaged mean can count."""
    labelled = (~np.isnan(np.asarray(Y, dtype=np.float64))).any(axis=1)
    return len(set(np.asarray(tasks, dtype=object)[labelled].astype(str).tolist()))
