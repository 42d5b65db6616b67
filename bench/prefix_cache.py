"""Router decision latency, batch 1, for prompts that share a long system prompt: prefix cache hit vs off.

    .venv/bin/python bench/prefix_cache.py            # --artifact data/router --system-tokens 1000 --n 40

Every prompt is ``[system, user]``: one system prompt of about ``--system-tokens`` encoder
tokens (an operations handbook, the same for every prompt) and a distinct user question (the
first user turns of the reference table's test split, cut to 400 characters). A decision is
the Encoder replica's ``encode`` plus the router head's ``decide`` (the plain classes the Serve
deployments wrap, in this process, batch 1), timed for each prompt with the cache off and with
it on (``prefix_cache.max_mb`` 256), interleaved so both see the same machine load. The cache
is warmed by one prompt first (it admits the system prompt on first sight), so every timed
"on" decision is a hit. Reports p50/p90/mean per path and the p50 ratio; also the largest
difference of the routing probabilities between the two paths (they must agree). Writes
``bench/results/prefix_cache_latency.json`` and prints a Markdown table.
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
PATH_FIELDS = ("p50_ms", "p90_ms", "mean_ms")  # the columns of each path's table row, in order
# What the table (report, bench/README.md) reads of the JSON: key -> its sub-keys (a row per path).
TABLE_FIELDS = {"off": PATH_FIELDS, "on": PATH_FIELDS, "speedup_p50": (), "n": (), "system_tokens": (),
                "prompt_tokens": ("min", "max", "mean"), "encoder": (), "layers": (), "threads": (),
                "max_probability_gap": (), "cache": ()}

RULES = ["Refunds are issued to the original payment method within five working days.",
         "Orders above fifty euros ship free of charge inside the European Union.",
         "A damaged parcel must be reported within forty-eight hours with a photograph.",
         "Gift cards never expire and cannot be exchanged for cash.",
         "Customer data is never shared with third parties for advertising.",
         "Support answers in the customer's language when it is English, German or French.",
         "Escalate to a human agent when the customer mentions a legal dispute.",
         "Never promise a delivery date that the carrier has not confirmed."]


def system_prompt(tokenizer, target_tokens: int) -> str:
    """A deterministic handbook of numbered rules, grown until it has ``target_tokens`` tokens."""
    lines, k = ["You are the customer-support assistant of an online shop. Follow the handbook below."], 0
    while len(tokenizer("\n".join(lines))["input_ids"]) < target_tokens:
        lines.append(f"Rule {k + 1}: {RULES[k % len(RULES)]}")
        k += 1
    return "\n".join(lines)


def questions(n: int) -> list[str]:
    import pyarrow.parquet as pq

    rows = pq.read_table(ROOT / "data" / "queries.parquet", columns=["messages", "split"]).to_pylist()
    users = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows if r["split"] == "test"]
    return [u[:400] for u in users[:n]]


async def time_decisions(encoders: dict, head, convs: list) -> tuple[dict[str, list[float]], float]:
    """Seconds per decision for each encoder replica, interleaved; and the largest probability gap."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    gap = 0.0
    for conv in convs:
        probs = {}
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            decision = head.decide(await enc.encode(conv), None)
            times[name].append(time.perf_counter() - t0)
            probs[name] = np.array(list(decision.probabilities.values()))
        gap = max(gap, float(np.abs(probs["on"] - probs["off"]).max()))
    return times, gap


def summary(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean())}


def report(res: dict) -> str:
    def cells(path: str) -> str:
        return " | ".join(f"{res[path][k]:.1f}" for k in PATH_FIELDS)

    rows = [f"| cache off (whole prompt) | {cells('off')} | 1.00x |",
            f"| cache hit (suffix only) | {cells('on')} | **{res['speedup_p50']:.2f}x** |"]
    return "\n".join([
        f"{res['n']} decisions per path, batch 1; system prompt {res['system_tokens']} tokens, prompts "
        f"{res['prompt_tokens']['min']}-{res['prompt_tokens']['max']} tokens (mean {res['prompt_tokens']['mean']:.0f}); "
        f"encoder {res['encoder']}, layers {res['layers']}; torch threads {res['threads']}",
        "", "| path | p50 (ms) | p90 (ms) | mean (ms) | p50 speed-up |", "|---|---:|---:|---:|---:|", *rows, "",
        f"largest routing-probability difference, hit vs off: {res['max_probability_gap']:.2e}; "
        f"cache after the run: {res['cache']}"])


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from serving.replicas import EncoderReplica, RouterHeadReplica

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=str(ROOT / "data" / "router"))
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--n", type=int, default=40, help="decisions per path")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "prefix_cache_latency.json"))
    args = ap.parse_args(argv)

    off = EncoderReplica(artifact=args.artifact, max_prompt_tokens=4096)
    on = EncoderReplica(artifact=args.artifact, max_prompt_tokens=4096, prefix_cache={"max_mb": 256})
    head = RouterHeadReplica(artifact=args.artifact)
    system = system_prompt(off.encoder.tokenizer, args.system_tokens)
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions(args.n + 1)]
    lengths = [len(x) for x in off.encoder.token_ids(convs)]
    load_before = os.getloadavg()
    times, gap = asyncio.run(time_decisions({"off": off, "on": on}, head, convs[:1]))  # warm-up; admits the prefix
    times, gap = asyncio.run(time_decisions({"off": off, "on": on}, head, convs[1:]))
    res = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
           "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
           "threads": torch.get_num_threads(), "artifact": args.artifact, "encoder": off.name,
           "layers": off.encoder.layers, "n": len(convs) - 1,
           "system_tokens": len(off.encoder.tokenizer(system)["input_ids"]),
           "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))},
           "off": summary(times["off"]), "on": summary(times["on"]), "max_probability_gap": gap,
           "cache": {k: v for k, v in on.cache.stats().items() if k in ("entries", "bytes", "hits", "misses")}}
    res["speedup_p50"] = res["off"]["p50_ms"] / res["on"]["p50_ms"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
