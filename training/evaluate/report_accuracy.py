"""The accuracy view of the evaluation report (Markdown and console): pooled beside task-averaged
accuracy (RouterDC's metric: the mean score within each task, then the unweighted mean over
tasks) for every router, single model, the oracle and published figures; the prefill router's
task-averaged interval; and, when every target costs the same per query (``equal_costs`` of the
references), the helpers that drop what costs would mean: such a report's headline is accuracy.

Input: the report's JSON form (:meth:`training.evaluate.results.EvalReport.to_json`).
"""

from __future__ import annotations

from typing import Any

from shared.policy import Policy
from training.evaluate.cells import missing, num, pct

ACCURACY_COLUMNS = ("router", "accuracy", "task-averaged accuracy", "gap closed", "task-averaged gap closed",
                    "mean AUC")
COST_WORDS = ("cost", "savings", "P-AUCCC")  # a column or metric naming one of these means nothing at equal costs
EQUAL_COSTS = ("All targets cost the same per query here, so every routing costs the same: cost, savings and "
               "P-AUCCC columns are left out, and accuracy (pooled and task-averaged) is the headline.")
UNAVAILABLE = ("Task-averaged accuracy (RouterDC's metric): unavailable, the evaluation was given no query table "
               "with a `task` column.")
PREDATES = ("Task-averaged accuracy (RouterDC's metric): not in this report, which was evaluated before the metric "
            "existed; `prefill-router evaluate` with the config under `config` in report.json adds it.")


def unavailable(report: dict[str, Any]) -> str:
    """Why a report has no task-averaged accuracy: no tasks given, or an older report (per-task rows, no count)."""
    return PREDATES if report.get("by_task") else UNAVAILABLE


def equal_costs(report: dict[str, Any]) -> bool:
    """Every target costs the same on every test query (``references.equal_costs``)."""
    return bool(report["subsets"]["test"]["references"].get("equal_costs"))


def has_tasks(report: dict[str, Any]) -> bool:
    """The test references carry the task-averaged accuracy (a query table with tasks was given)."""
    return report["subsets"]["test"]["references"].get("n_tasks") is not None


def _gap(acc, best, oracle) -> float:
    """``(acc - best) / (oracle - best)``; NaN where undefined (no headroom or a missing value)."""
    if missing(acc) or missing(best) or missing(oracle) or oracle == best:
        return float("nan")
    return (acc - best) / (oracle - best)


def _router_label(name: str, r: dict[str, Any]) -> str:
    return name if r["kind"] == "fixed" else f"{name} ({Policy.of(r['policy'], r['param']).label()})"


def _single_label(name: str, refs: dict[str, Any]) -> str:
    """``single: X``, marked where X is the best single target (pooled, task-averaged or both)."""
    ta = (refs.get("best_single_task_averaged") or {}).get("target")
    marks = [m for m, best in (("pooled", refs["best_single"]["target"]), ("task-averaged", ta)) if best == name]
    if not marks:
        return f"single: {name}"
    return f"single: {name} (best{'' if len(marks) == 2 or ta is None else ', ' + marks[0]})"


def accuracy_rows(report: dict[str, Any], subset: str = "test") -> list[list[str]]:
    """Rows of :data:`ACCURACY_COLUMNS`: each router, each single model, the oracle, then (on test)
    each published figure (measured on its own split: no gap closed)."""
    sub = report["subsets"][subset]
    refs = sub["references"]
    best, oracle = refs["best_single"]["accuracy"], refs["oracle"]["accuracy"]
    ta_best = (refs.get("best_single_task_averaged") or {}).get("accuracy")
    ta_oracle = refs["oracle"].get("task_averaged_accuracy")
    rows = [[_router_label(name, r), pct(r["accuracy"]), pct(r.get("task_averaged_accuracy")), pct(r["gap_closed"]),
             pct(r.get("task_averaged_gap_closed")), num(r.get("mean_auc"), ".3f")]
            for name, r in sub["routers"].items()]
    for name, s in refs["single"].items():
        ta = s.get("task_averaged_accuracy")
        rows.append([_single_label(name, refs), pct(s["accuracy"]), pct(ta), pct(_gap(s["accuracy"], best, oracle)),
                     pct(_gap(ta, ta_best, ta_oracle)), ""])
    rows.append(["oracle", pct(oracle), pct(ta_oracle), pct(1.0), pct(1.0 if not missing(ta_oracle) else None), ""])
    if subset == "test":
        rows += [[f"published: {p['label']}", pct(p.get("accuracy")), pct(p.get("task_averaged_accuracy")), "—", "—",
                  ""]
                 for p in report.get("published") or []]
    return rows


def _md(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(r) + " |" for r in rows)]


def accuracy_lines(report: dict[str, Any], subset: str = "test") -> list[str]:
    """Markdown: the accuracy table of ``subset``. With equal costs it is the subset's headline (one
    sentence says why); otherwise it follows the cost table, on test only when tasks are known (else
    one line says the task-averaged accuracy is unavailable)."""
    equal, tasks = equal_costs(report), has_tasks(report)
    if not equal and not tasks:
        return [unavailable(report), ""] if subset == "test" else []
    table = [*_md(ACCURACY_COLUMNS, accuracy_rows(report, subset)), ""]
    if subset != "test":
        return table if equal else [f"Pooled and task-averaged accuracy ({subset} queries):", "", *table]
    n_tasks = report["subsets"][subset]["references"].get("n_tasks")
    what = (f"Task-averaged accuracy (RouterDC's metric) is the mean score of the chosen target within each of the "
            f"{n_tasks} tasks, then the unweighted mean over tasks; pooled accuracy weighs every query alike. Each "
            "gap closed is (router − best single) / (oracle − best single) in its own metric (against the best "
            "single target by that metric)." if tasks else unavailable(report))
    return [*([EQUAL_COSTS, ""] if equal else []), what, "", *table]


def task_interval_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: the prefill router's task-averaged accuracy on test with its bootstrap intervals."""
    iv = report.get("task_averaged_interval")
    if not iv:
        return []

    def cell(v: list, points: bool = False) -> str:
        if points:
            return f"{num(100 * v[0], '+.2f')} points [{num(100 * v[1], '+.2f')}, {num(100 * v[2], '+.2f')}]"
        return f"{pct(v[0])} [{pct(v[1])}, {pct(v[2])}]"

    diffs = [f"minus {iv['best_single']}'s (the best single target by this metric) "
             f"{cell(iv['minus_best_single'], True)}"]
    if iv.get("minus_task_best"):
        diffs.append(f"minus task-best's {cell(iv['minus_task_best'], True)}")
    return [f"The prefill router's task-averaged accuracy on test ({iv['n_tasks']} tasks), with 95% bootstrap "
            f"intervals redrawing the queries within each task: {cell(iv['accuracy'])}; {'; '.join(diffs)} (paired: "
            "the same redrawn queries).", ""]


def drop_cost_columns(columns, rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The table without its cost columns (a column naming one of :data:`COST_WORDS`)."""
    keep = [i for i, c in enumerate(columns) if not any(w in c for w in COST_WORDS)]
    return [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]


def drop_cost_rows(lines: list[str]) -> list[str]:
    """Markdown lines without the table rows whose first cell names a cost (:data:`COST_WORDS`)."""
    def cost_row(line: str) -> bool:
        cells = line.split("|")
        return line.startswith("|") and len(cells) > 2 and any(w in cells[1] for w in COST_WORDS)
    return [line for line in lines if not cost_row(line)]


def equal_cost_policy_lines() -> list[str]:
    """Markdown: why the policy frontiers are left out when every target costs the same."""
    return ["## Policies", "", "With equal costs a policy's sweep moves accuracy only, at one cost: its cost "
            "frontier (P-AUCCC, savings, the cheapest point reaching an accuracy) means nothing and is left out. "
            "The operating point above is the routing scored.", ""]


def accuracy_table(report: dict[str, Any]):
    """The test accuracy table as a rich Table for the console."""
    from rich.table import Table

    view = Table(title=f"router accuracy on test (n={report['n']['test']})")
    for i, col in enumerate(ACCURACY_COLUMNS):
        view.add_column(col, justify="left" if i == 0 else "right")
    for row in accuracy_rows(report, "test"):
        view.add_row(*row)
    return view
