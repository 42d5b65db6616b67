"""The accuracy plot of ``prefill-router evaluate`` for a subset where every target costs the same
per query (``references.equal_costs``): a cost axis would have zero width, so each router, single
model and the oracle is a column with two markers (pooled and task-averaged accuracy, the latter
labelled), on an axis zoomed to the values, with the best single target and any published figure
(``EvalReport.published``, test only) as horizontal lines."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from training.evaluate.cells import missing

PUBLISHED_COLORS = ("darkgoldenrod", "teal", "indigo")  # published figures' lines: off the routers' color cycle


def _value(x) -> float:
    return float("nan") if missing(x) else float(x)


def _entries(sub: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(label, pooled, task-averaged)`` per router, single model and the oracle, in that order."""
    refs = sub["references"]
    rows = [(name, r["accuracy"], r.get("task_averaged_accuracy")) for name, r in sub["routers"].items()]
    rows += [(f"single: {name}", s["accuracy"], s.get("task_averaged_accuracy")) for name, s in refs["single"].items()]
    rows.append(("oracle", refs["oracle"]["accuracy"], refs["oracle"].get("task_averaged_accuracy")))
    return [(label, _value(a), _value(t)) for label, a, t in rows]


def _lines(ax, report: dict[str, Any], refs: dict[str, Any], subset: str, tasks: bool) -> None:
    """Horizontal lines: the best single target (pooled; task-averaged when known) and, on test,
    each published figure in the metrics the plot shows."""
    best = refs["best_single"]
    ax.axhline(_value(best["accuracy"]), color="C0", ls=":", lw=1, label=f"best single, pooled ({best['target']})")
    ta = refs.get("best_single_task_averaged")
    if tasks and ta:
        ax.axhline(_value(ta["accuracy"]), color="C1", ls=":", lw=1,
                   label=f"best single, task-averaged ({ta['target']})")
    published = (report.get("published") or []) if subset == "test" else []
    for i, p in enumerate(published):
        color = PUBLISHED_COLORS[i % len(PUBLISHED_COLORS)]
        if tasks and p.get("task_averaged_accuracy") is not None:
            ax.axhline(p["task_averaged_accuracy"], color=color, ls="-", lw=1.3,
                       label=f"published: {p['label']}, task-averaged")
        if p.get("accuracy") is not None:
            ax.axhline(p["accuracy"], color=color, ls="-.", lw=1.3, label=f"published: {p['label']}, pooled")


def accuracy_plot(report: dict[str, Any], subset: str = "test") -> bytes:
    """PNG of one subset's accuracies at equal costs (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = report["subsets"][subset]
    refs = sub["references"]
    tasks = refs.get("n_tasks") is not None
    entries = _entries(sub)
    x = np.arange(len(entries))
    fig, ax = plt.subplots(figsize=(11, 5.8))
    ax.plot(x - 0.1 * tasks, [e[1] for e in entries], "o", color="C0", ms=7, label="pooled accuracy")
    if tasks:
        ax.plot(x + 0.1, [e[2] for e in entries], "D", color="C1", ms=7, label="task-averaged accuracy")
    for i, e in enumerate(entries):
        shown = e[2] if tasks else e[1]
        if np.isfinite(shown):
            ax.annotate(f"{100 * shown:.1f}", (i + 0.1 * tasks, shown), textcoords="offset points", xytext=(7, -3),
                        fontsize=7)
    _lines(ax, report, refs, subset, tasks)
    ax.set_xticks(x, [e[0] for e in entries], rotation=35, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(entries) - 0.2)
    ax.set_ylabel("accuracy (mean score of the chosen target)")
    what = "test" if subset == "test" else f"test, {subset} queries"
    ax.set_title(f"accuracy ({what}, n={refs['n']}); all targets cost the same per query: no cost axis")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
