"""Train for the decision: the training objectives side by side, out of fold on train + val only.

For each block set and each objective (:mod:`training.objectives`: the masked BCE, or it plus a
pairwise, listwise or residual ranking term), a SharedTrunkNet ensemble is cross-validated
exactly as ``prefill-router tune`` scores a candidate (:func:`training.fit.tune.fold_predictions`:
group folds of train + val; the test split is never read), and its out-of-fold predictions are
scored on what the per-target AUC hides: the pairwise AUC (:func:`training.metrics.pairwise_auc`,
is the better of two targets ranked higher for a query), beside the mean pooled and within-task
AUC. The routing headline is read off the same out-of-fold predictions: the task-averaged
accuracy of sending each query to its highest P(correct) (RouterDC's metric; with equal prices
that is the tolerance policy at 0), and the largest cost saving of the tolerance sweep at the
best single target's accuracy (RouterBench's). The task-aware reference (each task's best target
on the training folds) is scored beside them.

    .venv/bin/python bench/objectives.py --activations runs/pipeline-routerdc/activations \\
        --labels runs/pipeline-routerdc/labels --queries runs/pipeline-routerdc/queries.parquet \\
        --artifact data/routerdc/router --blocks h12_last h12_mean h12_last,h12_mean --n-components 64 \\
        --objectives bce pairwise:1 pairwise:5 listwise:5:0.05 residual:5 --out bench/results/objectives_routerdc.json

Prints a markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np

ROW_FIELDS = ("blocks", "objective", "mean_pooled_auc", "mean_within_task_auc", "pairwise_auc",
              "task_averaged_accuracy", "iso_accuracy_savings")
TABLE_FIELDS = {"rows": ROW_FIELDS, "args": ("targets",), "reference": ROW_FIELDS[2:], "equal_costs": ()}


def parse_objective(spec: str):
    """``kind[:weight[:temperature]]`` -> :class:`training.objectives.ObjectiveConfig`."""
    from training.objectives import ObjectiveConfig

    kind, *rest = spec.split(":")
    keys = ("weight", "temperature")[:len(rest)]
    return ObjectiveConfig(kind=kind, **{k: float(v) for k, v in zip(keys, rest)})


def out_of_fold(blocks, Y, groups, k, trunk, args) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(P, helds)``: ``(n, T)`` out-of-fold predictions and each fold's held-out rows."""
    from training.fit.tune import fold_predictions

    P, helds = np.full(Y.shape, np.nan), []
    for held, Ph in fold_predictions(blocks, Y, groups, k, trunk, args.folds, args.seeds, seed=args.seed):
        P[held] = Ph
        helds.append(held)
    return P, helds


def task_means(Y: np.ndarray, tasks: np.ndarray, helds: list[np.ndarray]) -> np.ndarray:
    """``(n, T)`` the task-aware reference's scores: each held-out row gets its task's mean label
    per target on the other folds (NaN-skipping)."""
    out = np.full(Y.shape, np.nan)
    for held in helds:
        fit = np.setdiff1d(np.arange(len(Y)), held)
        for t in np.unique(tasks[held]):
            rows = held[tasks[held] == t]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a target never labelled on the task: nan
                out[rows] = np.nanmean(Y[fit][tasks[fit] == t], axis=0)
    return out


def scores(Y, C, P, tasks) -> dict[str, float]:
    """The row's figures from out-of-fold ``P`` ``(n, T)`` (see the module docstring)."""
    from shared.routing import tolerance_sweep
    from training.evaluate.report_metrics import iso_accuracy_savings
    from training.evaluate.routing_metrics import best_single
    from training.evaluate.task_metrics import one_hot, task_averaged
    from training.metrics import masked_auc, pairwise_auc, within_group_auc

    choice = np.argmax(np.where(np.isnan(Y), -np.inf, P), axis=1)
    j, acc, cost = best_single(Y, C)
    sweep = tolerance_sweep(P, Y, C)
    with np.errstate(invalid="ignore"):
        return {"mean_pooled_auc": float(np.nanmean(masked_auc(Y, P))),
                "mean_within_task_auc": float(np.nanmean(within_group_auc(Y, P, tasks))),
                "pairwise_auc": pairwise_auc(Y, P),
                "task_averaged_accuracy": task_averaged(Y, one_hot(choice, Y.shape[1]), tasks),
                "iso_accuracy_savings": iso_accuracy_savings(sweep.cost, sweep.accuracy, acc, cost)}


def run(args: argparse.Namespace) -> dict:
    from shared.progress import Progress
    from training.dataset import load_routing_data
    from training.evaluate.routing_metrics import equal_costs
    from training.cv import fold_groups
    from training.loop import TrunkConfig
    from training.semantic_text import read_queries

    sets = [b.split(",") for b in args.blocks]
    data = load_routing_data(args.activations, args.labels, args.targets, sorted({b for s in sets for b in s}))
    data = data.where("train", "val")
    tasks = np.array(read_queries(args.queries, data.query_ids)["task"], dtype=object)
    groups, C = fold_groups(data, args.queries), np.nan_to_num(data.cost)
    rows, helds = [], None
    jobs = [(s, parse_objective(o)) for s in sets for o in args.objectives]
    with Progress(len(jobs), "objectives: cross-validating", "candidates") as progress:
        for names, obj in jobs:
            trunk = TrunkConfig(objective=obj, **({"max_epochs": args.max_epochs} if args.max_epochs else {}))
            P, helds = out_of_fold({b: data.blocks[b] for b in names}, data.Y, groups, args.n_components, trunk,
                                   args)
            rows.append({"blocks": "+".join(names), "objective": obj.label(), **scores(data.Y, C, P, tasks)})
            progress.update(1, detail=f"{rows[-1]['blocks']} / {rows[-1]['objective']}")
    reference = scores(data.Y, C, task_means(data.Y, tasks, helds), tasks)
    return {"rows": rows, "reference": reference, "n_rows": int(len(data.Y)), "equal_costs": equal_costs(C)}


def markdown(doc: dict) -> str:
    lines = ["| blocks | objective | mean pooled AUC | mean within-task AUC | pairwise AUC | task-averaged accuracy "
             "(argmax) | savings at the best single's accuracy |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"] + [{"blocks": "task-aware reference", "objective": "—", **doc["reference"]}]:
        blocks, obj, pooled, within, pair, acc, sav = (r[f] for f in ROW_FIELDS)
        saving = "— (equal prices)" if doc["equal_costs"] else "not reached" if not np.isfinite(sav) else f"{100 * sav:.1f}%"
        lines.append(f"| {blocks} | {obj} | {pooled:.3f} | {within:.3f} | {pair:.3f} | {100 * acc:.2f}% | {saving} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cv_parser(__doc__.split("\n")[0], "a capture with the blocks")
    p.add_argument("--blocks", nargs="+", required=True, help="block sets, each comma-separated")
    p.add_argument("--objectives", nargs="+", default=["bce", "pairwise:1", "listwise:5:0.05", "residual:5"],
                   help="kind[:weight[:temperature]] each")
    p.add_argument("--n-components", type=int, default=64, help="PCA components per block")
    add_cv_args(p, "bench/results/objectives.json")
    return run_and_write(p.parse_args(argv), run, markdown)


def cv_parser(description: str, activations_help: str) -> argparse.ArgumentParser:
    """The parser of a cross-validated bench (logging set up): the capture, labels, query table and the
    artifact whose targets it scores; the bench adds its own flags and :func:`add_cv_args`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--activations", required=True, help=activations_help)
    p.add_argument("--labels", required=True)
    p.add_argument("--queries", required=True, help="query table: task and group_id")
    p.add_argument("--artifact", required=True, help="whose targets, in its order")
    return p


def add_cv_args(p: argparse.ArgumentParser, out: str) -> None:
    """The flags of a cross-validated bench scored as tune scores a candidate, and its JSON's path."""
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per member (default: TrunkConfig's, as tune)")
    p.add_argument("--out", default=out)


def run_and_write(args: argparse.Namespace, run, markdown) -> int:
    """Run the bench on the artifact's targets (in its order), write ``args.out`` (JSON), print its table."""
    from shared.artifact import load_artifact

    args.targets = load_artifact(args.artifact).target_names
    doc = {"args": vars(args), **run(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
