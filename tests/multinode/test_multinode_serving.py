"""The Serve app across nodes (issue 35, part 2): the node that holds the Encoder replica dies while
routed requests are in flight. Requests get the fallback target (or a JSON 503 with Retry-After),
none hangs, ``/readyz`` says 503, and 200 again once Serve has placed a new Encoder on the node
that replaces the dead one."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.multinode.conftest import add_worker, wait_nodes
from tests.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
SMOL = "smollm2-135m"
MSG = [{"role": "user", "content": "Name three colours of the rainbow."}]
ROUTE_TIMEOUT_S = 30


def readyz(client: httpx.Client) -> int:
    return client.get("/readyz").status_code


def poll(client: httpx.Client, status: int, timeout_s: float) -> float:
    """Seconds until ``/readyz`` answers ``status`` (fails after ``timeout_s``)."""
    start = time.monotonic()
    while readyz(client) != status:
        assert time.monotonic() - start < timeout_s, f"/readyz not {status} within {timeout_s:.0f} s"
        time.sleep(0.25)
    return time.monotonic() - start


def test_the_encoders_node_dies_mid_traffic_requests_fall_back_and_readyz_recovers(nodes, tmp_path):
    import ray
    from ray import serve

    from serving.app import deploy
    from serving.config import ServeConfig
    from tests.serving.serving_fixtures import router_artifact

    port = free_port()
    on = {name: {"resources": {name: 0.01}} for name in ("warm", "cold")}
    cfg = ServeConfig.model_validate({
        "artifact": router_artifact(tmp_path), "http_port": port, "targets": [SMOL], "fallback_target": SMOL,
        "default_max_tokens": 4, "target_timeout_s": 60, "route_timeout_s": ROUTE_TIMEOUT_S, "ready_timeout_s": 5,
        "encoder": {**on["cold"], "num_cpus": 0.5}, "head": {**on["warm"], "num_cpus": 0.1},
        "ingress": {**on["warm"], "num_cpus": 0.1}, "target_defaults": {**on["warm"], "num_cpus": 0.5}})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})  # one port per machine
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deploy(cfg)
        poll(client, 200, 240)
        body = {"model": "router", "messages": MSG}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and "x-prefill-router-degraded" not in r.headers, r.text

        def send(i: int) -> tuple[httpx.Response, float]:
            time.sleep(0.3 * i)
            start = time.monotonic()
            return client.post("/v1/chat/completions", json=body), time.monotonic() - start

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, i) for i in range(8)]
            time.sleep(0.5)
            killed = time.monotonic()
            nodes["cluster"].remove_node(nodes["node"]["cold"], allow_graceful=False)
            not_ready_after = poll(client, 503, 60)
            answers = [f.result() for f in futures]
        for r, took in answers:
            assert r.status_code == 200 or (r.status_code == 503 and r.headers.get("retry-after")), r.text
            assert took < ROUTE_TIMEOUT_S + 10, f"a request took {took:.1f} s"
        degraded = [r for r, _ in answers if "x-prefill-router-degraded" in r.headers]
        assert degraded and all(r.headers["x-prefill-router-target"] == SMOL for r in degraded)
        add_worker(nodes, "cold")  # KubeRay replaces the pod
        wait_nodes(ray, 3)
        ready_after = poll(client, 200, 240)
        recovered = time.monotonic() - killed
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and "x-prefill-router-degraded" not in r.headers, r.text
        print(f"serve: /readyz 503 {not_ready_after:.1f} s after the kill, 200 again {recovered:.1f} s after it "
              f"({ready_after:.1f} s after the new node joined); {len(degraded)} of {len(answers)} requests degraded")
    finally:
        client.close()
        serve.shutdown()
