"""Learned token pooling against ``last``, ``mean`` and ``last+mean``, out of fold on train + val only.

Each block set is cross-validated exactly as ``prefill-router tune`` scores a candidate
(:func:`training.fit.tune.fold_predictions`: the same group folds of train + val, transforms fitted on the
training folds only, an ensemble of ``--seeds`` members early-stopped on 15% of them; the test split is
never read). A set may name ``h{layer}_attn`` blocks: attention pooling (:mod:`shared.pooling`,
``--n-queries`` learned queries over the PCA-``--token-components`` states of the prompt's last
``--window`` tokens, read from a capture made with ``token_layers``) followed by SharedTrunkNet, trained
end to end on the same masked soft-label BCE (or, with ``--objectives``, each objective of
:mod:`training.objectives` in turn: one row per block set and objective). Scored as :mod:`bench.objectives` scores its rows: mean
pooled AUC, mean within-task AUC, pairwise AUC, task-averaged accuracy of the argmax, savings at the best
single target's accuracy; plus the within-task AUC per task.

    .venv/bin/python bench/pooling.py --activations runs/routerdc-tokens --labels ../main/runs/pipeline-routerdc/labels \\
        --queries ../main/runs/pipeline-routerdc/queries.parquet --artifact data/routerdc/router \\
        --blocks h12_last h12_mean h12_last,h12_mean h12_attn --n-components 64 --out bench/results/pooling_routerdc.json

Prints a markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("mean_pooled_auc", "mean_within_task_auc", "pairwise_auc", "task_averaged_accuracy", "iso_accuracy_savings")
TABLE_FIELDS = {"rows": ("blocks",) + FIELDS + ("within_task_auc_by_task",), "reference": FIELDS,
                "equal_costs": (), "tasks": ()}


def per_task_within(Y: np.ndarray, P: np.ndarray, tasks: np.ndarray) -> dict[str, float]:
    """Mean over targets of the AUC within each task (NaN-skipping)."""
    from training.metrics import masked_auc

    out = {}
    for t in sorted(set(tasks)):
        rows = tasks == t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[str(t)] = float(np.nanmean(masked_auc(Y[rows], P[rows])))
    return out


def run(args: argparse.Namespace) -> dict:
    from bench.objectives import parse_objective, scores, task_means
    from shared.features import is_attn, parse_block
    from training.dataset import load_routing_data
    from training.evaluate.routing_metrics import equal_costs
    from training.cv import fold_groups
    from training.fit.tune import fold_predictions
    from training.loop import TrunkConfig
    from training.pooled import PoolConfig
    from training.semantic_text import read_queries
    from training.token_states import read_token_windows

    sets = [b.split(",") for b in args.blocks]
    vectors = sorted({b for s in sets for b in s if not is_attn(b)})
    data = load_routing_data(args.activations, args.labels, args.targets, vectors).where("train", "val")
    tasks = np.array(read_queries(args.queries, data.query_ids)["task"], dtype=object)
    groups, C = fold_groups(data, args.queries), np.nan_to_num(data.cost)
    tokens = {}
    for b in sorted({b for s in sets for b in s if is_attn(b)}):
        ids, states, mask = read_token_windows(args.activations, parse_block(b)[0], args.window, list(data.query_ids))
        tokens[b] = (states, mask)
        logging.info("%s: %d rows, window %d, %.1f real tokens per row", b, len(ids), mask.shape[1], mask.sum(1).mean())
    pool = PoolConfig(n_components=args.token_components, n_queries=args.n_queries, window=args.window,
                      position_bias=args.position_bias, lr_scale=args.pool_lr_scale)
    base = TrunkConfig(**({"max_epochs": args.max_epochs} if args.max_epochs else {}))
    rows, helds = [], None
    for names, obj in [(names, parse_objective(o)) for names in sets for o in args.objectives]:
        trunk, start = base.model_copy(update={"objective": obj}), time.perf_counter()
        P, helds = np.full(data.Y.shape, np.nan), []
        toks = {b: tokens[b] for b in names if is_attn(b)}
        for held, Ph in fold_predictions({b: data.blocks[b] for b in names if not is_attn(b)}, data.Y, groups,
                                         args.n_components, trunk, args.folds, args.seeds, seed=args.seed,
                                         tokens=toks or None, pool=pool):
            P[held] = Ph
            helds.append(held)
        rows.append({"blocks": "+".join(names), "objective": obj.label(), **scores(data.Y, C, P, tasks),
                     "within_task_auc_by_task": per_task_within(data.Y, P, tasks),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{rows[-1]['blocks']} ({obj.label()}): " + ", ".join(f"{f} {rows[-1][f]:.4f}" for f in FIELDS[:3]), flush=True)
    reference = scores(data.Y, C, task_means(data.Y, tasks, helds), tasks)
    return {"rows": rows, "reference": reference, "n_rows": int(len(data.Y)), "equal_costs": equal_costs(C),
            "tasks": {str(t): int((tasks == t).sum()) for t in sorted(set(tasks))}}


def markdown(doc: dict) -> str:
    tasks = list(doc["tasks"])
    lines = ["| blocks | objective | mean pooled AUC | mean within-task AUC | pairwise AUC | task-averaged accuracy (argmax) | "
             "savings at the best single's accuracy | " + " | ".join(f"within {t}" for t in tasks) + " |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in doc["rows"] + [{"blocks": "task-aware reference", "objective": "", **doc["reference"],
                             "within_task_auc_by_task": {}}]:
        pooled, within, pair, acc, sav = (r[f] for f in FIELDS)
        saving = "— (equal prices)" if doc["equal_costs"] else "not reached" if not np.isfinite(sav) else f"{100 * sav:.1f}%"
        per = " | ".join(f"{r['within_task_auc_by_task'][t]:.3f}" if t in r["within_task_auc_by_task"] else "—"
                         for t in tasks)
        lines.append(f"| {r['blocks']} | {r.get('objective', 'bce')} | {pooled:.3f} | {within:.3f} | {pair:.3f} | {100 * acc:.2f}% | {saving} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.objectives import add_cv_args, cv_parser, run_and_write

    p = cv_parser(__doc__.split("\n")[0], "a capture with the vector blocks and token_layers")
    p.add_argument("--blocks", nargs="+", required=True, help="block sets, each comma-separated (h<l>_attn allowed)")
    p.add_argument("--n-components", type=int, default=64, help="PCA components per vector block")
    p.add_argument("--token-components", type=int, default=64, help="PCA components per token (attn blocks)")
    p.add_argument("--n-queries", type=int, default=1, help="learned queries per attn block")
    p.add_argument("--position-bias", action="store_true", help="learned bias per distance from the last token")
    p.add_argument("--pool-lr-scale", type=float, default=1.0, help="the pooling's learning rate over the trunk's")
    p.add_argument("--window", type=int, default=None, help="last tokens pooled (default: the capture's)")
    p.add_argument("--objectives", nargs="+", default=["bce"], help="kind[:weight[:temperature]], each a row per "
                                                                    "block set (bench/objectives.py)")
    add_cv_args(p, "bench/results/pooling.json")
    return run_and_write(p.parse_args(argv), run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
