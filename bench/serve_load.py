"""Serve load test: throughput, p50/p99 latency and router overhead of the routing app.

    .venv/bin/python bench/serve_load.py --artifact data/router --n 48 --concurrency 1 8 32

In one run, on a local Ray cluster with the real small models:

(a) the Serve app (``serving.app.deploy``: ingress -> batched encoder -> router head ->
    targets) answers ``n`` routed ``/v1/chat/completions`` requests at each concurrency,
    sent by an async ``httpx`` client. Reported per concurrency: requests/s, p50 and p99
    end-to-end latency, and the router's overhead (encoder + head, the
    ``x-prefill-router-overhead-ms`` header) as a share of each request's latency (median);
(b) per routing decision, the truncated encoder (``shared.encoder.Encoder`` with the
    artifact's layers: blocks up to the deepest selected one, no ``lm_head``) against a
    full-depth forward with ``output_hidden_states=True`` and logits, batch 1, on the same
    prompts in this process; reported as a ratio.

Prompts are test-split queries of the reference table (``--queries``). Writes JSON
(``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The table's columns (table, bench/README.md), in order: one row per concurrency level ...
LOAD_FIELDS = ("concurrency", "requests", "rps", "p50_s", "p99_s", "overhead_p50_s", "overhead_share_p50", "targets")
# ... and the line on the truncated encoder against the full forward.
ENCODER_FIELDS = ("prompts", "mean_prompt_tokens", "depth", "num_layers", "truncated_s", "full_s", "speedup")
TABLE_FIELDS = {"load": LOAD_FIELDS, "encoder": ENCODER_FIELDS}  # what the table reads of the JSON


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prompts(queries: str, n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(queries).to_pylist() if r["split"] == "test"]
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return [list(rows[i]["messages"]) for i in sorted(pick)]


async def load_level(url: str, prompts: list, concurrency: int, max_tokens: int) -> dict:
    """Send every prompt once with at most ``concurrency`` in flight; latency and overhead per request."""
    import httpx

    sem, records = asyncio.Semaphore(concurrency), []

    async def one(client: httpx.AsyncClient, messages: list) -> None:
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(url, json={"model": "router", "messages": messages, "max_tokens": max_tokens})
            latency = time.perf_counter() - t0
            r.raise_for_status()
            overhead = float(r.headers["x-prefill-router-overhead-ms"]) / 1000
            records.append({"latency": latency, "overhead": overhead, "target": r.headers["x-prefill-router-target"]})

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, m) for m in prompts))
        wall = time.perf_counter() - t0
    lat = np.array([r["latency"] for r in records])
    share = np.array([r["overhead"] / r["latency"] for r in records])
    targets = {t: sum(r["target"] == t for r in records) for t in sorted({r["target"] for r in records})}
    return {"concurrency": concurrency, "requests": len(records), "seconds": wall, "rps": len(records) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "overhead_p50_s": float(np.median([r["overhead"] for r in records])),
            "overhead_share_p50": float(np.median(share)), "targets": targets}


def encoder_vs_full(artifact: str, prompts: list, reps: int = 1) -> dict:
    """Seconds per decision (batch 1): truncated encoder vs full forward with every hidden state."""
    import torch

    from shared.artifact import read_meta
    from shared.models import load_causal_lm
    from shared.registry import load_registry
    from shared.encoder import Encoder

    meta = read_meta(artifact)
    loaded = load_causal_lm(load_registry().get(meta.encoder.name), device="cpu")
    enc = Encoder(loaded, meta.layers, meta.poolings)
    ids = [enc.tokenize([m])[0][0] for m in prompts]
    enc.encode_ids([ids[0]])  # warm-up
    times = {"truncated": [], "full": []}
    with torch.no_grad():
        for _ in range(reps):
            for x in ids:
                t0 = time.perf_counter()
                enc.encode_ids([x])
                times["truncated"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loaded.model(input_ids=torch.tensor([x]), output_hidden_states=True)
                times["full"].append(time.perf_counter() - t0)
    trunc, full = statistics.median(times["truncated"]), statistics.median(times["full"])
    return {"layers": meta.layers, "depth": enc.depth, "num_layers": enc.num_layers, "truncated_s": trunc,
            "full_s": full, "speedup": full / trunc, "prompts": len(ids),
            "mean_prompt_tokens": float(np.mean([len(x) for x in ids]))}


def run_app(args: argparse.Namespace, prompts: list) -> list[dict]:
    import ray
    from ray import serve

    from serving.app import deploy
    from serving.config import ServeConfig
    from shared.ray_boot import ensure_ray

    port = free_port()
    cfg = ServeConfig.model_validate({
        "artifact": args.artifact, "targets": args.targets, "http_port": port, "max_prompt_tokens": 4096,
        "default_max_tokens": args.max_tokens,
        "target_timeout_s": 600, "encoder_batch": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
        "encoder": {"max_ongoing_requests": 64}, "target_defaults": {"max_ongoing_requests": 64, "num_cpus": 0.5},
        "ingress": {"max_ongoing_requests": 256, "num_cpus": 0.2}})
    started = ensure_ray("local", num_cpus=args.num_cpus, log_to_driver=False)  # or the Ray this process runs
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(cfg)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(load_level(url, prompts[:2], 1, args.max_tokens))  # warm-up
        return [asyncio.run(load_level(url, prompts, c, args.max_tokens)) for c in args.concurrency]
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def table(result: dict) -> str:
    lines = ["| concurrency | requests | req/s | p50 latency (s) | p99 latency (s) | overhead p50 (ms) | "
             "overhead share p50 | routed to |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["load"]:
        c, n, rps, p50, p99, overhead, share, targets = (r[f] for f in LOAD_FIELDS)
        lines.append(f"| {c} | {n} | {rps:.2f} | {p50:.2f} | {p99:.2f} | {1000 * overhead:.0f} | {100 * share:.1f}% "
                     f"| {targets} |")
    prompts, tokens, depth, layers, trunc, full, speedup = (result["encoder"][f] for f in ENCODER_FIELDS)
    lines += ["", f"Per decision, batch 1, {prompts} prompts (mean {tokens:.0f} tokens): "
              f"truncated encoder (depth {depth} of {layers}) {1000 * trunc:.1f} ms, "
              f"full forward with all hidden states {1000 * full:.1f} ms: **{speedup:.2f}x**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "data" / "router"))
    parser.add_argument("--queries", default=str(ROOT / "data" / "queries.parquet"))
    parser.add_argument("--targets", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                        help="Targets to serve (the router chooses among them); the bundled two by default.")
    parser.add_argument("--n", type=int, default=48, help="Requests per concurrency level.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=16, help="Answer length of each request.")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="Ray's logical CPUs.")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    prompts = test_prompts(args.queries, args.n)
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "command": "bench/serve_load.py " + " ".join(argv or []),
              "encoder": encoder_vs_full(args.artifact, prompts[:24]), "load": run_app(args, prompts)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
