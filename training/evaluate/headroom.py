"""Where the best-single-to-oracle headroom lies, by task (pure functions).

Gap closed divides by the headroom ``sum_i (max_t Y[i, t] - Y[i, b])`` over the best
single target ``b``. When that headroom sits in tasks where the other targets are near
chance, no router that sees only the prompt can capture much of it; the per-task split
makes that visible, and the ``task-best`` reference (``training.evaluate.baselines``) measures it.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np


def big_tasks(tasks: Sequence[str], min_rows: int) -> set[str]:
    """Tasks with at least ``min_rows`` rows: big enough to be a routing group of their own."""
    names, counts = np.unique(np.asarray(tasks, dtype=object), return_counts=True)
    return set(names[counts >= min_rows].tolist())


def task_groups(tasks: Sequence[str], sources: Sequence[str], big: set[str]) -> np.ndarray:
    """``(n,)`` routing group per query: its ``task`` when the task is in ``big``
    (:func:`big_tasks` of the fitting rows), else its ``source`` (MMLU's ~20-row subjects
    pool into ``mmlu``, so a group's best target is not picked from a handful of rows)."""
    return np.array([t if t in big else s for t, s in zip(tasks, sources)], dtype=object)


def headroom_by_group(Y: np.ndarray, groups: Sequence[str], best: int, targets: Sequence[str]) -> list[dict[str, Any]]:
    """Per group, largest headroom first: ``n``, each target's accuracy, the oracle's, and
    ``headroom_share = sum_{i in g} h_i / sum_i h_i`` with ``h_i = max_t Y[i, t] - Y[i, best]``.

    ``Y``: ``(n, T)`` in [0, 1], NaN = missing (a row whose ``Y[i, best]`` is missing adds no
    headroom); ``groups``: ``(n,)``; ``best``: index of the best single target.
    """
    from training.evaluate.routing_metrics import _row_best

    Y, groups = np.asarray(Y, dtype=np.float64), np.asarray(groups, dtype=object)
    oracle = _row_best(Y)
    h = np.nan_to_num(oracle - Y[:, best], nan=0.0)
    total = h.sum()
    rows = []
    for g in np.unique(groups):
        m = groups == g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column -> nan
            accs = np.nanmean(Y[m], axis=0)
            orc = float(np.nanmean(oracle[m]))
        rows.append({"group": str(g), "n": int(m.sum()), "accuracy": dict(zip(targets, map(float, accs))),
                     "oracle": orc, "headroom_share": float(h[m].sum() / total) if total > 0 else float("nan")})
    return sorted(rows, key=lambda r: (-np.nan_to_num(r["headroom_share"]), r["group"]))
