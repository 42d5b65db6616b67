"""A real router artifact for the serving tests.

Uses the committed reference artifact (``data/router``) when it is there; otherwise
trains a small one: real SmolLM2 prefill features of multiple-choice queries and real
labels (answer-option log-likelihood of SmolLM2 and Gemma), a small SharedTrunkNet.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
from tests.procs import ROOT as REPO_ROOT

REFERENCE = REPO_ROOT / "data" / "router"
TOKEN_ENV, TOKEN = "PR_TEST_SERVE_TOKEN", "s3cret-token"  # the hardened app's bearer token
# the app hardened for production, applied in place: auth, a short target timeout and a fallback target.
# 10 s: a 1,500-token answer outlasts it; a fallback's one line queued behind six others fits (5 s did not)
HARDENED = {"auth_token_env": TOKEN_ENV, "target_timeout_s": 10, "fallback_target": "smollm2-135m"}
ROUTER_ERRORS = 'prefill_router_errors_total{kind="router"}'  # encoder or head failures, never a client's fault


def small_artifact(out: Path, n_queries: int = 24) -> str:
    from shared.artifact import ArtifactMeta, save_artifact
    from shared.config import load_config
    from shared.models import load_causal_lm
    from shared.registry import load_registry
    from shared.trunk import FeatureTransform
    from training.loop import TrunkConfig, build_ensemble, train_one
    from training.label.backends import ScoringOptions, make_scorer
    from training.data.build import DataConfig, build_queries
    from shared.encoder import Encoder

    table, _ = build_queries(load_config(DataConfig, None, [f"mmlu.n={4 * n_queries}", "reasoning_gym=[]"]))
    # The shortest prompts: the serving tests need a real artifact, not a good one (2 CPUs).
    rows = sorted(table.to_pylist(), key=lambda r: sum(len(m["content"]) for m in r["messages"]))[:n_queries]
    registry = load_registry()
    targets = ["smollm2-135m", "gemma3-270m"]
    Y = np.stack([[r["correct"] for r in make_scorer(registry.get(t), ScoringOptions(), device="cpu").label(rows)]
                  for t in targets], axis=1).astype(np.float32)
    smol = registry.get("smollm2-135m")
    enc = Encoder(load_causal_lm(smol, device="cpu"), [10, 20], ["last"], batch_size=16)
    feats = enc.encode([r["messages"] for r in rows]).features
    transform = FeatureTransform.fit(feats, n_components=8)
    X = transform.transform(feats)
    cut = int(0.75 * len(rows))
    member = train_one(X[:cut], Y[:cut], None, X[cut:], Y[cut:], None, seed=0, cfg=TrunkConfig(max_epochs=20))
    meta = ArtifactMeta(
        encoder={"name": smol.name, "sha256": smol.sha256}, layers=[10, 20],
        pooling={c: "last" for c in feats},
        targets=[{"name": t, "price_in": registry.get(t).price_input_per_m,
                  "price_out": registry.get(t).price_output_per_m, "median_output_tokens": 1.0} for t in targets],
    )
    save_artifact(str(out), meta, transform, build_ensemble([member]))
    return str(out)


def router_artifact(tmp: Path) -> str:
    if (REFERENCE / "meta.json").is_file():
        return str(REFERENCE)
    return small_artifact(tmp / "router")


class LoopbackEndpoint:
    """A real HTTP server on loopback for OpenAI-compatible stand-ins: :meth:`respond` answers
    each POST (``handler``: the ``http.server`` request handler, ``body``: the decoded JSON body)."""

    def __init__(self):
        import http.server
        import threading

        respond = self.respond

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - the http.server hook name
                respond(self, json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}"))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, handler: Any, body: dict) -> None:
        raise NotImplementedError

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class EchoEndpoint(LoopbackEndpoint):
    """A loopback OpenAI-compatible endpoint whose answer is the JSON of the ``stop`` and ``seed`` it got."""

    def respond(self, handler, body):
        text = json.dumps({"stop": body.get("stop"), "seed": body.get("seed")})
        if body.get("stream"):
            delta = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
            data, ctype = f"data: {json.dumps(delta)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream"
        else:
            data = json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
            ctype = "application/json"
        handler.send_response(200)
        handler.send_header("content-type", ctype)
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


@contextmanager
def echo_app(tmp: Path, models: list[dict], cfg: dict, env: dict[str, str] | None = None,
             headers: dict[str, str] | None = None, deploy_timeout_s: float = 600) -> Iterator[Any]:
    """The real Serve app on loopback with an :class:`EchoEndpoint` target (``echo-endpoint``) besides
    the default registry plus ``models``; ``cfg``: the ServeConfig fields beyond the artifact, registry
    and port; ``env``: set before Ray starts (its replicas inherit it). Yields an httpx client, whose
    ``deploy_with(**changes)`` deploys the app again with those config fields changed."""
    import os

    import httpx
    from ray import serve

    from serving.app import deploy
    from serving.config import ServeConfig
    from shared.config import read_yaml
    from shared.ray_boot import ensure_ray
    from shared.registry import DEFAULT_REGISTRY
    from tests.procs import free_port

    echo = EchoEndpoint()
    registry = read_yaml(DEFAULT_REGISTRY)
    registry["models"] += [*models, {"name": "echo-endpoint", "role": "target", "backend": "openai",
                                     "source": "openai", "base_url": echo.url}]
    (tmp / "models.yaml").write_text(yaml.safe_dump(registry))
    port = free_port()
    os.environ.update(env or {})
    ensure_ray("local", num_cpus=4, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"artifact": router_artifact(tmp), "registry": str(tmp / "models.yaml"), "http_port": port, **cfg}
    deploy(ServeConfig.model_validate(base), timeout_s=deploy_timeout_s)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180, headers=headers or {})
    # the app again with some fields changed (the ingress's settings: in place, no replica restarted)
    client.deploy_with = lambda **changes: deploy(ServeConfig.model_validate({**base, **changes}))
    try:
        yield client
    finally:
        client.close()
        echo.close()
        serve.shutdown()


def passed_over_at_once(send: Any, dead: str, fallback: str = "echo-endpoint") -> None:
    """The request ``send()`` makes just after every replica of target ``dead`` was killed is answered
    by ``fallback`` within 8 s (not after Serve has started a replacement)."""
    time.sleep(0.5)
    start = time.monotonic()
    r = send()
    took = time.monotonic() - start
    assert r.status_code == 200 and r.headers["x-prefill-router-target"] == fallback, r.text
    assert r.headers["x-prefill-router-fallback-from"] == dead and took < 8, took


class FlakyEndpoint(LoopbackEndpoint):
    """A loopback OpenAI-compatible endpoint whose streams die after two chunks (a real HTTP peer
    that drops the connection mid-answer); non-streamed calls get a 500."""

    def respond(self, handler: Any, body: dict) -> None:
        if not body.get("stream"):
            handler.send_error(500, "flaky endpoint")
            return
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for word in ("Paris", " is"):
            delta = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            data = f"data: {json.dumps(delta)}\n\n".encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()
        time.sleep(0.3)
        handler.connection.shutdown(socket.SHUT_RDWR)  # no terminating chunk: a broken stream


def serving_registry(tmp: Path, port: int, flaky_url: str) -> str:
    """The default registry plus OpenAI-compatible targets on loopback: this app itself
    (``smol-remote``), a closed port (``broken-endpoint``) and a stream that breaks (``flaky-endpoint``)."""
    from shared.config import read_yaml
    from shared.registry import DEFAULT_REGISTRY

    registry = read_yaml(DEFAULT_REGISTRY)
    registry["models"] += [
        {"name": "smol-remote", "role": "target", "backend": "openai", "source": "openai",
         "base_url": f"http://127.0.0.1:{port}/v1", "remote_model": "smollm2-135m",
         "price_input_per_m": 0.03, "price_output_per_m": 0.06},
        {"name": "broken-endpoint", "role": "target", "backend": "openai", "source": "openai",
         "base_url": "http://127.0.0.1:9/v1"},
        {"name": "flaky-endpoint", "role": "target", "backend": "openai", "source": "openai", "base_url": flaky_url},
    ]
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump(registry))
    return str(path)


def replica(app_name: str, deployment: str) -> Any:
    """A Serve handle to one deployment of the running app (its replicas' own methods)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app_name)


def kill_encoder_during(client: Any, app_name: str, body: dict, headers: dict | None = None,
                        n: int = 8) -> tuple[list[Any], int]:
    """SIGKILL the Encoder replica while routed chat requests are in flight; every response, and
    the status of ``/readyz`` right after the kill."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    pid = replica(app_name, "Encoder").ready.remote().result(timeout_s=60)["pid"]

    def send(i: int) -> Any:
        time.sleep(0.25 * i)
        return client.post("/v1/chat/completions", json=body, headers=headers or {})

    encoder = replica(app_name, "Encoder")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, i) for i in range(n)]
        deadline = time.monotonic() + 30
        while not encoder.ready.remote().result(timeout_s=10)["in_flight"]:  # a request is inside it now
            assert time.monotonic() < deadline, "no request reached the encoder within 30 s"
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        ready = client.get("/readyz").status_code
        return [f.result() for f in futures], ready


def metric(client: Any, line_start: str) -> float:
    """The value of one Prometheus sample of the app's ``/metrics`` (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def surrogate_round(client: Any, n_good: int = 7) -> tuple[Any, list[Any]]:
    """One request with a lone surrogate and ``n_good`` innocent ones to ``/v1/route`` at the same
    moment (they share the encoder's batch window); (the bad response, the good ones)."""
    from concurrent.futures import ThreadPoolExecutor

    bad = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    with ThreadPoolExecutor(n_good + 1) as pool:
        bad_f = pool.submit(client.post, "/v1/route", content=bad, headers={"content-type": "application/json"})
        good = [pool.submit(client.post, "/v1/route", json={"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"}]}) for i in range(n_good)]
        return bad_f.result(), [f.result() for f in good]


def replica_pids(app: str, names: tuple[str, ...] = ("Encoder", "Target-smollm2-135m", "Target-gemma3-270m")
                 ) -> dict[str, int]:
    """The process of each model replica of ``app`` (the Encoder, the local targets)."""
    return {n: replica(app, n).ready.remote().result(timeout_s=60)["pid"] for n in names}


class Deployed:
    """What the test app last deployed: its config plus ``changes`` and an ``artifact`` (None: the config's).
    ``ensure`` redeploys only when a test needs another state than the running one, so each test sets up
    what it needs and passes alone and in any order, at no cost in the module's own order."""

    def __init__(self, cfg: dict, port: int):
        self.cfg, self.port = cfg, port
        self.key = self._key(None, {})

    def _key(self, artifact: str | None, changes: dict) -> tuple[str, str]:
        return (artifact or self.cfg["artifact"], repr(sorted(changes.items())))

    def running(self, artifact: str | None = None, **changes: Any) -> bool:
        return self.key == self._key(artifact, changes)

    def redeploy(self, artifact: str | None = None, **changes: Any) -> None:
        from serving.app import deploy
        from serving.config import ServeConfig

        self.key = self._key(artifact, changes)  # first: a deploy that fails leaves another state too
        deploy(ServeConfig.model_validate({**self.cfg, **changes}), artifact=artifact)

    def ensure(self, artifact: str | None = None, **changes: Any) -> None:
        from cluster.demo_chat import wait_ready

        if not self.running(artifact, **changes):
            self.redeploy(artifact, **changes)
            wait_ready(f"http://127.0.0.1:{self.port}", 240)

    def changed_elsewhere(self) -> None:
        """Something other than :meth:`redeploy` changed the app (a publish): the next ``ensure`` redeploys."""
        self.key = ("", "")
