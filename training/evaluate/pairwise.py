"""Which of two targets is better for a query: the pairwise AUC of each probabilistic router on
test, pooled and per task, and our margin on it (report part and Markdown).

The per-target AUC reads which queries a target gets right, which a router mostly learns from how
hard a query is; a routing decision needs which target is better for *this* query. For each test
query and each pair of targets whose labels differ, the pairwise AUC
(:func:`training.metrics.pairwise_auc`) asks whether the router ranks the better one higher
(soft labels weigh a pair by their difference; 0.5 is no knowledge). The task-aware reference
(``task-best``) is scored too, by its per-task mean scores: a router that ranks targets no better
than knowing the task does not beat it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.evaluate.cells import num

__all__ = ["pairwise_scores", "pairwise_lines"]


def pairwise_scores(Y: np.ndarray, proba: dict[str, np.ndarray], ours: str, n_boot: int,
                    tasks: np.ndarray | None) -> dict[str, Any]:
    """``{"pairwise_auc": {router: {"mean", "by_task": {task: AUC}}}, "pairwise_margin": {baseline:
    margin}}``: each router's pooled pairwise AUC over the test queries ``Y`` ``(n, T)`` from its
    ``proba[router]`` ``(n, T)``, per task when ``tasks`` ``(n,)`` holds two or more, and our margin
    over each other router (:func:`training.evaluate.uncertainty.paired_bootstrap_pairwise_margin`,
    stratified by task; none when ``n_boot`` is 0)."""
    from training.evaluate.uncertainty import paired_bootstrap_pairwise_margin
    from training.metrics import pairwise_auc

    tasks = None if tasks is None or len(set(tasks)) < 2 else np.asarray(tasks, dtype=object)
    names = [] if tasks is None else sorted(set(tasks))
    table = {name: {"mean": pairwise_auc(Y, P),
                    "by_task": {str(t): pairwise_auc(Y[tasks == t], P[tasks == t]) for t in names}}
             for name, P in proba.items()}
    margins = {} if n_boot == 0 else {
        name: paired_bootstrap_pairwise_margin(Y, proba[ours], P, n_boot=n_boot, groups=tasks)
        for name, P in proba.items() if name != ours}
    return {"pairwise_auc": table, "pairwise_margin": margins}


def pairwise_lines(report: dict[str, Any], max_tasks: int = 8) -> list[str]:
    """Markdown: each probabilistic router's pairwise AUC on test (per task up to ``max_tasks``
    columns), and our margin over each baseline."""
    table = report.get("pairwise_auc")
    if not table:
        return []
    tasks = sorted({t for row in table.values() for t in row["by_task"]})
    tasks = tasks if len(tasks) <= max_tasks else []
    lines = ["## Which target is better (pairwise AUC, test)", "",
             "For each test query and each pair of targets whose labels differ, does the router rank the better "
             "one higher (a soft label's margin weighs the pair; 0.5 is no knowledge)? This is the routing "
             "decision; the per-target AUC above mostly reads how hard a query is. `task-best` is scored by each "
             "task's mean score per target on train + val: ranking no better than it is knowing only the task.", "",
             "| " + " | ".join(["router", "pairwise AUC", *tasks]) + " |", "|---|---:|" + "---:|" * len(tasks)]
    for name, row in table.items():
        lines.append("| " + " | ".join([name, num(row["mean"], ".3f"),
                                        *(num(row["by_task"].get(t), ".3f") for t in tasks)]) + " |")
    margins = report.get("pairwise_margin") or {}
    if margins:
        lines += ["", "Pairwise AUC margin of the prefill router over each probabilistic baseline (paired bootstrap "
                  "over test queries, within each task; 95% interval; p = share of replicates with margin <= 0):",
                  "", "| baseline | margin | 95% interval | p |", "|---|---:|---|---:|"]
        lines += [f"| {name} | {num(m['margin'], '+.3f')} | [{num(m['low'], '+.3f')}, {num(m['high'], '+.3f')}] | "
                  f"{num(m['p_le_zero'], '.3f')} |" for name, m in margins.items()]
    return lines + [""]
