"""How much does the encoder's own next-token confidence say about each target? No training.

A ``next`` block (``capture poolings=[..., next]``, :func:`shared.features.next_token_stats`)
holds three numbers per prompt from the encoder's next-token distribution after the prompt:
top-1 probability, top-1 minus top-2, entropy. This benchmark scores each of them, as it is,
as a ranking of every target's queries *inside each task* (the task itself is worth nothing
on RouterBench): AUC of ``top1``, ``margin`` and ``-entropy`` against each target's
correctness, per task, with :func:`training.evaluate.uncertainty.within_group_auc`. A score
above 0.5 means the target is more often right where the encoder is sure of its answer.

    prefill-router capture queries=runs/pipeline-routerbench/queries.parquet \\
        out=runs/next-token/smollm2 "layers=[30]" "poolings=[next]"
    .venv/bin/python bench/next_token_signal.py score --activations runs/next-token/smollm2 \\
        --labels runs/pipeline-routerbench/labels --queries runs/pipeline-routerbench/queries.parquet \\
        --out bench/results/next_token_smollm2.json

Rows are the capture's. For a larger encoder on 2 CPUs, capture a seeded sample per task
(``sample`` writes it as a query table) and score the same way. ``score`` prints a markdown
table (mean over targets, and GPT-4 or the first target) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STATS = ("top1", "margin", "-entropy")
# What the table (markdown, bench/README.md) reads of the JSON: key -> sub-keys ("*": every task).
TABLE_FIELDS = {"column": (), "targets": (), "by_task": ("*.n", *(f"*.{s}" for s in STATS))}


def signal_table(stats: np.ndarray, Y: np.ndarray, tasks: np.ndarray, targets: list[str]) -> dict:
    """``{task: {stat: {target: AUC}}}``: ``stats`` ``(n, 3)`` (top1, margin, entropy), ``Y``
    ``(n, T)`` correctness (NaN = missing), ``tasks`` ``(n,)``; entropy is negated (sure = high)."""
    from training.metrics import within_group_auc

    scores = stats * np.array([1.0, 1.0, -1.0])
    out: dict = {}
    for task in sorted(set(tasks)):
        rows = tasks == task
        out[task] = {"n": int(rows.sum())}
        for k, name in enumerate(STATS):
            P = np.repeat(scores[rows, k:k + 1], len(targets), axis=1)
            auc = within_group_auc(Y[rows], P, tasks[rows])
            out[task][name] = {t: float(a) for t, a in zip(targets, auc)}
    return out


def markdown(table: dict, targets: list[str], focus: str) -> str:
    """One row per task and statistic: the mean AUC over targets and ``focus``'s."""
    lines = [f"| task | n | statistic | mean AUC over {len(targets)} targets | {focus} |", "|---|---:|---|---:|---:|"]
    for task, row in table.items():
        for name in STATS:
            aucs = np.array([row[name][t] for t in targets])
            lines.append(f"| {task} | {row['n']} | {name} | {np.nanmean(aucs):.3f} | {row[name][focus]:.3f} |")
    return "\n".join(lines)


def load(activations: str, labels: str, queries: str, column: str | None) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray, list[str], str]:
    """``(stats, Y, tasks, targets, column)`` over the captured rows."""
    from shared import storage
    from shared.features import block_columns, parse_block
    from training.dataset import load_routing_data
    from training.semantic_text import read_queries

    names = block_columns(storage.read_json(storage.join(activations, "manifest.json"))["columns"])
    column = column or next((c for c in names if parse_block(c)[1] == "next"), None)
    if column is None:
        raise SystemExit(f"{activations} has no next block ({names}): capture with poolings=[next] and the last layer")
    targets = sorted(p.name for p in Path(labels).iterdir() if p.is_dir())
    data = load_routing_data(activations, labels, targets, blocks=[column])
    tasks = np.asarray(read_queries(queries, data.query_ids)["task"])
    return data.blocks[column], data.Y, tasks, targets, column


def write_sample(queries: str, per_task: dict[str, int], seed: int, out: str) -> int:
    """A query table of ``per_task[task]`` rows of each task, drawn without replacement (seeded),
    in the table's order; returns the rows written."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from shared import storage

    table = storage.read_parquet(queries)
    rng = np.random.default_rng(seed)
    take: list[int] = []
    for task, n in per_task.items():
        rows = np.flatnonzero(pc.equal(table["task"], task).to_numpy(zero_copy_only=False))
        if n > len(rows):
            raise SystemExit(f"{queries} has {len(rows)} rows of task {task!r}, fewer than the {n} asked for")
        take += rng.choice(rows, n, replace=False).tolist()
    storage.write_parquet(table.take(pa.array(sorted(take))), out)
    return len(take)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="write a seeded per-task sample of a query table")
    sample.add_argument("--queries", required=True)
    sample.add_argument("--per-task", nargs="+", required=True, metavar="TASK=N")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True)
    score = sub.add_parser("score", help="within-task AUC of each next-token statistic")
    score.add_argument("--activations", required=True, help="capture output holding a h<L>_next column")
    score.add_argument("--labels", required=True, help="label folders, one per target (label run / data import)")
    score.add_argument("--queries", required=True, help="the query table (its task column groups the rows)")
    score.add_argument("--column", default=None, help="the next block (default: the one in the activations)")
    score.add_argument("--out", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    if args.command == "sample":
        per_task = {k: int(v) for k, v in (item.split("=", 1) for item in args.per_task)}
        print(f"wrote {write_sample(args.queries, per_task, args.seed, args.out)} queries to {args.out}")
        return 0
    stats, Y, tasks, targets, column = load(args.activations, args.labels, args.queries, args.column)
    table = signal_table(stats, Y, tasks, targets)
    focus = "gpt-4-1106-preview" if "gpt-4-1106-preview" in targets else targets[0]
    print(f"{column} of {args.activations}: {len(tasks)} queries, within-task AUC of each statistic as it is")
    print(markdown(table, targets, focus))
    if args.out:
        Path(args.out).write_text(json.dumps({"column": column, "activations": args.activations,
                                              "targets": targets, "by_task": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
