"""Capture throughput: the Ray Data capture pipeline against a naive single-process loop.

    .venv/bin/python bench/capture_throughput.py --n 500
    .venv/bin/python bench/capture_throughput.py --routerbench ../shared/data/routerbench --n 200

Over the same ``n`` queries (a seeded sample of the benchmark table built from
``configs/data.yaml``, or with ``--routerbench DIR`` of the RouterBench prompts in
``DIR/*.csv``, kept in file order, i.e. grouped by task), in one run:

(a) the capture pipeline (``training.capture.run.run_capture`` with ``--config``, default
    ``configs/capture.yaml``) on a local Ray cluster: truncated prefill, length buckets,
    prefix sharing (``min_shared_prefix``), an actor pool. Its time is end to end
    *including* actor start-up and model loads; only ``ray.init`` is outside the clock
    (a cluster is normally already running);
(a0) the same pipeline with prefix sharing off (``min_shared_prefix=0``);
(b) a naive loop: one process, batch 1, the full model (all blocks and ``lm_head``) with
    ``output_hidden_states=True``, pooling the same layers; the model load is outside
    the clock.

Reports prompt tokens/s of each, their ratio to (b), the share of prompt tokens each
computed, and achieved GFLOP/s (``2 * matmul params * tokens computed / time``; attention
scores ignored) against a plain torch fp32 matmul measured in the same run. Writes JSON
(``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` fp32 GFLOP/s of one ``size x size`` matmul with torch's default threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def sample_queries(n: int, seed: int, path: Path) -> int:
    """A seeded sample of ``n`` rows of the benchmark table (all sources mixed), written to ``path``."""
    import numpy as np
    import pyarrow.parquet as pq

    from shared.config import load_config
    from training.data.build import DataConfig, build_queries

    table, _ = build_queries(load_config(DataConfig, ROOT / "configs" / "data.yaml"))
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    pq.write_table(table.take(rows), path)
    return len(rows)


def routerbench_queries(folder: Path, n: int | None, seed: int, path: Path) -> int:
    """The RouterBench prompts of ``folder/*.csv`` (column ``prompt``, a Python-literal list of one
    string) as a query table at ``path``: files in name order, rows in file order; ``n``: a seeded
    sample that keeps that order. Nothing of it is written outside ``path`` (a temp dir)."""
    import ast
    import csv

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv.field_size_limit(1 << 30)
    prompts, ids = [], []
    for file in sorted(folder.glob("*.csv")):
        with file.open(newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                value = ast.literal_eval(row["prompt"])
                prompts.append(value[0] if isinstance(value, list) else str(value))
                ids.append(f"{file.stem}-{i}")
    if not prompts:
        raise SystemExit(f"no RouterBench prompts under {folder}")
    rows = np.arange(len(prompts))
    if n is not None and n < len(prompts):
        rows = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
    pq.write_table(pa.table({
        "query_id": [ids[i] for i in rows], "split": ["train"] * len(rows),
        "messages": [[{"role": "user", "content": prompts[i]}] for i in rows]}), path)
    return len(rows)


def block_params(model, depth: int) -> int:
    return sum(p.numel() for layer in list(model.model.layers)[:depth] for p in layer.parameters())


def run_pipeline(cfg) -> dict:
    import ray

    from shared.ray_boot import ensure_ray
    from training.capture.run import run_capture

    started = ensure_ray(log_to_driver=False)  # a Ray this process runs already (the smoke test's) is kept
    try:
        t0 = time.perf_counter()
        summary = run_capture(cfg)
        seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    return {"seconds": seconds, "tokens": summary["prompt_tokens"], "rows": summary["captured_rows"],
            "computed": summary["computed_tokens"], "min_shared_prefix": summary["min_shared_prefix"],
            "padding_waste": summary["padding_waste"], "truncated": summary["truncated_prompts"]}


def run_naive(cfg, queries: Path) -> dict:
    """Batch 1, full depth, ``output_hidden_states=True``; pools the same layers as the pipeline."""
    import pyarrow.parquet as pq
    import torch

    from shared.models import load_causal_lm
    from shared.registry import load_registry
    from shared.encoder import resolve_layers
    from shared.features import pool

    lm = load_causal_lm(load_registry(cfg.registry).get(cfg.encoder), device="cpu")
    layers = resolve_layers(cfg.layers, lm.num_layers)
    messages = pq.read_table(queries).column("messages").to_pylist()
    tokens = 0
    t0 = time.perf_counter()
    for conv in messages:
        text = lm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][-cfg.max_tokens:]
        tokens += len(ids)
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            out = lm.model(input_ids=input_ids, output_hidden_states=True)
            mask = torch.ones_like(input_ids)
            [pool(out.hidden_states[i], mask, p).numpy() for i in layers for p in cfg.poolings]
    seconds = time.perf_counter() - t0
    lm_head = lm.model.get_output_embeddings().weight.numel()
    return {"seconds": seconds, "tokens": tokens, "computed": tokens, "rows": len(messages),
            "torch_threads": torch.get_num_threads(),
            "matmul_params": block_params(lm.model, lm.num_layers) + lm_head,
            "pipeline_matmul_params": block_params(lm.model, max(layers)), "num_layers": lm.num_layers,
            "layers": layers}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


PATHS = (("shared", "(a) Ray Data capture pipeline, prefix sharing on"),
         ("off", "(a0) Ray Data capture pipeline, prefix sharing off"),
         ("naive", "(b) naive loop (batch 1, full depth, all hidden states)"))
PATH_FIELDS = ("seconds", "tokens_per_s", "computed_share", "gflops")  # read by each path's table row
# What the table (report, bench/README.md) reads of the JSON: key -> its sub-keys.
TABLE_FIELDS = {"n": (), "source": (), "encoder": (), "matmul_gflops": (), "speedup": (),
                "load_average_1m": ("before", "after"), "shared": (*PATH_FIELDS, "min_shared_prefix"),
                "off": PATH_FIELDS, "naive": (*PATH_FIELDS, "tokens", "layers", "num_layers")}


def report(res: dict) -> str:
    n = res["naive"]
    lines = [f"n = {res['n']} queries ({res['source']}), {n['tokens']} prompt tokens; encoder {res['encoder']}, "
             f"layers {n['layers']} (deepest {max(n['layers'])} of {n['num_layers']}); min_shared_prefix "
             f"{res['shared']['min_shared_prefix']}; matmul peak {res['matmul_gflops']:.1f} GFLOP/s; 1-min load "
             f"average {res['load_average_1m']['before']:.1f} before, {res['load_average_1m']['after']:.1f} after",
             "", "| path | seconds | prompt tokens/s | tokens computed | GFLOP/s | % of matmul | vs (b) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, name in PATHS:
        seconds, rate, share, gflops = (res[key][f] for f in PATH_FIELDS)
        lines.append(f"| {name} | {seconds:.1f} | {rate:.0f} | {100 * share:.1f}% | {gflops:.1f} | "
                     f"{100 * gflops / res['matmul_gflops']:.0f}% | **{rate / n['tokens_per_s']:.2f}x** |")
    lines.append(f"\nprefix sharing on vs off: {res['shared']['tokens_per_s'] / res['off']['tokens_per_s']:.2f}x")
    return "\n".join(lines)


def measure(cfg, queries: Path, work: Path) -> dict:
    """The three paths over the same queries, one after another, with rates and computed shares."""
    shared_cfg = cfg.model_copy(update={"min_shared_prefix": cfg.min_shared_prefix or 64, "out": str(work / "on")})
    res = {"shared": run_pipeline(shared_cfg),
           "off": run_pipeline(cfg.model_copy(update={"min_shared_prefix": 0, "out": str(work / "off")})),
           "naive": run_naive(cfg, queries)}
    naive = res["naive"]
    assert len({r["tokens"] for r in res.values()}) == 1, "every path must see the same prompt tokens"
    for key, r in res.items():
        params = naive["matmul_params"] if key == "naive" else naive["pipeline_matmul_params"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["computed_share"] = r["computed"] / r["tokens"]
        r["gflops"] = 2 * params * r["computed"] / r["seconds"] / 1e9
    return res


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from shared.config import load_config
    from training.capture.run import CaptureConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="queries (default 500; with --routerbench 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routerbench", type=Path, default=None, help="folder of RouterBench *.csv files")
    ap.add_argument("--config", default=str(ROOT / "configs" / "capture.yaml"))
    ap.add_argument("--json", default=None, help="default bench/results/capture_throughput[_routerbench].json")
    ap.add_argument("overrides", nargs="*", help="CaptureConfig key=value overrides, e.g. layers=[8,16]")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    queries = work / "queries.parquet"
    if args.routerbench:
        n = routerbench_queries(args.routerbench, args.n or None, args.seed, queries)
        source = f"RouterBench {', '.join(sorted(p.name for p in args.routerbench.glob('*.csv')))}"
    else:
        n, source = sample_queries(args.n, args.seed, queries), "configs/data.yaml sample"
    json_path = Path(args.json or ROOT / "bench" / "results" /
                     f"capture_throughput{'_routerbench' if args.routerbench else ''}.json")
    cfg = load_config(CaptureConfig, args.config,
                      [*args.overrides, f"queries={queries}", f"out={work / 'act'}", "progress=false"])
    load_before = os.getloadavg()
    peak = matmul_gflops()
    paths = measure(cfg, queries, work)
    res = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "cores": os.cpu_count(),
           "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
           "n": n, "source": source, "encoder": cfg.encoder, "config": cfg.model_dump(mode="json"),
           "matmul_gflops": peak, **paths,
           "speedup": paths["shared"]["tokens_per_s"] / paths["naive"]["tokens_per_s"]}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(report(res))
    print(f"\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
