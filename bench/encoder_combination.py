"""Do the encoders read more together than apart? Out of fold, on train + val only.

Each encoder measured on RouterBench reads little of which queries a target gets right
*inside* a task, and ``bench/routing_headroom.py`` puts the iso-accuracy goal at a mean
within-task AUC of about 0.69-0.76. This benchmark asks whether combining what the
captures hold closes that: blocks of several captures of the same queries (two encoders,
say) and MiniLM's embedding of the prompt as the semantic baselines embed it
(:func:`training.fit.tune.minilm_block`). For each combination, the blocks are
concatenated after per-block PCA and a SharedTrunkNet ensemble is trained exactly as
``prefill-router tune`` scores a candidate (:func:`training.fit.tune.fold_predictions`:
5 group folds of train + val; the test split is never read). Reported per combination,
each the mean over folds: the mean pooled AUC over targets (tune's figure) and the mean
within-task AUC (:func:`training.evaluate.uncertainty.within_group_auc`), over all
targets and for the first one (GPT-4 on RouterBench). With ``--decision`` (accuracy routing,
RouterDC), also what the routing decision reads out of fold: the pairwise AUC
(:func:`training.metrics.pairwise_auc`) and the task-averaged accuracy of sending each held-out
query to its highest prediction, against the task-aware router (each task's best target on the
fold's training rows) and the best single target, with 95% intervals stratified by task
(:func:`training.evaluate.uncertainty.bootstrap_task_averaged`). ``--fold-by task`` holds out
whole tasks instead (leave one task out with ``--folds`` = the number of tasks): the router then
meets every held-out task unseen, and the task-aware router falls back to the best single target
of the other tasks, as it does on an unseen task.

    .venv/bin/python bench/encoder_combination.py \\
        --capture smollm2=runs/pipeline-routerbench/activations:h18_last,h21_last \\
        --capture qwen=runs/qwen-routerbench/activations:h18_last,h21_last --minilm \\
        --labels runs/pipeline-routerbench/labels --queries runs/pipeline-routerbench/queries.parquet \\
        --out bench/results/encoder_combination.json

    .venv/bin/python bench/encoder_combination.py --decision --n-components 64 \\
        --capture smollm2=runs/pipeline-routerdc/activations:h12_last,h12_mean \\
        --capture gemma=runs/pipeline-routerdc-gemma/activations:h2_last,h4_last --minilm \\
        --labels runs/pipeline-routerdc/labels --queries runs/pipeline-routerdc/queries.parquet \\
        --artifact data/routerdc/router --out bench/results/encoder_combination_routerdc.json

Rows are the queries every capture holds. Prints a markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

# The table's columns (markdown, bench/README.md), in order; what it reads of each row of the JSON.
ROW_FIELDS = ("sources", "blocks", "n_components", "mean_pooled_auc", "mean_within_task_auc",
              "first_target_within_task_auc")
TABLE_FIELDS = {"rows": ROW_FIELDS, "args": ("targets",)}  # what the table reads of the JSON
# With --decision, each row's "decision" also holds these (the decision table reads them).
DECISION_FIELDS = ("pairwise_auc", "task_averaged", "minus_task_aware", "minus_best_single")


def parse_capture(spec: str) -> tuple[str, str, list[str]]:
    """``name=uri:block,block`` -> ``(name, uri, blocks)``."""
    name, sep, rest = spec.partition("=")
    uri, sep2, blocks = rest.rpartition(":")
    if not (sep and sep2 and name and uri and blocks):
        raise ValueError(f"--capture {spec!r}: expected name=activations_uri:block[,block...]")
    return name, uri, blocks.split(",")


def align(ids: list[np.ndarray]) -> list[np.ndarray]:
    """Row indices into each of ``ids`` (query ids per capture) of the queries all of them hold,
    in the first capture's order."""
    common = set(ids[0]).intersection(*map(set, ids[1:]))
    order = [q for q in ids[0] if q in common]
    index = [{q: i for i, q in enumerate(x)} for x in ids]
    return [np.array([ix[q] for q in order], dtype=int) for ix in index]


def combinations(sources: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``sources``, singles first, in the given order."""
    return [c for k in range(1, len(sources) + 1) for c in itertools.combinations(sources, k)]


def fold_scores(Y: np.ndarray, tasks: np.ndarray, folds) -> dict[str, np.ndarray]:
    """``{'pooled', 'within'}``: ``(T,)`` AUCs per target, each the NaN-skipping mean over
    ``folds`` (pairs ``(held, P)``, ``P`` ``(len(held), T)``) of the fold's pooled AUC
    (:func:`training.metrics.masked_auc`) and within-task AUC (``tasks`` ``(n,)``)."""
    from training.metrics import within_group_auc
    from training.metrics import masked_auc

    pooled, within = [], []
    for held, P in folds:
        pooled.append(masked_auc(Y[held], P))
        within.append(within_group_auc(Y[held], P, tasks[held]))
    with np.errstate(invalid="ignore"):
        return {"pooled": np.nanmean(np.array(pooled, dtype=float), axis=0),
                "within": np.nanmean(np.array(within, dtype=float), axis=0)}


def out_of_fold(folds, shape: tuple[int, int]) -> np.ndarray:
    """``(n, T)`` predictions assembled from ``folds`` (pairs ``(held, P)``; each row held out once)."""
    P = np.full(shape, np.nan)
    for held, P_f in folds:
        P[held] = P_f
    return P


def task_aware_choice(Y: np.ndarray, tasks: np.ndarray, held_out: list[np.ndarray]) -> np.ndarray:
    """``(n,)`` the task-aware router's target per row, out of fold: for each fold's ``held`` rows,
    the target with the highest mean score over the other rows of the same task (NaN-skipping;
    the best single target of the other rows for a task they lack)."""
    import warnings

    choice = np.zeros(len(Y), dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a target never labelled in a task: nan
        for held in held_out:
            rest = np.setdiff1d(np.arange(len(Y)), held)
            overall = np.nanmean(Y[rest], axis=0)
            for g in np.unique(tasks[held]):
                same = rest[tasks[rest] == g]
                means = np.nanmean(Y[same], axis=0) if len(same) else overall
                choice[held[tasks[held] == g]] = int(np.nanargmax(np.where(np.isnan(means), -np.inf, means)))
    return choice


def decision_scores(Y: np.ndarray, tasks: np.ndarray, folds: list, n_boot: int = 1000) -> dict:
    """Out-of-fold decision figures of ``folds`` (pairs ``(held, P)``): the pairwise AUC over all rows, and the
    task-averaged accuracy of ``argmax_t P`` per row (a missing prediction ranks last) with its stratified-bootstrap
    differences from the task-aware router (:func:`task_aware_choice`) and the best single target (task-averaged,
    chosen on all rows: a slight advantage to it). ``[value, low, high]`` for the accuracies."""
    from training.evaluate.task_metrics import task_averaged_singles
    from training.evaluate.uncertainty import bootstrap_task_averaged
    from training.metrics import pairwise_auc

    P = out_of_fold(folds, Y.shape)
    rows = np.arange(len(Y))
    ours = Y[rows, np.argmax(np.nan_to_num(P, nan=-np.inf), axis=1)]
    aware = Y[rows, task_aware_choice(Y, tasks, [held for held, _ in folds])]
    single = Y[:, int(np.nanargmax(task_averaged_singles(Y, tasks)))]
    boot = bootstrap_task_averaged(ours, {"task-aware": aware, "best single": single}, tasks, n_boot=n_boot)
    return {"pairwise_auc": pairwise_auc(Y, P), "task_averaged": boot["accuracy"],
            "minus_task_aware": boot["minus"]["task-aware"], "minus_best_single": boot["minus"]["best single"]}


def load(args: argparse.Namespace):
    """``(sources, Y, tasks, groups, targets)`` over train + val rows that every capture holds;
    ``sources``: ``{name: {block: (n, d)}}``."""
    from training.dataset import load_routing_data
    from training.cv import fold_groups
    from training.fit.tune import minilm_block
    from training.semantic_text import read_queries

    specs = [parse_capture(s) for s in args.capture]
    datas = [load_routing_data(uri, args.labels, args.targets, blocks).where("train", "val") for _, uri, blocks in specs]
    rows = align([np.asarray(d.query_ids) for d in datas])
    datas = [d.subset(r) for d, r in zip(datas, rows)]
    sources = {name: d.blocks for (name, _, _), d in zip(specs, datas)}
    base = datas[0]
    if args.minilm:
        sources["minilm"] = {"minilm": minilm_block(base, args.queries)}
    tasks = np.array(read_queries(args.queries, base.query_ids)["task"], dtype=object)
    groups = tasks if args.fold_by == "task" else fold_groups(base, args.queries)
    return sources, base.Y, tasks, groups, base.targets


def run(args: argparse.Namespace) -> list[dict]:
    from rich.progress import track

    from training.fit.tune import fold_predictions
    from training.loop import TrunkConfig

    sources, Y, tasks, groups, targets = load(args)
    trunk = TrunkConfig(**({"max_epochs": args.max_epochs} if args.max_epochs else {}))
    out = []
    for combo in track(combinations(list(sources)), description="cross-validating"):
        blocks = {f"{s}:{b}": x for s in combo for b, x in sources[s].items()}
        k = args.minilm_components if combo == ("minilm",) else args.n_components
        folds = list(fold_predictions(blocks, Y, groups, k, trunk, args.folds, args.seeds, seed=args.seed))
        auc = fold_scores(Y, tasks, folds)
        decision = {"decision": decision_scores(Y, tasks, folds)} if args.decision else {}
        out.append({"sources": list(combo), "blocks": list(blocks), "n_components": k, "n_rows": int(len(Y)),
                    "mean_pooled_auc": float(np.nanmean(auc["pooled"])),
                    "mean_within_task_auc": float(np.nanmean(auc["within"])),
                    "first_target_within_task_auc": float(auc["within"][0]),
                    "pooled": dict(zip(targets, map(float, auc["pooled"]))),
                    "within": dict(zip(targets, map(float, auc["within"]))), **decision})
    return out


def markdown(rows: list[dict], first: str) -> str:
    lines = ["| sources | blocks | PCA per block | mean pooled AUC | mean within-task AUC | "
             f"{first} within-task |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        sources, blocks, k, pooled, within, first_within = (r[f] for f in ROW_FIELDS)
        lines.append(f"| {' + '.join(sources)} | {', '.join(blocks)} | {k} | {pooled:.3f} | {within:.3f} | "
                     f"{first_within:.3f} |")
    return "\n".join(lines) + (("\n\n" + decision_markdown(rows)) if all("decision" in r for r in rows) else "")


def decision_markdown(rows: list[dict]) -> str:
    """The ``--decision`` table: pairwise AUC and task-averaged accuracy (points) per combination."""
    def cell(v: list[float], signed: bool = False) -> str:
        f = "{:+.2f}" if signed else "{:.2f}"
        return f"{f.format(100 * v[0])} [{f.format(100 * v[1])}, {f.format(100 * v[2])}]"

    lines = ["| sources | pairwise AUC | task-averaged accuracy | minus task-aware | minus best single |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        d = r["decision"]
        lines.append(f"| {' + '.join(r['sources'])} | {d['pairwise_auc']:.4f} | {cell(d['task_averaged'])} | "
                     f"{cell(d['minus_task_aware'], True)} | {cell(d['minus_best_single'], True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from shared.artifact import load_artifact

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capture", action="append", required=True, help="name=activations_uri:block[,block...]")
    p.add_argument("--minilm", action="store_true", help="also MiniLM's embedding, as the semantic baselines embed it")
    p.add_argument("--decision", action="store_true",
                   help="also the routing decision out of fold: pairwise AUC, task-averaged accuracy vs task-aware")
    p.add_argument("--fold-by", choices=("group", "task"), default="group",
                   help="group: tune's folds; task: each fold holds out whole tasks (--folds = the number of tasks: "
                        "leave one task out), so every held-out query's task is one the router never saw")
    p.add_argument("--labels", required=True)
    p.add_argument("--queries", required=True, help="query table: task, group_id, and the texts for MiniLM")
    p.add_argument("--artifact", default="data/routerbench/router", help="whose targets, in its order (GPT-4 first)")
    p.add_argument("--n-components", type=int, default=256, help="PCA per encoder block (the shipped router: 256)")
    p.add_argument("--minilm-components", type=int, default=128, help="PCA of MiniLM alone (tune's default)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per member (default: TrunkConfig's, as tune)")
    p.add_argument("--out", default="bench/results/encoder_combination.json")
    args = p.parse_args(argv)
    args.targets = load_artifact(args.artifact).target_names
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(markdown(rows, args.targets[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
