"""Writers for ``prefill-router evaluate``: ``report.json``, ``report.md``, the cost-accuracy
PNGs (:mod:`training.evaluate.plots`) and the console tables. Input is the report of
:func:`training.evaluate.run.run_evaluation` (:class:`training.evaluate.results.EvalReport`); the
Markdown, plots and tables read its JSON form (:meth:`EvalReport.to_json`)."""

from __future__ import annotations

import math
from typing import Any

from shared.policy import policy_names
from training.evaluate.cells import num as _num, pct as _pct
from training.evaluate.report_accuracy import (accuracy_lines, accuracy_table, drop_cost_columns,
                                               drop_cost_rows, equal_cost_policy_lines, equal_costs,
                                               task_interval_lines)
from training.evaluate.report_cells import (ARTIFACT, COLUMNS, columns, fronts, md_table as _md_table,
                                            new_cells as _new_cells, reached as _reached, rich_table as _rich,
                                            rule_label as _rule_label, tie_note)
from training.evaluate.off_policy_eval import off_policy_lines
from training.evaluate.pairwise import pairwise_lines
from training.evaluate.report_policy import policy_lines
from training.evaluate.results import EvalReport
from training.metrics import BEST_SINGLE_TIE_BREAK
from training.semantic_text import describe

# arXiv 2603.20895 (abstract / introduction; the AUCs from a secondary source).
PAPER = {"gap_closed": 0.4558, "cost_savings": 0.7431, "mean_auc_prefill": 0.856, "mean_auc_prompt_only": 0.804}
MAX_TASK_COLUMNS = 8  # the within-task table shows one column per task up to this many tasks
TASK_COLUMNS = ("task", "n", "best single", "oracle", "prefill-router accuracy", "gap closed", "cost savings",
                "savings at best-single accuracy", "best gap closed at >= threshold savings", "best other router",
                "prefill-router mean AUC")


def _candidates(op: dict[str, Any]) -> list[str]:
    """Markdown: the policies calibrated on val for the operating point, when more than one."""
    cands = op.get("candidates") or []
    if len(cands) < 2:
        return []
    each = "; ".join(f"{_rule_label(c['policy'], c['param'], long=True)} ({c['status']}): accuracy "
                     f"{_pct(c['val_accuracy'])}, mean cost {_num(c['val_cost'], '.3g')}" for c in cands)
    return [f"Policies calibrated on val: {each}. Kept: the {op['policy']} policy.", ""]


def _policy_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    """A probabilistic router's rows, one per policy, each with its own sweep's frontier cells:
    the operating point's policy first (marked), then each other policy at its val-calibrated
    parameter (``candidate_points``), or with its sweep alone when it was not calibrated."""
    points, front = r.get("candidate_points") or {}, fronts(r)
    cands = {c["policy"]: c for c in (r.get("operating_point") or {}).get("candidates") or []}
    rows = []
    for policy in [r["policy"], *(p for p in policy_names() if p != r["policy"] and p in front)]:
        if policy == r["policy"]:
            point = r
            mark = "artifact's operating point" if name == ARTIFACT else "operating point"
            label = f"{name} ({_rule_label(policy, r['param'])}) ◀ {mark}"
        elif policy in points or policy in cands:  # an older report has the candidate, not its test point
            point, c = points.get(policy), points.get(policy) or cands[policy]
            label = (f"{name} ({_rule_label(policy, c['param'])}; {c['status']} on val, not kept"
                     + ("" if point else "; test point not in this report") + ")")
        else:
            point, label = None, f"{name} ({policy} policy: sweep only, not calibrated)"
        cells = ([_pct(point["accuracy"]), _num(point["cost"], ".3g"), _pct(point["gap_closed"]),
                  _pct(point["cost_savings"])] if point else ["—"] * 4)
        m = front.get(policy)
        rows.append([label, *cells, _num(m["pauccc"]) if m else "—", _num(r.get("mean_auc")),
                     *(_new_cells(m) if m else ["—", "—"])])
    return rows


def table_rows(subset: dict[str, Any]) -> list[list[str]]:
    """One row per router (per policy for a probabilistic one: :func:`_policy_rows`), then the
    single models and the oracle (formatted cells)."""
    refs, rows = subset["references"], []
    for name, r in subset["routers"].items():
        if r["kind"] != "fixed":
            rows += _policy_rows(name, r)
            continue
        rows.append([name, _pct(r["accuracy"]), _num(r["cost"], ".3g"), _pct(r["gap_closed"]),
                     _pct(r["cost_savings"]), _num(r["pauccc"]), _num(r.get("mean_auc")), *_new_cells(r)])
    dear, best = refs["most_expensive"]["cost"], refs["best_single"]
    for name, s in refs["single"].items():
        savings = 1 - s["cost"] / dear if dear else float("nan")
        gap = (s["accuracy"] - best["accuracy"]) / (refs["oracle"]["accuracy"] - best["accuracy"]) \
            if refs["oracle"]["accuracy"] != best["accuracy"] else float("nan")
        rows.append([f"single: {name}", _pct(s["accuracy"]), _num(s["cost"], ".3g"), _pct(gap), _pct(savings), "", "",
                     *_new_cells(s)])
    o = refs["oracle"]
    rows.append(["oracle", _pct(o["accuracy"]), _num(o["cost"], ".3g"), _pct(1.0), _pct(o["cost_savings"]), "", "",
                 *_new_cells(o)])
    rows.append(["zero router (single-model hull)", "", "", "", "", _num(refs["zero_router_pauccc"]), "", "",
                 _pct(refs.get("zero_router_gap_at_savings"))])
    return rows


def task_rows(report: dict[str, Any], subset: str = "test") -> list[list[str]]:
    """One row per task of the test split (``subset``: ``test`` or ``disagreement``, each
    against that task's own references): the prefill router at its operating point and the
    most accurate other router."""
    rows = []
    for task, parts in report.get("by_task", {}).items():
        if subset not in parts:
            continue
        refs, routers = parts[subset]["references"], parts[subset]["routers"]
        ours = routers["prefill-router"]
        others = [(r["accuracy"], k) for k, r in routers.items() if k != "prefill-router" and r["accuracy"] is not None
                  and math.isfinite(r["accuracy"])]
        other = max(others) if others else None
        best = refs["best_single"]
        front = fronts(ours).get(ours["policy"])
        iso, gap = _new_cells(front) if front else ("—", "—")
        rows.append([task, str(refs["n"]), f"{best['target']} {_pct(best['accuracy'])}{tie_note(refs)}",
                     _pct(refs["oracle"]["accuracy"]), _pct(ours["accuracy"]), _pct(ours["gap_closed"]),
                     _pct(ours["cost_savings"]), f"{iso} (vs {best['target']})", gap,
                     f"{other[1]} {_pct(other[0])}" if other else "—", _num(ours.get("mean_auc"), ".3f")])
    return rows


def task_columns(report: dict[str, Any]) -> tuple[str, ...]:
    """The per-task table's columns, the frontier ones naming the operating point's policy."""
    policy = report["subsets"]["test"]["routers"][ARTIFACT]["policy"]
    return tuple(f"{c} ({policy} sweep)" if c in COLUMNS[-2:] else c for c in TASK_COLUMNS)


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report: setup, test and disagreement tables, per-task tables, then ours
    beside the paper's numbers, the AUC margins and where the headroom is."""
    equal = equal_costs(report)
    parts = [
        *intro_lines(report), *novelty_lines(report), *off_policy_lines(report),
        "## Test split" + (" (observed cells only: replay, see the off-policy estimates)" if report.get("off_policy")
                           else ""), "", *subset_lines(report, "test"),
        *interval_lines(report), *task_interval_lines(report),
        "## Disagreement queries (test)", "",
        *(subset_lines(report, "disagreement") if "disagreement" in report["subsets"] else
          ["No disagreement queries.", ""]),
        *task_lines(report),
        *(drop_cost_rows(paper_lines(report)) if equal else paper_lines(report)),
        *(equal_cost_policy_lines() if equal else policy_lines(report)),
        *margin_lines(report.get("auc_margin") or {}),
        *within_task_lines(report), *pairwise_lines(report, MAX_TASK_COLUMNS),
        *headroom_lines(report.get("headroom_by_task") or [], report["targets"]),
    ]
    return "\n".join(parts)


def novelty_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: the novelty gate (:mod:`shared.novelty`) and the test queries it routed by its prior."""
    g = report.get("novelty")
    if not g:
        return []
    return [f"Novelty gate: a prompt whose novelty exceeds {g['threshold']:.3g} (the {g['quantile']:.0%} quantile of "
            f"{g['n_calibration']} val rows) is routed by {g['prior_source']} (best: {g['prior_target']}), not by "
            f"its prediction: {g['test_novel']} of {g['test_rows']} test queries "
            f"({g['test_novel'] / max(1, g['test_rows']):.1%}). Every figure below includes it.", ""]


def subset_lines(report: dict[str, Any], subset: str) -> list[str]:
    """Markdown: a subset's tables. Equal costs: the accuracy table alone (pooled and task-averaged
    accuracy, gap closed), the headline; else the cost table, then the accuracy table."""
    if equal_costs(report):
        return accuracy_lines(report, subset)
    sub = report["subsets"][subset]
    return [_md_table(table_rows(sub), columns(sub["references"])), "", *accuracy_lines(report, subset)]


def intro_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: rows, mode, operating point, skipped baselines, embedded text, definitions."""
    n, op, test = report["n"], report["operating_point"], report["subsets"]["test"]
    thr = report.get("savings_threshold", PAPER["cost_savings"])
    refs = test["references"]
    skipped, known = report.get("skipped_routers") or {}, report.get("artifact_baselines") or {}
    best = refs["best_single"]
    return [
        "# Router evaluation", "",
        f"Artifact `{report.get('artifact', '?')}`; targets {', '.join(report['targets'])}. Rows: train {n['train']}, "
        f"val {n['val']}, test {n['test']} (disagreement {n['test_disagreement']}, "
        f"{_pct(report['disagreement_share'])}).", "",
        *([f"Every row of the evaluated table is scored as test (all_rows_test); train / val rows: "
           f"{'from train_data' if n['train'] or n['val'] else 'none'}.", ""] if report.get("all_rows_test") else []),
        f"Operating point: {_rule_label(op['policy'], op[op['policy']], long=True)} ({op['status']}; "
        f"target cost {_num(op['target_cost'], '.4g')}, "
        f"target accuracy {_num(op['target_accuracy'], '.4g')}); on val: accuracy {_pct(op['val_accuracy'])}, "
        f"mean cost {_num(op['val_cost'], '.3g')}. Baselines are calibrated the same way on val."
        + (f" Note: {op['note']}." if op.get("note") else ""), "", *_candidates(op),
        *([f"Skipped (not evaluated): {'; '.join(f'`{k}` {v}' for k, v in skipped.items())}.", ""] if skipped else []),
        *([f"From the artifact (no train rows): {'; '.join(f'`{k}` always takes {v}' for k, v in known.items())}.",
           ""] if known else []),
        *([describe(report["semantic_text"]), ""] if report.get("semantic_text") else []),
        *([] if equal_costs(report) else [
        "Costs are mean USD per query (measured label cost). Gap closed = (acc − best single) / (oracle − best "
        "single); cost savings vs always using the most expensive target "
        f"({refs['most_expensive']['target']}); P-AUCCC over [cheapest, most expensive] cost "
        "above the cheapest model's accuracy. Savings at best-single accuracy = the largest saving vs the best "
        f"single model ({refs['best_single']['target']}) among the router's operating points at least as accurate "
        f"as it; best gap closed at >= threshold savings = the best gap closed among operating points at least "
        f"{_pct(thr)} cheaper than the most expensive target (zero router: random mixing of single models at that "
        "budget). A probabilistic router has one row per routing policy, on the same predictions: its operating "
        "point's policy (marked ◀), then each other policy at the parameter calibrated on val for the same target "
        "(not kept), or its sweep alone when none was calibrated; each row's P-AUCCC and frontier columns sweep its "
        "own policy.", ""]),
        f"The best single model, the reference of gap closed and of the savings at its accuracy (on the whole split, "
        f"in each subset and in each task), is ranked by {BEST_SINGLE_TIE_BREAK}; so at a tie the reference is the "
        f"cheapest of the most accurate targets. Test: {best['target']}{tie_note(refs) or ' (no tie)'}. "
        f"{oracle_rows(refs)}", "",
        *(["`task-best` is a reference, not a router: it is told each query's task and sends it to the target "
           "most accurate on that task in train + val (a task it never saw: its source's pooled group if one was "
           "fitted, else the best single target), so it bounds what routing by task alone can gain.", ""]
          if "task-best" in test["routers"] else []),
    ]


def oracle_rows(refs: dict[str, Any]) -> str:
    """Which rows the oracle and the accuracies count (``training.evaluate.routing_metrics``)."""
    full = refs.get("n_all_labelled")
    return (f"Oracle = per query the best label among the targets that have one, averaged over those of the "
            f"{refs['n']} rows with at least one label: a missing label is skipped, never counted wrong (a single "
            "model counts its labelled rows, a router the rows whose chosen target is labelled)"
            + (f"; {full} of the {refs['n']} rows are labelled by every target, the only ones `data import`'s "
               "oracle counts." if full is not None else "."))


def interval_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: the prefill router's operating point on test with its bootstrap intervals."""
    iv = report.get("operating_point_interval")
    if not iv:
        return []
    refs = report["subsets"]["test"]["references"]

    def cell(key: str, points: bool = False) -> str:
        v, lo, hi = iv[key]
        if points:
            return f"{_num(100 * v, '+.2f')} points [{_num(100 * lo, '+.2f')}, {_num(100 * hi, '+.2f')}]"
        return f"{_pct(v)} [{_pct(lo)}, {_pct(hi)}]"

    savings = "" if equal_costs(report) else (f"; cost savings vs {refs['most_expensive']['target']} "
                                              f"{cell('cost_savings')}")
    return [f"The prefill router's operating point on test, with 95% bootstrap intervals over the test queries: "
            f"accuracy {cell('accuracy')}; accuracy minus {refs['best_single']['target']}'s "
            f"{cell('accuracy_minus_best', points=True)}{savings}. A check of this router on held-out rows of the "
            "same tasks should land inside these intervals.", ""]


def task_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: the per-task tables (all test queries, then the disagreement ones)."""
    if not report.get("by_task"):
        return ["No per-task rows (no query table with a `task` column).", ""]
    out = []
    for subset, title in (("test", "all test queries"), ("disagreement", "disagreement queries only")):
        header, rows = task_columns(report), task_rows(report, subset)
        if equal_costs(report):
            header, rows = drop_cost_columns(header, rows)
        tail = ("routers at the operating point chosen on val (ties for best single broken as above)."
                if equal_costs(report) else "routers at the operating point chosen on val, the frontier columns on "
                "its policy's sweep; the savings are at the accuracy of the task's own best single model (named; "
                "ties broken as above).")
        out += [f"## Per task ({title})", "",
                f"Each task against its own best single model{' and' if equal_costs(report) else ','} oracle"
                f"{'' if equal_costs(report) else ' and most expensive target'}; {tail}", "",
                _md_table(rows, header) if rows else "None.", ""]
    return out


def paper_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: our test numbers beside the paper's."""
    test = report["subsets"]["test"]
    ours = test["routers"]["prefill-router"]
    thr = report.get("savings_threshold", PAPER["cost_savings"])
    semantic = [r.get("mean_auc") for k, r in test["routers"].items()
                if r["kind"] == "probabilistic" and k != "prefill-router" and r.get("mean_auc") is not None]
    best, sweep = test["references"]["best_single"]["target"], f"{policy_names()[0]} sweep"
    return [
        "## Against the paper (arXiv 2603.20895)", "",
        f"| metric | paper | ours (test; sweeps: the {sweep}, the other policies' in the tables above) |",
        "|---|---|---|",
        f"| gap closed (best point along the {sweep}) | up to {_pct(PAPER['gap_closed'])} | "
        f"{_pct(ours['max_gap_closed'])} |",
        f"| gap closed at the operating point | — | {_pct(ours['gap_closed'])} |",
        f"| best gap closed at >= {_pct(thr)} savings vs most expensive ({sweep}) | {_pct(PAPER['gap_closed'])} "
        f"at {_pct(PAPER['cost_savings'])} | {_pct(ours.get('best_gap_closed_at_savings'))} (zero router "
        f"{_pct(test['references'].get('zero_router_gap_at_savings'))}) |",
        f"| cost savings vs most expensive | {_pct(PAPER['cost_savings'])} | {_pct(ours['cost_savings'])} at the "
        f"operating point; {_pct(ours['cost_savings_at_best_single_accuracy'])} at the best single model's "
        f"({best}'s) accuracy ({sweep}) |",
        f"| cost savings vs the best single model ({best}) at its accuracy ({sweep}) | — | "
        f"{_reached(ours.get('iso_accuracy_savings'))} |",
        f"| mean per-target AUC, prefill router | ~{PAPER['mean_auc_prefill']} | {_num(ours['mean_auc'], '.3f')} |",
        f"| mean AUC, best prompt-only baseline | ~{PAPER['mean_auc_prompt_only']} | "
        f"{_num(max(semantic), '.3f') if semantic else '—'} |", "",
    ]


def margin_lines(margins: dict[str, dict], what: str = "Mean per-target AUC margin of the prefill router over "
                 "each probabilistic baseline on test (paired bootstrap over test queries") -> list[str]:
    """Markdown: our mean-AUC margin over each probabilistic baseline, with its bootstrap CI."""
    if not margins:
        return []
    lines = [f"{what}, 95% interval; p = share of replicates with margin <= 0):", "",
             "| baseline | margin | 95% interval | p |", "|---|---:|---|---:|"]
    for name, m in margins.items():
        lines.append(f"| {name} | {_num(m['margin'], '+.3f')} | [{_num(m['low'], '+.3f')}, {_num(m['high'], '+.3f')}] "
                     f"| {_num(m['p_le_zero'], '.3f')} |")
    return lines + [""]


def within_task_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: each probabilistic router's AUC ranked within each task, and our margin on it."""
    table = report.get("within_task_auc")
    if not table:
        return []
    all_tasks = [t for t, parts in report.get("by_task", {}).items() if "test" in parts]
    many = len(all_tasks) > MAX_TASK_COLUMNS
    tasks = [] if many else all_tasks

    def task_auc(task: str, name: str) -> str:
        return _num(report["by_task"][task]["test"]["routers"].get(name, {}).get("mean_auc"), ".3f")

    lines = ["## Within-task AUC (test)", "",
             "The pooled AUC above also rewards telling the tasks apart, which a router told the task gets for "
             "free. Here each target's AUC is ranked inside each task only (mean over tasks weighted by their "
             "test rows, then over targets): 0.5 means no knowledge of which queries of a task a target gets "
             "right." + (f" Per-task columns are left out ({len(all_tasks)} tasks; the per-task rows above "
                         "have each task's pooled AUC)." if many else ""), "",
             "| " + " | ".join(["router", "mean within-task AUC", *tasks]) + " |",
             "|---|---:|" + "---:|" * len(tasks)]
    for name, row in table.items():
        cells = [name, _num(row["mean_auc"], ".3f"), *(task_auc(t, name) for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + margin_lines(report.get("auc_margin_within_task") or {},
                                       "Within-task AUC margin of the prefill router over each probabilistic "
                                       "baseline (paired bootstrap, resampling within each task")


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


def summary_table(report: dict[str, Any]):
    """The test table as a rich Table for the console, its caption the rows the oracle counts."""
    refs = report["subsets"]["test"]["references"]
    view = accuracy_table(report) if equal_costs(report) else _rich(
        f"router evaluation on test (n={report['n']['test']})", columns(refs), table_rows(report["subsets"]["test"]))
    view.caption = oracle_rows(refs)
    return view


def task_table(report: dict[str, Any]):
    """The per-task rows (all test queries) as a rich Table for the console."""
    header, rows = task_columns(report), task_rows(report, "test")
    return _rich("per task (test)", *(drop_cost_columns(header, rows) if equal_costs(report) else (header, rows)))


def write_outputs(report: EvalReport, out: str) -> None:
    """``report.json``, ``report.md`` and a cost-accuracy PNG per subset under ``out`` (local or s3://)."""
    from shared import storage
    from training.evaluate.plots import FILES, plot

    clean = report.to_json()
    storage.write_bytes(storage.join(out, "report.json"), report.json_text().encode())
    storage.write_bytes(storage.join(out, "report.md"), markdown(clean).encode())
    for subset, name in FILES.items():
        if subset in clean["subsets"]:
            storage.write_bytes(storage.join(out, name), plot(clean, subset))
