"""What the serving probe found (issue 35, part 3), over real HTTP against the real Serve app.

One small app: the real SmolLM2 target, the real encoder and router head, and an OpenAI-compatible
loopback endpoint (``echo-endpoint``) that answers with the sampling fields it received; auth on,
the probes behind it too (``auth_probes``), ``echo-endpoint`` the fallback target. The kill tests
leave the app with replicas being replaced; every test starts once they are back (``whole``), so
the tests pass alone and in any order.
"""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from tests.serving.serving_fixtures import echo_app, metric, passed_over_at_once, replica

pytestmark = pytest.mark.slow
APP = "prefill-router"
TOKEN_ENV, TOKEN = "PR_TEST_PROBE_TOKEN", "probe-token"
ECHO, SMOL = "echo-endpoint", "smollm2-135m"
MSG = [{"role": "user", "content": "Name three colours of the rainbow, separated by commas."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cfg = {"targets": [SMOL, ECHO], "fallback_target": ECHO, "auth_token_env": TOKEN_ENV, "auth_probes": True,
           "default_max_tokens": 12, "target_timeout_s": 60, "route_timeout_s": 30,
           "encoder_batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
           "target_overrides": {ECHO: {"num_cpus": 0.05}}}
    with echo_app(tmp_path_factory.mktemp("probe"), [], cfg, env={TOKEN_ENV: TOKEN},
                  headers={"authorization": f"Bearer {TOKEN}"}) as client:
        yield client
    ray.shutdown()


@pytest.fixture(autouse=True)
def whole(app):
    """Each test starts with every model replica up: a kill test before it (in any order) leaves Serve
    replacing one. A call to a deployment waits for its replacement; one sent to the dead replica
    fails and is sent again."""
    deadline = time.monotonic() + 180
    for name in ("Encoder", f"Target-{SMOL}"):
        while True:
            try:
                replica(APP, name).ready.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
                break
            except Exception:  # noqa: BLE001 - the dead replica answered: ask again until the deadline
                assert time.monotonic() < deadline, f"{name} has no live replica after 180 s"
                time.sleep(0.5)
    while app.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "/readyz never said 200"
        time.sleep(0.2)


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"model": SMOL, "messages": MSG, **fields})


def test_404_and_405_bodies_carry_the_openai_error(app):
    for r, status in ((app.get("/v1/nope"), 404), (app.get("/v1/chat/completions"), 405)):
        assert r.status_code == status
        assert r.json()["error"]["code"] == status and r.json()["error"]["message"], r.text


def test_with_auth_probes_healthz_readyz_and_metrics_need_the_token(app):
    for path in ("/healthz", "/readyz", "/metrics"):
        r = httpx.get(f"{app.base_url}{path}")
        assert r.status_code == 401 and SMOL not in r.text, (path, r.text)
        assert app.get(path).status_code == 200


def test_nan_temperature_is_refused_as_not_finite(app):
    body = json.dumps({"model": SMOL, "messages": MSG}).replace("}]", '}], "temperature": NaN', 1)
    r = app.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "temperature" in r.text and "finite" in r.text and "2" not in r.json()["detail"]


@pytest.mark.parametrize("fields, status, named", [
    ({"n": 2}, 400, "n"), ({"n": 0}, 422, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"},
     400, "tools"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"logprobs": True}, 400, "logprobs"), ({"top_p": 0.5}, 400, "top_p"), ({"frobnicate": 1}, 400, "frobnicate"),
])
def test_fields_the_router_cannot_honour_are_refused_naming_them(app, fields, status, named):
    r = chat(app, **fields)
    assert r.status_code == status and r.json()["detail"].startswith(named), r.text
    assert chat(app, n=1, user="u1", top_p=1, response_format={"type": "text"}).status_code == 200


def test_stop_cuts_the_answer_plain_and_streamed(app):
    whole = chat(app).json()["choices"][0]["message"]["content"]
    words = whole.split()
    assert len(words) >= 3, whole
    stop = words[2]
    want = whole[:whole.find(stop)].strip()
    got = chat(app, stop=[stop, "never-there"]).json()["choices"][0]
    assert got["message"]["content"] == want and got["finish_reason"] == "stop", (whole, stop, got)
    with app.stream("POST", "/v1/chat/completions",
                    json={"model": SMOL, "messages": MSG, "stop": stop, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text.strip() == want and events[-1]["choices"][0]["finish_reason"] == "stop", (whole, stop, text)


def test_seed_makes_sampling_repeatable_and_both_pass_to_an_endpoint(app):
    texts = [chat(app, temperature=1.5, seed=seed).json()["choices"][0]["message"]["content"]
             for seed in (7, 7, 8, 9)]
    assert texts[0] == texts[1] and len(set(texts[1:])) > 1, texts
    echoed = chat(app, model=ECHO, stop=["="], seed=3).json()["choices"][0]["message"]["content"]
    assert json.loads(echoed) == {"stop": ["="], "seed": 3}


def test_metrics_show_end_to_end_duration_and_queue_time(app):
    before = metric(app, f'prefill_router_queue_seconds_sum{{target="{SMOL}"}}')
    with ThreadPoolExecutor(3) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: chat(app), range(3)))
    queued = metric(app, f'prefill_router_queue_seconds_sum{{target="{SMOL}"}}') - before
    latency = metric(app, f'prefill_router_target_latency_seconds_sum{{target="{SMOL}"}}')
    total = metric(app, 'prefill_router_request_duration_seconds_sum{endpoint="chat_completions",status="200"}')
    assert metric(app, f'prefill_router_queue_seconds_count{{target="{SMOL}"}}') >= 3
    assert queued > 0.05 and total >= latency > 0, (queued, latency, total)  # two of three waited for the model


def test_a_killed_target_replica_is_passed_over_at_once(app):
    os.kill(replica(APP, f"Target-{SMOL}").ready.remote().result(timeout_s=60)["pid"], signal.SIGKILL)
    passed_over_at_once(lambda: chat(app), SMOL, ECHO)


def test_a_killed_encoder_degrades_at_once(app):
    """Here the controller has dropped the dead replica before the request (so no call meets its death:
    the CI run that had the ingress wait 10 s for the replacement); the encoder-kill tests of
    test_serving_app.py send requests into the dying replica instead."""
    from serving.faults import live_replicas

    encoder = replica(APP, "Encoder")
    os.kill(encoder.ready.remote().result(timeout_s=60)["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while live_replicas(encoder) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_replicas(encoder) == 0, "Serve's controller never dropped the killed Encoder replica"
    time.sleep(0.3)  # the ingress's handle hears it too
    start = time.monotonic()
    r = chat(app, model="router")
    took = time.monotonic() - start
    seen = (r.status_code, dict(r.headers), r.text, f"{took:.2f}s")
    assert r.status_code == 200 and r.headers.get("x-prefill-router-degraded", "").startswith("router unavailable"), seen
    assert took < 8, seen  # route_timeout_s is 30
