"""Evaluate's side of the novelty gate (:mod:`shared.novelty`): calibrate it on the evaluated table's train and
val rows, and say what it did on test.

- :func:`calibrate_gate`: the variances of the router's reduced inputs over train rows (the rows its
  transforms were fitted on), the threshold at ``quantile`` of val rows' novelty, and the prior: each
  target's mean score over train + val, the unweighted mean of the task means where tasks are known
  (:func:`training.evaluate.task_metrics.task_averaged_singles`: a task of 100 queries weighs as much as one of
  2,000, so the prior's best is the strongest generalist, not the best model of the largest task).
- :func:`gate_summary`: the report's record: the gate's settings and the test rows it routed by its prior.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from shared.novelty import NoveltyGate, calibrate, novelty, reduced_blocks
from training.dataset import RoutingData

log = logging.getLogger(__name__)


def _blocks(router, data: RoutingData, rows: np.ndarray) -> dict[str, np.ndarray]:
    return reduced_blocks(router.transform, {c: data.blocks[c][rows] for c in router.block_names})


def prior_scores(Y: np.ndarray, tasks: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """``((T,) prior, how)``: each target's task-averaged mean score over ``Y`` ``(n, T)`` (NaN = missing) when
    ``tasks`` ``(n,)`` are given, else its pooled mean."""
    from training.evaluate.task_metrics import task_averaged_singles

    if tasks is not None:
        prior = task_averaged_singles(Y, np.asarray(tasks, dtype=object))
        return np.nan_to_num(prior, nan=0.0), "each target's task-averaged mean score on train + val"
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(np.nanmean(Y, axis=0), nan=0.0), "each target's mean score on train + val"


def calibrate_gate(router, data: RoutingData, quantile: float, tasks: Sequence[str] | None = None) -> NoveltyGate | None:
    """The gate for ``router`` (a :class:`shared.router.Router`) from ``data``'s train and val rows (``tasks``:
    per row of ``data``, or None); None, with a warning, when either split is empty."""
    train, val = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "val")
    if not len(train) or not len(val):
        log.warning("novelty gate not calibrated: it needs train and val rows (%d, %d)", len(train), len(val))
        return None
    both = np.concatenate([train, val])
    prior, how = prior_scores(data.Y[both], None if tasks is None else np.asarray(tasks, dtype=object)[both])
    return calibrate(_blocks(router, data, train), _blocks(router, data, val), prior, how, quantile)


def gate_summary(router, data: RoutingData) -> dict[str, Any] | None:
    """``{quantile, threshold, n_calibration, prior_source, prior_target, test_novel, test_rows}`` of the router's
    gate on ``data``'s test rows (None without a gate): what the report says of it."""
    gate = router.meta.policy.novelty
    if gate is None:
        return None
    test = np.flatnonzero(data.split == "test")
    scores = novelty(_blocks(router, data, test), gate.variances)
    return {"quantile": gate.quantile, "threshold": gate.threshold, "n_calibration": gate.n_calibration,
            "prior_source": gate.prior_source, "prior_target": router.target_names[int(np.argmax(gate.prior))],
            "test_novel": int((np.nan_to_num(scores, nan=-np.inf) > gate.threshold).sum()), "test_rows": len(test)}
