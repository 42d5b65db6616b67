"""The cross-validation every choice on train + val shares: tune's candidates (:mod:`training.fit.tune`) and
the adapted encoder (:mod:`training.adapt.choose`) are split into the same folds and scored the same way.

- :func:`split_folds`: GroupKFold over ``group_id``; in fold ``k`` the training folds are shuffled with seed
  ``seed + k`` and cut into ``1 - early_stop_share`` (train) and ``early_stop_share`` (early stopping);
- :func:`score_folds`: per-target AUC, Brier, log-loss and within-task AUC on each held-out fold, and the
  pairwise AUC, each the mean over folds (NaN-skipping), on the soft labels as they are
  (:mod:`training.metrics`: a score ``y`` counts ``y`` right and ``1 - y`` wrong);
- :func:`fold_groups`, :func:`row_tasks`: each row's group and task from the query table.

Shapes: ``n`` rows, ``T`` targets; ``Y`` ``(n, T)`` in [0, 1] with NaN = missing.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator

import numpy as np

from shared import storage
from training.dataset import RoutingData


def split_folds(n_rows: int, groups: np.ndarray, folds: int, seed: int = 0,
                early_stop_share: float = 0.15) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold ``k``: ``(train rows, early-stop rows, held-out rows)``, index arrays into the ``n_rows`` rows.
    ``held`` is GroupKFold's ``k``-th test fold over ``groups`` ``(n,)``; the other rows, permuted by
    ``default_rng(seed + k)``, give the first ``round((1 - early_stop_share) * m)`` (at least 1) to train."""
    from sklearn.model_selection import GroupKFold

    for k, (fit_idx, held) in enumerate(GroupKFold(n_splits=folds).split(np.zeros(n_rows), groups=groups)):
        perm = np.random.default_rng(seed + k).permutation(fit_idx)
        cut = max(1, int(round((1 - early_stop_share) * len(perm))))
        yield perm[:cut], perm[cut:], held


def nanmean_quiet(values: np.ndarray) -> float:
    """``np.nanmean`` of ``values``; nan, without a warning, when all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def score_folds(Y: np.ndarray, predictions: Iterable[tuple[np.ndarray, np.ndarray]],
                tasks: np.ndarray | None = None) -> dict[str, Any]:
    """Scores of held-out predictions ``(held_f, P_f (len(held_f), T))``, one pair per fold: per target ``(T,)``,
    ``auc`` (``masked_auc(Y[held_f], P_f)``), ``brier``, ``log_loss`` and, with ``tasks`` ``(n,)``,
    ``within_task_auc`` (:func:`training.metrics.within_group_auc`), each the NaN-skipping mean over folds; and
    ``pairwise_auc`` (:func:`training.metrics.pairwise_auc`), the mean over folds, a float."""
    from training.metrics import brier, log_loss, masked_auc, pairwise_auc, within_group_auc

    per_fold, pairwise = [], []
    for held, P in predictions:
        Yh = Y[held]
        within = within_group_auc(Yh, P, tasks[held]) if tasks is not None else np.full(Y.shape[1], np.nan)
        per_fold.append((masked_auc(Yh, P), brier(Yh, P), log_loss(Yh, P), within))
        pairwise.append(pairwise_auc(Yh, P))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a target with no score in any fold -> nan
        means = np.nanmean(np.asarray(per_fold, dtype=np.float64), axis=0)  # (4, T)
    names = ("auc", "brier", "log_loss") + (("within_task_auc",) if tasks is not None else ())
    return {**dict(zip(names, means)), "pairwise_auc": nanmean_quiet(np.asarray(pairwise))}


def score_row(scores: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    """:func:`score_folds`' scores as a report row: ``pairwise_auc``, ``mean_<score>`` and ``{target: value}``
    per score (what tune's candidates and the adapted encoder's row both hold)."""
    scores = dict(scores)
    pairwise = scores.pop("pairwise_auc")
    return {"pairwise_auc": pairwise, **{f"mean_{name}": nanmean_quiet(v) for name, v in scores.items()},
            **{name: dict(zip(targets, map(float, v))) for name, v in scores.items()}}


def fold_groups(data: RoutingData, queries: str | None) -> np.ndarray:
    """``(n,)`` ``group_id`` per row from the query table (the query id where there is none)."""
    if not queries:
        return np.asarray(data.query_ids)
    table = storage.read_parquet(queries, columns=["query_id", "group_id"])
    gid = dict(zip(table.column("query_id").to_pylist(), table.column("group_id").to_pylist()))
    return np.array([gid.get(q) or q for q in data.query_ids], dtype=object)


def row_tasks(data: RoutingData, queries: str | None) -> np.ndarray | None:
    """``(n,)`` each row's ``task`` from the query table; None without one, or with one task."""
    if not queries:
        return None
    table = storage.read_parquet(queries, columns=["query_id", "task"])
    task = dict(zip(table.column("query_id").to_pylist(), table.column("task").to_pylist()))
    out = np.array([str(task.get(q)) for q in data.query_ids], dtype=object)
    return out if len(set(out)) > 1 else None
