"""A lightly adapted encoder against frozen pooling, out of fold on train + val only (issue 34, part 2).

Rows, all on the same group folds of train + val that ``prefill-router tune`` uses (GroupKFold over
``group_id``; in each fold 85% of the training folds train and 15% early-stop; the test split is never read):

- ``frozen``: the ``--frozen`` blocks (default ``h{L}_last,h{L}_mean``, pooled over the whole prompt) through
  :func:`training.fit.tune.fold_predictions`, exactly as tune scores a candidate (``--seeds`` members);
- ``untrained blocks``: the adapter's blocks as pretrained, over the last ``--window`` layer-``L`` states, under
  a trunk trained on their features (the adapt stage's warm start alone: what the window and the blocks give
  before any fine-tuning);
- one row per ``--objectives`` entry: the blocks fine-tuned end to end with a trunk
  (:func:`training.adapt.train.fit_adapted`, one model per fold), early-stopped on the same 15%.

Scored as :mod:`bench.objectives` scores its rows (mean pooled AUC, mean within-task AUC, pairwise AUC,
task-averaged accuracy of the argmax, savings at the best single target's accuracy), plus the within-task and
pairwise AUC per task and the seconds each adaptation took. ``--max-folds`` runs only the first folds (every
row is then scored on the same held-out rows).

    .venv/bin/python bench/adapt.py --activations runs/routerdc/tokens --labels runs/routerdc/labels \\
        --queries runs/routerdc/queries.parquet --artifact data/routerdc/router --from-layer 12 --n-blocks 1 \\
        --window 128 --objectives bce sample_llm:1:0.1 --out bench/results/adapt_routerdc.json

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
TABLE_FIELDS = {"rows": ("row",) + FIELDS + ("within_task_auc_by_task", "pairwise_auc_by_task", "seconds"),
                "reference": FIELDS, "equal_costs": (), "tasks": (), "n_scored": ()}


def per_task(Y: np.ndarray, P: np.ndarray, tasks: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """``(within-task AUC, pairwise AUC)`` per task: the mean over targets of the AUC on the task's rows, and
    the pairwise AUC on them."""
    from training.metrics import masked_auc, pairwise_auc

    within, pair = {}, {}
    for t in sorted(set(tasks)):
        rows = tasks == t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            within[str(t)] = float(np.nanmean(masked_auc(Y[rows], P[rows])))
        pair[str(t)] = float(pairwise_auc(Y[rows], P[rows]))
    return within, pair


def adapt_fold(encoder: str, spec, windows, frozen_raw, tr, es, held, n_components: int, cfg, label: str,
               threads: int | None = None) -> tuple[np.ndarray, float, float, float]:
    """One adaptation: ``(P of the held rows, seconds, start val loss, best val loss)`` (a Ray task with ``--workers``)."""
    import torch

    from shared.models import load_causal_lm
    from shared.registry import load_registry
    from training.adapt.choose import adapt_fold as one_fold

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    lm = load_causal_lm(load_registry().encoder(encoder), device="cpu")
    P, result = one_fold(lm.model, spec, windows, frozen_raw, tr, es, held, n_components, cfg, label)
    return P, round(time.perf_counter() - start, 1), result.start_val_loss, result.val_loss


def adapted_rows(args, data, windows, frozen_raw, groups, jobs) -> list[tuple[str, np.ndarray, list[float]]]:
    """``[(label, out-of-fold P (n, T), seconds per fold)]`` of each adapted job ``(label, AdaptTrainConfig)``;
    with ``--workers`` > 1 every (job, fold) is a Ray task of one CPU (one torch thread)."""
    from shared.adapter import AdapterSpec
    from training.cv import split_folds

    spec = AdapterSpec(from_layer=args.from_layer, n_blocks=args.n_blocks, window=windows.mask.shape[1],
                       poolings=["last", "mean"])
    work = [(label, cfg, k, split) for label, cfg in jobs
            for k, split in enumerate(split_folds(len(data.Y), groups, args.folds, args.seed)) if k < args.max_folds]
    if args.workers > 1:
        import ray

        from shared.ray_boot import ensure_ray

        started = ensure_ray("local", num_cpus=args.workers, log_to_driver=True)
        try:
            task = ray.remote(num_cpus=1)(adapt_fold)
            w_ref, f_ref = ray.put(windows), ray.put(frozen_raw)
            results = ray.get([task.remote(args.encoder, spec, w_ref, f_ref, *split, args.n_components, cfg,
                                           f"{label} fold {k + 1}", 1) for label, cfg, k, split in work])
        finally:
            if started:
                ray.shutdown()
    else:
        results = [adapt_fold(args.encoder, spec, windows, frozen_raw, *split, args.n_components, cfg,
                              f"{label} fold {k + 1}") for label, cfg, k, split in work]
    out: dict[str, tuple[np.ndarray, list[float]]] = {}
    for (label, _, k, split), (P, seconds, first, best) in zip(work, results):
        logging.info("%s fold %d: %.0f s, val loss %.5f -> %.5f", label, k + 1, seconds, first, best)
        Pl, secs = out.setdefault(label, (np.full(data.Y.shape, np.nan), []))
        Pl[split[2]] = P
        secs.append(seconds)
    return [(label, *out[label]) for label, _ in jobs]


def run(args: argparse.Namespace) -> dict:
    from bench.objectives import parse_objective, scores, task_means
    from training.adapt.model import AdaptInputs
    from training.adapt.train import AdaptTrainConfig
    from training.dataset import load_routing_data
    from training.evaluate.routing_metrics import equal_costs
    from training.cv import fold_groups
    from training.fit.tune import fold_predictions
    from training.loop import TrunkConfig
    from training.semantic_text import read_queries
    from training.token_states import read_token_windows

    L = args.from_layer
    frozen = args.frozen or [f"h{L}_last", f"h{L}_mean"]
    data = load_routing_data(args.activations, args.labels, args.targets, frozen).where("train", "val")
    tasks = np.array(read_queries(args.queries, data.query_ids)["task"], dtype=object)
    groups, C = fold_groups(data, args.queries), np.nan_to_num(data.cost)
    _, states, mask = read_token_windows(args.activations, L, args.window, list(data.query_ids))
    windows = AdaptInputs(states, mask, np.asarray(data.n_tokens, np.int64), np.zeros((len(mask), 0)), data.Y)
    logging.info("%d rows, window %d (%.1f real states per row)", len(mask), mask.shape[1], mask.sum(1).mean())
    beside = {b: data.blocks[b] for b in frozen} if args.with_frozen else {}
    base = dict(batch_size=args.batch_size, max_epochs=args.epochs, patience=args.patience, lr=args.lr,
                block_lr=args.block_lr, evals_per_epoch=args.evals_per_epoch, seed=args.seed,
                warm_epochs=args.max_epochs or 150)
    jobs = [("untrained blocks", AdaptTrainConfig(**{**base, "max_epochs": 0}))] if args.untrained else []
    jobs += [(f"adapted, {parse_objective(o).label()}", AdaptTrainConfig(**base, objective=parse_objective(o)))
             for o in args.objectives]
    rows, helds, P0, start = [], [], np.full(data.Y.shape, np.nan), time.perf_counter()
    trunk = TrunkConfig(**({"max_epochs": args.max_epochs} if args.max_epochs else {}))
    for k, (held, Ph) in enumerate(fold_predictions({b: data.blocks[b] for b in frozen}, data.Y, groups,
                                                    args.n_components, trunk, args.folds, args.seeds, seed=args.seed)):
        if k >= args.max_folds:
            break
        P0[held] = Ph
        helds.append(held)
    done = np.concatenate(helds)
    results = [("frozen " + "+".join(frozen), P0, [round(time.perf_counter() - start, 1)])]
    results += adapted_rows(args, data, windows, beside, groups, jobs)
    Y, Cd, td = data.Y[done], C[done], tasks[done]
    for label, P, seconds in results:
        within, pair = per_task(Y, P[done], td)
        rows.append({"row": label + (" + frozen" if beside and label != results[0][0] else ""),
                     **scores(Y, Cd, P[done], td), "within_task_auc_by_task": within, "pairwise_auc_by_task": pair,
                     "seconds": seconds})
        print(f"{rows[-1]['row']}: " + ", ".join(f"{f} {rows[-1][f]:.4f}" for f in FIELDS[:3]), flush=True)
    reference = scores(Y, Cd, task_means(data.Y, tasks, helds)[done], td)
    return {"rows": rows, "reference": reference, "n_rows": int(len(data.Y)), "n_scored": int(len(done)),
            "equal_costs": equal_costs(C), "tasks": {str(t): int((td == t).sum()) for t in sorted(set(td))}}


def markdown(doc: dict) -> str:
    tasks = list(doc["tasks"])
    lines = ["| row | mean pooled AUC | mean within-task AUC | pairwise AUC | task-averaged accuracy (argmax) | "
             "seconds per fold | " + " | ".join(f"within / pairwise {t}" for t in tasks) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in doc["rows"] + [{"row": "task-aware reference", **doc["reference"], "within_task_auc_by_task": {},
                             "pairwise_auc_by_task": {}, "seconds": []}]:
        pooled, within, pair, acc = (r[f] for f in FIELDS[:4])
        per = " | ".join(f"{r['within_task_auc_by_task'][t]:.3f} / {r['pairwise_auc_by_task'][t]:.3f}"
                         if t in r["within_task_auc_by_task"] else "—" for t in tasks)
        secs = f"{np.mean(r['seconds']):.0f}" if r["seconds"] else "—"
        lines.append(f"| {r['row']} | {pooled:.3f} | {within:.3f} | {pair:.3f} | {100 * acc:.2f}% | {secs} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.objectives import add_cv_args, cv_parser, run_and_write

    p = cv_parser(__doc__.split("\n")[0], "a capture with the frozen blocks and token_layers=[L]")
    p.add_argument("--encoder", default="smollm2-135m", help="the capture's encoder (registry name)")
    p.add_argument("--from-layer", type=int, default=12)
    p.add_argument("--n-blocks", type=int, default=1)
    p.add_argument("--window", type=int, default=None, help="last tokens the blocks read (default: the capture's)")
    p.add_argument("--frozen", nargs="*", default=None, help="frozen blocks of the baseline (default h<L>_last h<L>_mean)")
    p.add_argument("--with-frozen", action="store_true", help="feed the frozen blocks beside the adapted ones")
    p.add_argument("--objectives", nargs="*", default=["bce", "sample_llm:1:0.1"], help="kind[:weight[:temperature]]")
    p.add_argument("--untrained", action="store_true", help="also score the untrained blocks (warm start only)")
    p.add_argument("--n-components", type=int, default=64, help="PCA components per block")
    p.add_argument("--max-folds", type=int, default=99, help="run only the first folds (all rows scored on them)")
    p.add_argument("--epochs", type=int, default=4, help="end-to-end epochs at most")
    p.add_argument("--evals-per-epoch", type=int, default=2)
    p.add_argument("--patience", type=int, default=2, help="evaluations without improvement before stopping")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="trunk learning rate (end to end)")
    p.add_argument("--block-lr", type=float, default=3e-5, help="adapted blocks' learning rate")
    p.add_argument("--workers", type=int, default=1, help="adaptations in parallel (Ray tasks of one CPU each)")
    add_cv_args(p, "bench/results/adapt.json")
    return run_and_write(p.parse_args(argv), run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
