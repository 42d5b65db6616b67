"""Writers for ``prefill-router evaluate``: ``report.json``, ``report.md``, ``cost_accuracy.png``
and the console summary. Input is the report dict of :func:`training.evaluate.evaluate_routers`."""

from __future__ import annotations

import io
import json
import math
from typing import Any

# arXiv 2603.20895 (abstract / introduction; the AUCs from a secondary source).
PAPER = {"gap_closed": 0.4558, "cost_savings": 0.7431, "mean_auc_prefill": 0.856, "mean_auc_prompt_only": 0.804}
COLUMNS = ("router", "accuracy", "mean cost", "gap closed", "cost savings", "P-AUCCC", "mean AUC")


def jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN / inf to ``null``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.2f}%"


def _num(x, fmt: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table_rows(subset: dict[str, Any]) -> list[list[str]]:
    """One row per router, then the single models and the oracle (formatted cells)."""
    refs, rows = subset["references"], []
    for name, r in subset["routers"].items():
        label = name if r["kind"] == "fixed" else f"{name} (tol {r['tolerance']:.3g})"
        rows.append([label, _pct(r["accuracy"]), _num(r["cost"], ".3g"), _pct(r["gap_closed"]),
                     _pct(r["cost_savings"]), _num(r["pauccc"]), _num(r.get("mean_auc"))])
    dear, best = refs["most_expensive"]["cost"], refs["best_single"]
    for name, s in refs["single"].items():
        savings = 1 - s["cost"] / dear if dear else float("nan")
        gap = (s["accuracy"] - best["accuracy"]) / (refs["oracle"]["accuracy"] - best["accuracy"]) \
            if refs["oracle"]["accuracy"] != best["accuracy"] else float("nan")
        rows.append([f"single: {name}", _pct(s["accuracy"]), _num(s["cost"], ".3g"), _pct(gap), _pct(savings), "", ""])
    o = refs["oracle"]
    rows.append(["oracle", _pct(o["accuracy"]), _num(o["cost"], ".3g"), _pct(1.0), _pct(o["cost_savings"]), "", ""])
    rows.append(["zero router (single-model hull)", "", "", "", "", _num(refs["zero_router_pauccc"]), ""])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report: test and disagreement tables, then ours beside the paper's numbers."""
    n, op = report["n"], report["operating_point"]
    test, dis = report["subsets"]["test"], report["subsets"].get("disagreement")
    ours = test["routers"]["prefill-router"]
    semantic = [r.get("mean_auc") for k, r in test["routers"].items()
                if r["kind"] == "probabilistic" and k != "prefill-router" and r.get("mean_auc") is not None]
    parts = [
        "# Router evaluation", "",
        f"Artifact `{report.get('artifact', '?')}`; targets {', '.join(report['targets'])}. Rows: train {n['train']}, "
        f"val {n['val']}, test {n['test']} (disagreement {n['test_disagreement']}, "
        f"{_pct(report['disagreement_share'])}).", "",
        f"Operating point: tolerance {op['tolerance']:.4g} ({op['status']}; "
        f"target cost {_num(op['target_cost'], '.4g')}, "
        f"target accuracy {_num(op['target_accuracy'], '.4g')}); on val: accuracy {_pct(op['val_accuracy'])}, "
        f"mean cost {_num(op['val_cost'], '.3g')}. Baselines are calibrated the same way on val.", "",
        "Costs are mean USD per query (measured label cost). Gap closed = (acc − best single) / (oracle − best "
        "single); cost savings vs always using the most expensive target "
        f"({test['references']['most_expensive']['target']}); P-AUCCC over [cheapest, most expensive] cost "
        "above the cheapest model's accuracy.", "",
        *(["`task-best` is a reference, not a router: it is told each query's task and sends it to the target "
           "most accurate on that task in train + val, so it bounds what routing by task alone can gain.", ""]
          if "task-best" in test["routers"] else []),
        "## Test split", "", _md_table(table_rows(test)), "",
        "## Disagreement queries (test)", "", _md_table(table_rows(dis)) if dis else "No disagreement queries.", "",
        "## Against the paper (arXiv 2603.20895)", "",
        "| metric | paper | ours (test) |", "|---|---|---|",
        f"| gap closed (best point along the sweep) | up to {_pct(PAPER['gap_closed'])} | "
        f"{_pct(ours['max_gap_closed'])} |",
        f"| gap closed at the operating point | — | {_pct(ours['gap_closed'])} |",
        f"| cost savings vs most expensive | {_pct(PAPER['cost_savings'])} | {_pct(ours['cost_savings'])} at the "
        f"operating point; {_pct(ours['cost_savings_at_best_single_accuracy'])} at the best single model's accuracy |",
        f"| mean per-target AUC, prefill router | ~{PAPER['mean_auc_prefill']} | {_num(ours['mean_auc'], '.3f')} |",
        f"| mean AUC, best prompt-only baseline | ~{PAPER['mean_auc_prompt_only']} | "
        f"{_num(max(semantic), '.3f') if semantic else '—'} |", "",
        *margin_lines(report.get("auc_margin") or {}),
        *headroom_lines(report.get("headroom_by_task") or [], report["targets"]),
    ]
    return "\n".join(parts)


def margin_lines(margins: dict[str, dict]) -> list[str]:
    """Markdown: our mean-AUC margin over each probabilistic baseline, with its bootstrap CI."""
    if not margins:
        return []
    lines = ["Mean per-target AUC margin of the prefill router over each probabilistic baseline on test "
             "(paired bootstrap over test queries, 95% interval; p = share of replicates with margin <= 0):", "",
             "| baseline | margin | 95% interval | p |", "|---|---:|---|---:|"]
    for name, m in margins.items():
        lines.append(f"| {name} | {_num(m['margin'], '+.3f')} | [{_num(m['low'], '+.3f')}, {_num(m['high'], '+.3f')}] "
                     f"| {_num(m['p_le_zero'], '.3f')} |")
    return lines + [""]


def headroom_lines(rows: list[dict], targets: list[str]) -> list[str]:
    """Markdown: each task group's share of the test headroom over the best single target."""
    if not rows:
        return []
    lines = ["## Where the headroom is (test, by task group of `task-best`)", "",
             "Share of the oracle's gain over the best single target that each group holds, with each "
             "target's accuracy there.", "",
             "| group | n | " + " | ".join(targets) + " | oracle | headroom share |",
             "|---|---:|" + "---:|" * len(targets) + "---:|---:|"]
    for r in rows:
        accs = " | ".join(_num(r["accuracy"][t], ".3f") for t in targets)
        lines.append(f"| {r['group']} | {r['n']} | {accs} | {_num(r['oracle'], '.3f')} | {_pct(r['headroom_share'])} |")
    return lines + [""]


def plot(report: dict[str, Any]) -> bytes:
    """``cost_accuracy.png``: sweep curves, fixed routers, single models, oracle, zero-router hull."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = report["subsets"]["test"]
    refs = test["references"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, r in test["routers"].items():
        if r["kind"] == "probabilistic":
            (line,) = ax.plot(r["sweep"]["cost"], r["sweep"]["accuracy"], drawstyle="steps-post", lw=1.4, label=name)
            ax.plot([r["cost"]], [r["accuracy"]], "o", color=line.get_color(), ms=6)
        else:
            ax.plot([r["cost"]], [r["accuracy"]], "s", ms=7, label=name)
    for name, s in refs["single"].items():
        ax.plot([s["cost"]], [s["accuracy"]], "k^", ms=7)
        ax.annotate(name, (s["cost"], s["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.plot(refs["hull"]["cost"], refs["hull"]["accuracy"], "k--", lw=1, label="zero router (single-model hull)")
    ax.plot([refs["oracle"]["cost"]], [refs["oracle"]["accuracy"]], "k*", ms=12, label="oracle")
    ax.set_xscale("log" if refs["most_expensive"]["cost"] > 20 * max(refs["cheapest"]["cost"], 1e-12) else "linear")
    ax.set_xlabel("mean cost per query (USD)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"cost vs accuracy on test (n={refs['n']}); dots: operating points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def summary_table(report: dict[str, Any]):
    """The test table as a rich Table for the console."""
    from rich.table import Table

    view = Table(title=f"router evaluation on test (n={report['n']['test']})")
    for i, col in enumerate(COLUMNS):
        view.add_column(col, justify="left" if i == 0 else "right")
    for row in table_rows(report["subsets"]["test"]):
        view.add_row(*row)
    return view


def write_outputs(report: dict[str, Any], out: str) -> None:
    """``report.json``, ``report.md`` and ``cost_accuracy.png`` under ``out`` (local or s3://)."""
    from shared import storage

    clean = jsonable(report)
    clean["paper"] = PAPER
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    storage.write_bytes(storage.join(out, "report.json"), text.encode())
    storage.write_bytes(storage.join(out, "report.md"), markdown(clean).encode())
    storage.write_bytes(storage.join(out, "cost_accuracy.png"), plot(clean))
