"""Router decision latency at batch 1, artifacts side by side (issue 34: a new head or an adapted encoder
against today's shipped router).

    .venv/bin/python bench/decision_latency.py shipped=data/routerbench/router adapted=runs/adapted  # --n 40

A decision is the Encoder replica's ``encode`` plus the router head's ``decide`` (the plain classes the Serve
deployments wrap, in this process, batch 1, prefix cache off), for the first user turns of ``--queries``'
``--split`` rows (cut to ``--max-chars``). Every prompt is timed once per artifact, the artifacts interleaved
in turn, so each sees the same machine load; two warm-up prompts run first. Reports per artifact the layers
its encoder runs (frozen depth, adapted blocks), p50/p90/mean, and its p50 over the first artifact's. Writes
``--json`` (default ``bench/results/decision_latency.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("label", "artifact", "blocks", "depth", "adapted_blocks", "p50_ms", "p90_ms", "mean_ms", "p50_ratio")
# What the table (markdown, bench/README.md) reads of the JSON: key -> its sub-keys.
TABLE_FIELDS = {"rows": ROW_FIELDS, "n": (), "prompt_tokens": ("min", "max", "mean"), "threads": (),
                "load_average_1m": ("before", "after")}


def prompts(queries: str, split: str, n: int, max_chars: int) -> list[list[dict[str, str]]]:
    """The first ``n`` rows of ``split`` as one-turn conversations (their first user turn, cut)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(queries, columns=["messages", "split"]).to_pylist()
    users = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows if r["split"] == split]
    if len(users) < n:
        raise SystemExit(f"{queries} has {len(users)} {split} rows; asked for {n}")
    return [[{"role": "user", "content": u[:max_chars]}] for u in users[:n]]


async def time_decisions(pairs: dict[str, tuple], convs: list) -> dict[str, list[float]]:
    """Seconds per decision for each ``{label: (encoder replica, head replica)}``, interleaved per prompt."""
    times: dict[str, list[float]] = {label: [] for label in pairs}
    for conv in convs:
        for label, (enc, head) in pairs.items():
            t0 = time.perf_counter()
            head.decide(await enc.encode(conv), None)
            times[label].append(time.perf_counter() - t0)
    return times


def row(label: str, uri: str, enc, seconds: list[float]) -> dict:
    """One artifact's table row: what its encoder runs and its latency percentiles (ms)."""
    from shared.artifact import read_meta

    meta, ms = read_meta(uri), np.array(seconds) * 1000
    adapter = meta.adapter
    attn = meta.pooled.names if getattr(meta, "pooled", None) else []  # learned token pooling (schema 4)
    return {"label": label, "artifact": uri, "blocks": [b.name for b in meta.transform.blocks] + attn,
            "depth": int(enc.encoder.depth), "adapted_blocks": adapter.n_blocks if adapter else 0,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def markdown(doc: dict) -> str:
    lines = [f"{doc['n']} decisions per artifact, batch 1, prefix cache off; prompts "
             f"{doc['prompt_tokens']['min']}-{doc['prompt_tokens']['max']} tokens (mean "
             f"{doc['prompt_tokens']['mean']:.0f}); torch threads {doc['threads']}; 1-minute load average "
             f"{doc['load_average_1m']['before']:.1f} before, {doc['load_average_1m']['after']:.1f} after", "",
             "| artifact | blocks | frozen depth | adapted blocks | p50 (ms) | p90 (ms) | mean (ms) | p50 / first |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['label']} | {', '.join(r['blocks'])} | {r['depth']} | {r['adapted_blocks']} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['mean_ms']:.1f} | {r['p50_ratio']:.2f}x |")
    return "\n".join(lines)


def parse_artifacts(items: list[str]) -> dict[str, str]:
    """``["label=uri", ...]`` (or a bare uri, labelled by its folder name) as ``{label: uri}``, in order."""
    out = {}
    for item in items:
        label, _, uri = item.partition("=") if "=" in item else (Path(item).name, "", item)
        if label in out:
            raise SystemExit(f"artifact label {label!r} given twice")
        out[label] = uri
    return out


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from serving.replicas import EncoderReplica, RouterHeadReplica

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="label=uri of each artifact (the first is the reference)")
    ap.add_argument("--queries", default=str(ROOT / "data" / "queries.parquet"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=40, help="decisions per artifact")
    ap.add_argument("--max-chars", type=int, default=2000, help="a user turn is cut to this many characters")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "decision_latency.json"))
    args = ap.parse_args(argv)

    artifacts = parse_artifacts(args.artifacts)
    pairs = {label: (EncoderReplica(artifact=uri, max_prompt_tokens=4096), RouterHeadReplica(artifact=uri))
             for label, uri in artifacts.items()}
    convs = prompts(args.queries, args.split, args.n + 2, args.max_chars)
    first = next(iter(pairs.values()))[0]
    lengths = [len(x) for x in first.encoder.token_ids(convs[2:])]
    load_before = os.getloadavg()
    asyncio.run(time_decisions(pairs, convs[:2]))  # warm-up
    times = asyncio.run(time_decisions(pairs, convs[2:]))
    rows = [row(label, artifacts[label], pairs[label][0], times[label]) for label in pairs]
    for r in rows:
        r["p50_ratio"] = r["p50_ms"] / rows[0]["p50_ms"]
    doc = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
           "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
           "threads": torch.get_num_threads(), "queries": args.queries, "split": args.split, "n": args.n,
           "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))},
           "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
