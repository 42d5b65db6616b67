"""What the novelty gate (shared.novelty) does to routing, in distribution and on tasks the router never saw.
Out of fold, on train + val only.

Two fold schemes over the same rows: tune's group folds (every held-out query's task was seen in training)
and whole tasks held out (``--folds`` = the number of tasks: leave one task out, so every held-out query's task
is unseen). In each fold a SharedTrunkNet ensemble is trained exactly as ``prefill-router tune`` scores a
candidate (:func:`training.fit.tune.fold_predictions`), the gate is calibrated as ``evaluate`` calibrates it
(:func:`shared.novelty.calibrate`: variances on the fold's training rows, the threshold at each ``--quantiles``
of its early-stopping rows' novelty, the prior each target's task-averaged mean score on the fold's other rows),
and the held-out rows are routed by ``argmax`` of the prediction, the gate's prior on novel ones. Reported per
scheme and quantile: the share of held-out queries the gate took (per task too) and the task-averaged accuracy
without and with the gate, against the task-aware router (each task's best target on the other rows; for an
unseen task the best single target of the other rows), with 95% intervals stratified by task
(:func:`bench.encoder_combination.decision_scores`).

    .venv/bin/python bench/novelty_gate.py --activations runs/pipeline-routerdc/activations \\
        --blocks h12_last,h12_mean --labels runs/pipeline-routerdc/labels \\
        --queries runs/pipeline-routerdc/queries.parquet --artifact data/routerdc/router \\
        --out bench/results/novelty_gate_routerdc.json
    .venv/bin/python bench/novelty_gate.py --activations runs/pipeline-routerdc/activations --attn-layers 12 \\
        --labels runs/pipeline-routerdc/labels --queries runs/pipeline-routerdc/queries.parquet \\
        --artifact data/routerdc/router --out bench/results/novelty_gate_routerdc_attn.json

``--attn-layers``: attention-pooled blocks (the shipped RouterDC router reads ``h12_attn`` alone), their
novelty read from the reduced token windows as the router head reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("folds", "quantile", "novel_share", "task_averaged", "gated_task_averaged", "gated_minus_task_aware",
              "minus_task_aware")
TABLE_FIELDS = {"rows": ROW_FIELDS + ("novel_share_by_task",), "args": ("blocks", "attn_layers")}


def reduced_inputs(blocks: dict[str, np.ndarray], tokens: dict, tr: np.ndarray,
                   args: argparse.Namespace) -> dict[str, np.ndarray]:
    """What the fold's network reads, per block, with its transforms fitted on ``tr`` as
    :func:`training.fit.tune.fold_predictions` fits them: vector blocks ``(n, k)``, attn blocks' reduced windows
    ``(n, W, k)`` with NaN at padded tokens (as the Encoder sends them)."""
    from shared.novelty import reduced_blocks
    from shared.trunk import FeatureTransform
    from training.pooled import PoolConfig, fit_inputs

    if not tokens:
        ft = FeatureTransform.fit({b: x[tr] for b, x in blocks.items()}, n_components=args.n_components,
                                  seed=args.seed)
        return reduced_blocks(ft, blocks)
    inputs = fit_inputs(blocks, tokens, tr, args.n_components, PoolConfig(window=args.window), args.seed)
    out = {"dense": inputs[0]} if inputs[0].shape[1] else {}
    for name, z, mask in zip(tokens, inputs[1::2], inputs[2::2]):
        out[name] = np.where(mask[..., None], z, np.nan)
    return out


def gated_folds(blocks: dict[str, np.ndarray], tokens: dict, Y: np.ndarray, tasks: np.ndarray, folds: list,
                groups: np.ndarray, args: argparse.Namespace, quantile: float) -> tuple[list, np.ndarray]:
    """``(folds with P gated, (n,) novel)``: each fold's predictions with the gate calibrated on its own rows."""
    from shared.novelty import apply_gate, calibrate, novelty
    from training.cv import split_folds
    from training.evaluate.novelty_gate import prior_scores

    novel, out = np.zeros(len(Y), dtype=bool), []
    splits = split_folds(len(Y), groups, args.folds, args.seed)
    for (tr, es, held), (held_p, P) in zip(splits, folds):
        if not np.array_equal(held, held_p):
            raise RuntimeError("the gate's folds are not the predictions' folds")
        reduced = reduced_inputs(blocks, tokens, tr, args)
        rest = np.concatenate([tr, es])
        prior, how = prior_scores(Y[rest], tasks[rest])
        gate = calibrate({b: z[tr] for b, z in reduced.items()}, {b: z[es] for b, z in reduced.items()}, prior, how,
                         quantile)
        gated, flags = apply_gate(P, novelty({b: z[held] for b, z in reduced.items()}, gate.variances), gate)
        novel[held] = flags
        out.append((held, gated))
    return out, novel


def run(args: argparse.Namespace) -> list[dict]:
    from rich.progress import track

    from bench.encoder_combination import decision_scores
    from training.cv import fold_groups
    from training.dataset import load_routing_data
    from training.fit.tune import fold_predictions
    from training.loop import TrunkConfig
    from training.pooled import PoolConfig
    from training.semantic_text import read_queries
    from training.token_states import read_token_windows

    data = load_routing_data(args.activations, args.labels, args.targets, args.blocks).where("train", "val")
    tasks = np.array(read_queries(args.queries, data.query_ids)["task"], dtype=object)
    tokens = {f"h{layer}_attn": read_token_windows(args.activations, layer, args.window, list(data.query_ids))[1:]
              for layer in args.attn_layers}
    trunk = TrunkConfig(**({"max_epochs": args.max_epochs} if args.max_epochs else {}))
    rows = []
    for scheme in track(("group", "task"), description="cross-validating"):
        groups = tasks if scheme == "task" else fold_groups(data, args.queries)
        folds = list(fold_predictions(data.blocks, data.Y, groups, args.n_components, trunk, args.folds, args.seeds,
                                      seed=args.seed, tokens=tokens or None, pool=PoolConfig(window=args.window)))
        plain = decision_scores(data.Y, tasks, folds, n_boot=args.n_boot)
        for q in args.quantiles:
            gated, novel = gated_folds(data.blocks, tokens, data.Y, tasks, folds, groups, args, q)
            scores = decision_scores(data.Y, tasks, gated, n_boot=args.n_boot)
            rows.append({"folds": scheme, "quantile": q, "n_rows": len(tasks), "novel_share": float(novel.mean()),
                         "novel_share_by_task": {str(g): float(novel[tasks == g].mean()) for g in np.unique(tasks)},
                         "task_averaged": plain["task_averaged"], "minus_task_aware": plain["minus_task_aware"],
                         "gated_task_averaged": scores["task_averaged"],
                         "gated_minus_task_aware": scores["minus_task_aware"],
                         "gated_minus_best_single": scores["minus_best_single"]})
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(v: list[float], signed: bool = False) -> str:
        f = "{:+.2f}" if signed else "{:.2f}"
        return f"{f.format(100 * v[0])} [{f.format(100 * v[1])}, {f.format(100 * v[2])}]"

    tasks = sorted(rows[0]["novel_share_by_task"]) if rows else []
    lines = ["| folds | quantile | queries the gate took | " + " | ".join(tasks) + " | task-averaged, router | "
             "with the gate | router minus task-aware | with the gate minus task-aware |",
             "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|"]
    for r in rows:
        per = " | ".join(f"{r['novel_share_by_task'][t]:.0%}" for t in tasks)
        lines.append(f"| {r['folds']} | {r['quantile']} | {r['novel_share']:.1%} | {per} | "
                     f"{cell(r['task_averaged'])} | {cell(r['gated_task_averaged'])} | "
                     f"{cell(r['minus_task_aware'], True)} | {cell(r['gated_minus_task_aware'], True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from shared.artifact import load_artifact

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--activations", required=True)
    p.add_argument("--blocks", default="", help="comma-separated vector blocks, e.g. h12_last,h12_mean")
    p.add_argument("--attn-layers", type=int, nargs="*", default=[], help="h<layer>_attn blocks over these token "
                   "layers (the capture kept their token states), e.g. 12 as the shipped RouterDC router")
    p.add_argument("--window", type=int, default=None, help="attn blocks' window (default: the capture's)")
    p.add_argument("--labels", required=True)
    p.add_argument("--queries", required=True, help="query table: task and group_id")
    p.add_argument("--artifact", default="data/routerdc/router", help="whose targets, in its order")
    p.add_argument("--n-components", type=int, default=64)
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    p.add_argument("--folds", type=int, default=5, help="5: leave one of RouterDC's five tasks out")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per member (default: as tune)")
    p.add_argument("--out", default="bench/results/novelty_gate_routerdc.json")
    args = p.parse_args(argv)
    args.blocks = [b for b in args.blocks.split(",") if b]
    if not args.blocks and not args.attn_layers:
        p.error("give --blocks, --attn-layers or both")
    args.targets = load_artifact(args.artifact).target_names
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
