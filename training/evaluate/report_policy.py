"""The "tolerance or value policy" section of the evaluation report (:mod:`training.evaluate.report`):
each probabilistic router's frontier under every registered policy, on the same predictions,
and the operating point each policy reaches on val."""

from __future__ import annotations

from typing import Any

from shared.policy import Policy, policy_names
from training.evaluate.cells import num, pct
from training.evaluate.report_cells import ARTIFACT, columns, fronts, md_table, new_cells, reached

POLICY_COLUMNS = ("router", "policy", "P-AUCCC", "best gap closed along the sweep", "savings at best-single accuracy",
                  "best gap closed at >= threshold savings")


def _frontiers(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A probabilistic router row's frontier per registered policy (:func:`fronts`); empty when
    one is missing or only one policy is registered."""
    have = fronts(r) if r["kind"] == "probabilistic" else {}
    return list(have.items()) if len(have) == len(policy_names()) > 1 else []


def _sweep_rows(routers: dict[str, Any]) -> list[list[str]]:
    """Per probabilistic router: its frontier under each policy (tolerance, then value, ...)."""
    return [[name, policy, num(m["pauccc"]), pct(m["max_gap_closed"]), *new_cells(m)]
            for name, r in routers.items() for policy, m in _frontiers(r)]


def policy_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: each probabilistic router's frontier under each registered policy (the tolerance
    policy, the cost-aware value policy, ...), on the same predictions (the artifact serves the
    one its operating point names)."""
    test = report["subsets"]["test"]
    if not _sweep_rows(test["routers"]):
        return []
    names = policy_names()
    summaries = " ".join(s for s in (Policy.named(n).summary for n in names) if s)
    lines = [f"## {(', '.join(names[:-1]) + ' or ' + names[-1]).capitalize()} policy (same predictions)", "",
             f"{summaries} Each row sweeps its policy's parameter over the whole range, so these are frontier "
             "metrics, not one operating point. The artifact serves the policy of its operating point (above).", ""]
    for key, title in (("test", "Test split"), ("disagreement", "Disagreement queries (test)")):
        if key in report["subsets"]:
            sub = report["subsets"][key]
            header = columns(sub["references"], POLICY_COLUMNS)
            lines += [f"{title}:", "", md_table(_sweep_rows(sub["routers"]), header), ""]
    lines += _policy_point_lines(report.get("policy_operating_points") or {},
                                 test["references"]["best_single"]["target"])
    tasks = [(t, parts["test"]) for t, parts in report.get("by_task", {}).items() if "test" in parts]
    rows = [[t, sub["references"]["best_single"]["target"],
             *(reached(m.get("iso_accuracy_savings")) for _, m in _frontiers(sub["routers"][ARTIFACT]))]
            for t, sub in tasks if ARTIFACT in sub["routers"] and _frontiers(sub["routers"][ARTIFACT])]
    if rows:
        lines += ["Prefill router per task (test), savings at the accuracy of the task's best single model (ties "
                  "broken as above):", "",
                  md_table(rows, ("task", "best single (the reference)", *(f"{n} policy" for n in names))), ""]
    return lines


def _policy_point_lines(points: dict[str, Any], best: str) -> list[str]:
    """Markdown: each router's val-chosen operating point per policy, applied to test."""
    if not points.get("routers"):
        return []
    lines = [f"Operating point chosen on val (the cheapest point reaching the best single model's val accuracy, "
             f"{pct(points['target_val_accuracy'])}), applied to test:", "",
             f"| router | policy | parameter | test accuracy | mean cost | savings vs {best} |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in points["routers"].items():
        for policy, p in row.items():
            cells = ["not reached on val", "", "", ""] if p is None else [
                num(p["param"], ".4g"), pct(p["accuracy"]), num(p["cost"], ".3g"), pct(p["savings_vs_best_single"])]
            lines.append("| " + " | ".join([name, policy, *cells]) + " |")
    return lines + [""]
