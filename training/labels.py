"""The label folders' format and their summary, owned here for every stage that writes or reads them.

A labels folder holds ``<target>/shard-XXXXX.parquet`` (:data:`LABEL_SCHEMA`; rows that
failed go to ``<target>/failed/``) and a ``summary.json``. ``label run`` and ``data import``
write it; the summary (per-target accuracy, cost, rows and failures, the oracle accuracy and
the share of queries on which the targets disagree) is pure, with no Ray.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from shared import storage
from training import shards as sh

FAILED_DIR = "failed"

LABEL_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("split", pa.string()), ("target", pa.string()), ("correct", pa.float64()),
    ("answer", pa.string()), ("input_tokens", pa.int64()), ("output_tokens", pa.int64()),
    ("latency_s", pa.float64()), ("cost", pa.float64()), ("status", pa.string()), ("error", pa.string()),
])

PROPENSITY_FILE = "propensity.parquet"
# A labelled (query, target) cell of a decision log: the mean over its labelled decisions of the
# propensity P(target | decision) (null when none had one: pinned or degraded requests), and how many.
PROPENSITY_SCHEMA = pa.schema([("query_id", pa.string()), ("split", pa.string()), ("target", pa.string()),
                               ("propensity", pa.float64()), ("decisions", pa.int64())])

# A float score counts as "right" at or above this (reasoning-gym gives partial credit).
RIGHT_AT = 0.5


def target_stats(table: pa.Table, expected_rows: int) -> dict[str, Any]:
    """Rows, failures, missing rows, mean correctness and mean cost of one target's labels."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]

    def mean(xs: list[float | None]) -> float:  # of the values present (null: not recorded)
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else math.nan

    return {
        "rows": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "missing": max(0, expected_rows - len(rows)),
        "accuracy": mean([r["correct"] for r in ok]),
        "right_share": mean([float(r["correct"] >= RIGHT_AT) for r in ok]),
        "mean_cost": mean([r["cost"] for r in ok]),
        "mean_output_tokens": mean([r["output_tokens"] for r in ok]),
        "mean_latency_s": mean([r["latency_s"] for r in ok]),
    }


def correctness_matrix(labels: dict[str, pa.Table]) -> dict[str, dict[str, float]]:
    """``{query_id: {target: correct}}`` over rows with ``status == "ok"``."""
    out: dict[str, dict[str, float]] = {}
    for target, table in labels.items():
        for qid, status, correct in zip(*(table.column(c).to_pylist() for c in ("query_id", "status", "correct"))):
            if status == "ok":
                out.setdefault(qid, {})[target] = correct
    return out


def agreement(labels: dict[str, pa.Table]) -> dict[str, Any]:
    """Oracle accuracy and disagreement share over the queries every target labelled.

    Oracle: mean over queries of the best target's score. Disagreement: share of queries
    where at least one target is right (score >= 0.5) and at least one is wrong.
    """
    targets = list(labels)
    matrix = correctness_matrix(labels)
    complete = [scores for scores in matrix.values() if len(scores) == len(targets)]
    if not complete:
        return {"queries": 0, "oracle_accuracy": math.nan, "disagreement_share": math.nan}
    oracle = sum(max(s.values()) for s in complete) / len(complete)
    split = sum(1 for s in complete if len({v >= RIGHT_AT for v in s.values()}) > 1)
    return {"queries": len(complete), "oracle_accuracy": oracle, "disagreement_share": split / len(complete)}


def summarise(labels: dict[str, pa.Table], expected_rows: int) -> dict[str, Any]:
    return {"targets": {t: target_stats(tbl, expected_rows) for t, tbl in labels.items()}, **agreement(labels)}


def summary_view(summary: dict[str, Any], title: str) -> Any:
    """A rich table of :func:`summarise`'s result."""
    from rich.table import Table

    view = Table(title=title)
    for col in ("target", "rows", "failed", "missing", "accuracy", "right (>=0.5)", "mean cost (USD)",
                "mean out tok", "latency/row (s)"):
        view.add_column(col, justify="left" if col == "target" else "right")
    for target, s in summary["targets"].items():
        view.add_row(target, str(s["rows"]), str(s["failed"]), str(s["missing"]), f"{s['accuracy']:.3f}",
                     f"{s['right_share']:.3f}", f"{s['mean_cost']:.2e}", f"{s['mean_output_tokens']:.1f}",
                     "-" if s["mean_latency_s"] is None else f"{s['mean_latency_s']:.3f}")
    view.caption = (f"oracle accuracy {summary['oracle_accuracy']:.3f} over the {summary['queries']} queries every "
                    f"target labelled (only those; `evaluate`'s oracle also counts a partly labelled query, on its "
                    f"present labels), targets disagree on {summary['disagreement_share']:.1%} of them")
    return view


def read_target(tdir: str, with_failed: bool = True) -> pa.Table:
    """One target's finished shards (and, with ``with_failed``, the rows of its failed files)."""
    paths = [sh.shard_path(tdir, s) for s in sorted(sh.finished_shards(tdir))]
    if with_failed:
        paths += [sh.shard_path(storage.join(tdir, FAILED_DIR), s)
                  for s in sorted(sh.finished_shards(storage.join(tdir, FAILED_DIR)))]
    tables = [storage.read_parquet(p).cast(LABEL_SCHEMA) for p in paths]
    return pa.concat_tables(tables) if tables else LABEL_SCHEMA.empty_table()


def load_labels(out: str, targets: list[str] | None = None) -> dict[str, pa.Table]:
    """Finished labels per target (``ok`` rows only), for the stages downstream."""
    names = targets or sorted(storage.read_json(storage.join(out, "summary.json"))["targets"])
    return {t: read_target(storage.join(out, t), with_failed=False) for t in names}
