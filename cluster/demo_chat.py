"""The demo's serving step: deploy the Serve app with the demo's artifact and chat through it.

Plain functions over a connected Ray: :func:`pick_prompts` chooses a few test-split
queries (one per task family, then the rest by id), :func:`serve_and_chat` deploys
``configs/serve-local.yaml`` with the new artifact on a free port and sends each prompt
to ``POST /v1/chat/completions`` with ``model: router`` over real HTTP, recording which
target answered, the router's P(correct) per target and its overhead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.demo_results import ServeResult
from shared.policy import Policy, policy_names

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def pick_prompts(table: pa.Table, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` test-split rows of a query table: one per family first (a source, or a
    reasoning-gym task; MMLU subjects count as one), then by query id.

    Returns ``[{'query_id', 'task', 'messages'}]`` in a stable order (no randomness)."""
    cols = ["query_id", "source", "task", "messages", "split"]
    rows = [r for r in table.select(cols).to_pylist() if r["split"] == "test"]
    rows.sort(key=lambda r: r["query_id"])

    def family(r: dict[str, Any]) -> str:
        return r["source"] if r["source"] == "mmlu" else f"{r['source']}/{r['task']}"

    firsts = list({family(r): r for r in reversed(rows)}.values())[::-1]
    chosen = sorted(firsts, key=lambda r: r["query_id"]) + [r for r in rows if r not in firsts]
    return [{k: r[k] for k in ("query_id", "task", "messages")} for r in chosen[:n]]


def serve_overrides(artifact: str, port: int, resources: dict[str, float], targets: list[str]) -> list[str]:
    """``key=value`` overrides of serve-local.yaml for the demo: the served targets, their CPU
    share (serve-local.yaml is sized for 2 targets; ingress, encoder and head keep 0.9 CPU)
    and GPU fractions when the cluster has GPUs."""
    cpus = resources.get("CPU", 2.0)
    per_target = round(max(0.05, min(0.5, (cpus - 0.9) / max(len(targets), 1) - 0.01)), 2)
    over = [f"artifact={artifact}", f"http_port={port}", f"targets=[{','.join(targets)}]",
            f"target_defaults.num_cpus={per_target}"]
    if resources.get("GPU", 0) > 0:
        over += ["encoder.num_gpus=0.2", f"target_defaults.num_gpus={round(0.8 / max(len(targets), 1), 2)}"]
    return over


def servable_targets(artifact: str) -> tuple[list[str], dict[str, str]]:
    """The artifact's targets whose weights this machine has, and why each other one is left out
    (an opt-in model that is not installed): the router head routes among the served ones."""
    from shared.artifact import read_meta
    from shared.models import missing_weights
    from shared.registry import load_registry

    registry = load_registry()
    served, skipped = [], {}
    for target in (t.name for t in read_meta(artifact).targets):
        reason = missing_weights(registry.get(target))
        if reason is None:
            served.append(target)
        else:
            skipped[target] = reason
    if not served:
        raise RuntimeError(f"none of the artifact's targets can be served here: {skipped}")
    return served, skipped


def chat(base_url: str, messages: list[dict[str, str]], max_tokens: int, timeout_s: float = 300) -> dict[str, Any]:
    """One routed chat request; the decision, the answer and the timings."""
    import httpx

    body = {"model": "router", "messages": messages, "max_tokens": max_tokens}
    t0 = time.perf_counter()
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s)
    seconds = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"chat request failed: HTTP {resp.status_code}: {resp.text[:300]}")
    data = resp.json()
    route = data["route"] or {}  # none when the router was down and fallback_target answered
    return {"target": resp.headers["x-prefill-router-target"], "answer": data["choices"][0]["message"]["content"],
            "probabilities": route.get("probabilities", {}), "eligible": route.get("eligible", []),
            "policy": route.get("policy", "tolerance"), **{n: route.get(n) for n in policy_names()},
            "costs": route.get("expected_cost", {}),
            "overhead_ms": route.get("overhead_ms", 0.0), "seconds": seconds,
            "fallback_from": resp.headers.get("x-prefill-router-fallback-from"),
            "degraded": resp.headers.get("x-prefill-router-degraded")}


def wait_ready(base_url: str, timeout_s: float = 300) -> float:
    """Poll ``GET /readyz`` until the app can answer (encoder, head and a target); the seconds waited."""
    import httpx

    t0 = time.perf_counter()
    last = "no answer"
    while time.perf_counter() - t0 < timeout_s:
        try:
            resp = httpx.get(f"{base_url}/readyz", timeout=10)
            if resp.status_code == 200:
                return time.perf_counter() - t0
            last = resp.text[:300]
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    raise TimeoutError(f"the Serve app at {base_url} was not ready after {timeout_s:.0f}s: {last}")


def why(result: dict[str, Any]) -> str:
    """One line: the probabilities and what the policy did with them."""
    if result.get("degraded"):
        return f"{result['degraded']}: answered by the fallback target {result['target']}"
    probs = ", ".join(f"{t} {p:.2f}" for t, p in result["probabilities"].items())
    name = result.get("policy", "tolerance")
    rule = Policy.of(name, result[name])  # shared.policy: each policy explains its own choice
    line = f"P(correct): {probs}; " + rule.explain(result["probabilities"], result.get("costs", {}), result["eligible"])
    if result.get("fallback_from"):
        line += f"; it failed ({result['fallback_from']}), answered by {result['target']}"
    return line


def serve_and_chat(artifact: str, prompts: list[dict[str, Any]], max_tokens: int = 24) -> ServeResult:
    """Deploy the app on the connected Ray (the targets this machine has), send ``prompts``,
    shut Serve down; the results."""
    import ray
    from ray import serve

    from cluster.local import free_port
    from serving.app import deploy, served_targets
    from serving.config import ServeConfig
    from shared.config import load_config

    port = free_port()
    targets, skipped = servable_targets(artifact)
    cfg = load_config(ServeConfig, CONFIG_DIR / "serve-local.yaml",
                      serve_overrides(str(Path(artifact).resolve()), port, ray.cluster_resources(), targets))
    t0 = time.perf_counter()
    serve.start(http_options={"host": cfg.http_host, "port": port})
    try:
        deploy(cfg)
        base = f"http://{cfg.http_host}:{port}"
        wait_ready(base)
        startup = time.perf_counter() - t0
        results = [{**p, **chat(base, p["messages"], max_tokens)} for p in prompts]
    finally:
        serve.shutdown()
    return ServeResult(url=base, targets=served_targets(cfg), not_served=skipped, startup_s=round(startup, 1),
                       chats=results,
                       median_overhead_ms=float(np.median([r["overhead_ms"] for r in results])) if results else None)
