"""Cells and small tables of the evaluation report (:mod:`training.evaluate.report`; numbers as
text: :mod:`training.evaluate.cells`): a routing rule's label, the frontier cells, a router's
frontier per policy, the best single model's ties, the main table's columns naming its reference."""

from __future__ import annotations

from typing import Any

from shared.policy import Policy, policy_names
from training.evaluate.cells import missing, pct

COLUMNS = ("router", "accuracy", "mean cost", "gap closed", "cost savings", "P-AUCCC", "mean AUC",
           "savings at best-single accuracy", "best gap closed at >= threshold savings")
ARTIFACT = "prefill-router"  # the router of the artifact evaluated


def rule_label(policy: str, param: float, long: bool = False) -> str:
    """A routing rule in a table cell (``tol 0.05``, ``value 0.0955``) or in prose (``long``:
    ``tolerance 0.05``, ``value policy at 0.0955 USD per correct answer``): ``Policy.label``."""
    return Policy.of(policy, param).label(long)


def reached(x) -> str:
    """An iso-accuracy saving: "not reached" when no operating point is as accurate."""
    return "not reached" if missing(x) else pct(x)


def new_cells(r: dict[str, Any]) -> list[str]:
    """Savings at best-single accuracy ("not reached"), best gap closed at the savings
    threshold ("no point": no operating point saves that much)."""
    gap = r.get("best_gap_closed_at_savings")
    return [reached(r.get("iso_accuracy_savings")), "no point" if pct(gap) == "—" else pct(gap)]


def columns(refs: dict[str, Any], base=COLUMNS) -> tuple[str, ...]:
    """``base`` with the savings column naming its reference, the best single model."""
    return tuple(f"{c} ({refs['best_single']['target']})" if c == "savings at best-single accuracy" else c
                 for c in base)


def ties(refs: dict[str, Any]) -> list[str]:
    """The other targets exactly as accurate as the best single model (passed over by the tie-break)."""
    best = refs["best_single"]
    return [t for t, s in refs["single"].items() if t != best["target"] and s["accuracy"] == best["accuracy"]]


def tie_note(refs: dict[str, Any]) -> str:
    """`` (tied with X at 68.75%; kept as the cheaper)`` when other targets are as accurate as the
    best single model (the tie-break's second key, or its third when they cost the same); else ""."""
    tied, best = ties(refs), refs["best_single"]
    if not tied:
        return ""
    dearer = all(refs["single"][t]["cost"] > best["cost"] for t in tied)
    kept = "kept as the cheaper" if dearer else "kept as the first of the cheapest in the targets' order"
    return f" (tied with {', '.join(tied)} at {pct(best['accuracy'])}; {kept})"


def fronts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A probabilistic router's frontier metrics per registered policy it has: the first policy's
    (tolerance) are the row's own keys, every other one's under ``<name>_policy``."""
    first, *others = policy_names()
    return {first: r, **{name: r[f"{name}_policy"] for name in others if r.get(f"{name}_policy")}}


def md_table(rows: list[list[str]], header=COLUMNS) -> str:
    """A Markdown table of formatted ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def rich_table(title: str, header, rows):
    """The same as a rich Table for the console."""
    from rich.table import Table

    view = Table(title=title)
    for i, col in enumerate(header):
        view.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        view.add_row(*row)
    return view
