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


def replicas(deployment: str) -> int:
    """RUNNING replicas of ``deployment``, as Serve's status reports them."""
    from ray import serve

    states = serve.status().applications["prefill-router"].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_the_encoder_and_a_target_scale_out_under_load_and_back_in_after_it(nodes, tmp_path):
    """Bounded load (routing decisions for the Encoder, answers for the target): both go from one
    replica to two, on the worker nodes, then back to one once the load stops."""
    import threading

    from ray import serve

    from serving.app import deploy
    from serving.config import ServeConfig
    from tests.serving.serving_fixtures import router_artifact

    port = free_port()
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 5, "num_cpus": 0.5}
    cfg = ServeConfig.model_validate({
        "artifact": router_artifact(tmp_path), "http_port": port, "targets": [SMOL], "default_max_tokens": 24,
        "target_timeout_s": 120, "route_timeout_s": 60, "encoder": scaling, "target_defaults": scaling,
        "encoder_batch": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180)
    stop, names = threading.Event(), ("Encoder", f"Target-{SMOL}")
    try:
        deploy(cfg)
        poll(client, 200, 240)
        assert [replicas(n) for n in names] == [1, 1]

        def load(path: str, body: dict) -> None:
            while not stop.is_set():
                client.post(path, json=body)

        route, chat = {"messages": MSG}, {"model": SMOL, "messages": MSG}
        threads = [threading.Thread(target=load, args=a, daemon=True)
                   for a in [("/v1/route", route)] * 6 + [("/v1/chat/completions", chat)] * 4]
        start = time.monotonic()
        for t in threads:
            t.start()
        up: dict[str, float] = {}
        while len(up) < len(names):
            assert time.monotonic() - start < 180, f"no scale-out within 180 s: {[replicas(n) for n in names]}"
            up.update({n: time.monotonic() - start for n in names if n not in up and replicas(n) == 2})
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(200)
        stopped, down = time.monotonic(), {}
        while len(down) < len(names):
            assert time.monotonic() - stopped < 180, f"no scale-in within 180 s: {[replicas(n) for n in names]}"
            down.update({n: time.monotonic() - stopped for n in names if n not in down and replicas(n) == 1})
            time.sleep(0.5)
        print("autoscaling: " + ", ".join(f"{n} 1->2 in {up[n]:.1f} s, 2->1 in {down[n]:.1f} s" for n in names))
    finally:
        stop.set()
        client.close()
        serve.shutdown()
