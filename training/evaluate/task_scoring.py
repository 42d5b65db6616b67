"""Task-averaged accuracy (:mod:`training.evaluate.task_metrics`) in the scores of
``prefill-router evaluate``: beside each router's, single model's and the oracle's pooled
accuracy, the best single target by this metric, and the prefill router's operating point with a
bootstrap interval stratified by task, against the best single target and the task-aware reference.

The tasks are the query table's ``task`` column; without it the metric is not computed (the
report says it is unavailable).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.evaluate import routing_metrics as M
from training.evaluate import task_metrics as TM
from training.metrics import best_target

TASK_BEST = "task-best"


def _weights(choice: np.ndarray, n_targets: int) -> np.ndarray:
    """Choice weights ``(n, T)`` of a routing (``(n,)`` target indices) or of a fixed router (as given)."""
    choice = np.asarray(choice)
    return TM.one_hot(choice, n_targets) if choice.ndim == 1 else choice


def add_task_averaged(refs: dict[str, Any], rows: dict[str, dict], Y: np.ndarray, tasks: np.ndarray,
                      choices: dict[str, np.ndarray], targets: list[str]) -> None:
    """Add the task-averaged accuracy to a subset's references and router rows, in place.

    ``Y``: ``(n, T)`` the subset's scores; ``tasks``: ``(n,)``; ``choices``: per router, its
    routing ``(n,)`` (target index) or choice weights ``(n, T)``. References gain ``n_tasks``,
    each single model's and the oracle's ``task_averaged_accuracy`` and
    ``best_single_task_averaged`` (ties: cheaper, then first); each router row gains
    ``task_averaged_accuracy`` and ``task_averaged_gap_closed`` (against that best single target
    and the oracle, both task-averaged)."""
    singles = TM.task_averaged_singles(Y, tasks)
    oracle = TM.task_averaged_oracle(Y, tasks)
    costs = np.array([refs["single"][t]["cost"] for t in targets], dtype=np.float64)
    best = best_target(singles, costs)  # the tie-break of every best single: then cheaper, then index
    for t, acc in zip(targets, singles):
        refs["single"][t]["task_averaged_accuracy"] = float(acc)
    refs["oracle"]["task_averaged_accuracy"] = oracle
    refs["n_tasks"] = TM.task_count(Y, tasks)
    refs["best_single_task_averaged"] = {"target": targets[best], "accuracy": float(singles[best]),
                                         "cost": float(costs[best])}
    for name, choice in choices.items():
        acc = TM.task_averaged(Y, _weights(choice, len(targets)), tasks)
        rows[name]["task_averaged_accuracy"] = acc
        rows[name]["task_averaged_gap_closed"] = M.gap_closed(acc, float(singles[best]), oracle)


def task_interval(choice: np.ndarray, test: dict[str, np.ndarray], refs: dict[str, Any],
                  task_best: np.ndarray | None, targets: list[str], n_boot: int) -> dict[str, Any] | None:
    """The prefill router's operating point on test in task-averaged accuracy with a 95% bootstrap
    interval stratified by task, and its paired differences from the best single target (by
    task-averaged accuracy) and from ``task-best`` (its choice weights ``(n, T)``; None: not
    evaluated). ``choice``: ``(n,)`` our routing; ``test``: ``Y`` and ``task``. None without tasks
    or with ``n_boot`` 0 (:func:`training.evaluate.uncertainty.bootstrap_task_averaged`)."""
    from training.evaluate.uncertainty import bootstrap_task_averaged

    tasks, best_ref = test.get("task"), refs.get("best_single_task_averaged")
    if tasks is None or n_boot == 0 or best_ref is None:
        return None
    Y, rows = test["Y"], np.arange(len(test["Y"]))
    others = {"best_single": Y[:, targets.index(best_ref["target"])]}
    if task_best is not None:
        others[TASK_BEST] = Y[rows, np.asarray(task_best).argmax(axis=1)]
    boot = bootstrap_task_averaged(Y[rows, choice], others, tasks, n_boot=n_boot)
    return {"n_tasks": refs["n_tasks"], "accuracy": boot["accuracy"], "best_single": best_ref["target"],
            "minus_best_single": boot["minus"]["best_single"],
            **({"minus_task_best": boot["minus"][TASK_BEST]} if task_best is not None else {})}
