"""The Serve app on a real local Ray cluster with the real SmolLM2 and Gemma models, over real HTTP.

One app, deployed once. Each test asks for the state it needs (``app``: as deployed; ``hardened``: auth, a
short target timeout and a fallback target, applied in place) and :class:`Deployed` redeploys only when an
earlier test left another one, so each test passes alone and in any order. ``smol-remote`` is this app itself
on loopback; ``gpt-4-1106-preview`` goes through an endpoint that refuses connections (``endpoints``).
"""

import json
import shutil
import time

import httpx
import pytest
import ray
import yaml

from cluster.demo_chat import wait_ready
from tests.procs import free_port
from tests.serving.serving_fixtures import (HARDENED, ROUTER_ERRORS, TOKEN, TOKEN_ENV, Deployed, FlakyEndpoint,
                                           kill_encoder_during, metric, replica, replica_pids, router_artifact,
                                           serving_registry, surrogate_round)

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
LONG = [{"role": "user", "content": "word " * 400}]
APP = "prefill-router"
BROKEN = "gpt-4-1106-preview"  # served through the registry's broken-endpoint
COUNTING = [{"role": "user", "content": "Write the numbers from 1 to 500 in words, one per line, without stopping."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import os

    from ray import serve

    from shared.ray_boot import ensure_ray

    tmp = tmp_path_factory.mktemp("serve")
    artifact = router_artifact(tmp)
    port = free_port()
    flaky = FlakyEndpoint()
    cfg = {"artifact": artifact, "registry": serving_registry(tmp, port, flaky.url), "http_port": port,
           "max_prompt_tokens": 200, "default_max_tokens": 12, "target_timeout_s": 90, "route_timeout_s": 5,
           # a routed request waits up to 0.5 s inside the encoder for its batch: the kill tests hit it there
           "encoder_batch": {"max_batch_size": 8, "batch_wait_timeout_s": 0.5},
           "prefix_cache": {"max_mb": 32, "min_tokens": 32},
           "targets": ["smollm2-135m", "gemma3-270m", "smol-remote", "flaky-endpoint", BROKEN],
           "endpoints": {BROKEN: "broken-endpoint"},
           "target_overrides": {"smol-remote": {"num_cpus": 0.1}, "flaky-endpoint": {"num_cpus": 0.05},
                                BROKEN: {"num_cpus": 0.05}}}
    os.environ[TOKEN_ENV] = TOKEN  # before Ray starts: the replicas inherit it (the auth tests use it)
    ensure_ray("local", num_cpus=4, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployed = Deployed(cfg, port)
    deployed.redeploy()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180)
    yield {"client": client, "artifact": artifact, "tmp": tmp, "redeploy": deployed.redeploy, "ensure": deployed.ensure,
           "deployed": deployed, "cfg": cfg, "port": port}
    client.close()
    flaky.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def app(served):
    """The app as first deployed (redeployed first if an earlier test changed it)."""
    served["ensure"]()
    return served


def test_health_models_and_route(app):
    c = app["client"]
    assert c.get("/healthz").json()["status"] == "ok"
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["encoder"] == "ok", ready.text
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["router", "smollm2-135m", "gemma3-270m", "smol-remote", "flaky-endpoint", BROKEN]
    r = c.post("/v1/route", json={"messages": MSG})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["target"] in ("smollm2-135m", "gemma3-270m") and d["target"] == d["eligible"][0]
    assert set(d["probabilities"]) == {"smollm2-135m", "gemma3-270m"}
    assert all(0 <= p <= 1 for p in d["probabilities"].values()) and d["prompt_tokens"] > 5
    assert d["artifact"] == app["artifact"]
    # tolerance 1: every target is eligible, so the cheapest one is chosen
    assert c.post("/v1/route", json={"messages": MSG, "tolerance": 1.0}).json()["target"] == "smollm2-135m"
    # value policy: a correct answer worth nothing buys the cheapest; worth 1e6 USD, the likeliest
    v = c.post("/v1/route", json={"messages": MSG, "value": 0.0}).json()
    assert (v["target"], v["policy"], v["value"], v["tolerance"]) == ("smollm2-135m", "value", 0.0, None)
    likeliest = max(d["probabilities"], key=d["probabilities"].get)
    assert c.post("/v1/route", json={"messages": MSG, "value": 1e6}).json()["eligible"][0] == likeliest


def test_routed_and_pinned_chat_completions(app):
    c = app["client"]
    r = c.post("/v1/chat/completions", json={"model": "router:0.05", "messages": MSG})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == r.headers["x-prefill-router-target"] == body["route"]["target"]
    assert body["choices"][0]["message"]["content"].strip()
    assert float(r.headers["x-prefill-router-overhead-ms"]) > 0
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    r = c.post("/v1/chat/completions", json={"model": "gemma3-270m", "messages": MSG})
    assert r.json()["model"] == "gemma3-270m" and r.json()["route"] is None


def test_openai_target_is_the_app_itself_over_loopback(app):
    c = app["client"]
    local = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": MSG}).json()
    remote = c.post("/v1/chat/completions", json={"model": "smol-remote", "messages": MSG})
    assert remote.status_code == 200 and remote.headers["x-prefill-router-target"] == "smol-remote"
    # greedy decoding on the same weights: the same answer through the HTTP hop
    assert remote.json()["choices"][0]["message"]["content"] == local["choices"][0]["message"]["content"]


def test_streaming_sse(app):
    c = app["client"]
    body = {"model": "router", "messages": MSG, "stream": True, "max_tokens": 8}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["route"]["target"] == chunks[0]["model"]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body, status, ctype", [
    (b"{oops", 400, "application/json"),
    (json.dumps({"model": "router", "messages": []}).encode(), 422, "application/json"),
    (json.dumps({"model": "nope", "messages": MSG}).encode(), 404, "application/json"),
    (json.dumps({"model": "router", "messages": LONG}).encode(), 413, "application/json"),
    # the limit holds on pinned requests too, before any target sees the prompt
    (json.dumps({"model": "smollm2-135m", "messages": LONG}).encode(), 413, "application/json"),
    (json.dumps({"model": "router", "messages": MSG, "stream": "yes"}).encode(), 422, "application/json"),
    (json.dumps({"model": "router:abc", "messages": MSG}).encode(), 422, "application/json"),
    (json.dumps({"model": "router", "messages": MSG}).encode(), 415, "text/plain"),
    *((b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % m, 400, "application/json")
      for m in (b"router", b"gemma3-270m")),
    (json.dumps({"model": "router", "messages": MSG}).encode(), 415, None),
])
def test_bad_input_is_4xx_with_reason(app, body, status, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = app["client"].post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["detail"] and r.json()["error"]["message"]


def test_a_lone_surrogate_is_a_400_of_its_own_and_never_fails_its_batch_mates(app):
    c, before = app["client"], metric(app["client"], ROUTER_ERRORS)  # routed and pinned chats: the 400s above
    for _ in range(3):
        bad, good = surrogate_round(c)
        assert bad.status_code == 400 and "lone UTF-16 surrogate" in bad.json()["error"]["message"], bad.text
        assert [r.status_code for r in good] == [200] * len(good), [r.text for r in good if r.status_code != 200]
    assert metric(c, ROUTER_ERRORS) == before


def test_metrics_count_requests_and_decisions(app):
    c = app["client"]  # counter deltas of this test's own requests: it passes alone and in any order
    ok, too_long = (f'prefill_router_requests_total{{endpoint="chat_completions",status="{s}"}}' for s in (200, 413))
    overhead = "prefill_router_overhead_seconds_count"
    before = {name: metric(c, name) for name in (ok, too_long, overhead)}
    assert c.post("/v1/chat/completions", json={"model": "router", "messages": MSG}).status_code == 200
    for model in ("router", "smollm2-135m"):  # the limit holds on routed and pinned requests alike
        assert c.post("/v1/chat/completions", json={"model": model, "messages": LONG}).status_code == 413
    assert metric(c, ok) == before[ok] + 1 and metric(c, too_long) == before[too_long] + 2
    assert metric(c, overhead) > before[overhead] and "prefill_router_decisions_total" in c.get("/metrics").text


def test_official_openai_client_sees_length_and_usage(app):
    """D6: the final chunk says why the answer ended, and include_usage adds the usage chunk."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app['port']}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="smollm2-135m", messages=COUNTING, max_tokens=4)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=COUNTING, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_route_has_overhead_header_and_takes_model(app):
    """D8: /v1/route takes chat's `model` field and sends the overhead header."""
    c = app["client"]
    r = c.post("/v1/route", json={"model": "router:1.0", "messages": MSG})
    assert r.status_code == 200 and r.json()["target"] == "smollm2-135m" and r.json()["tolerance"] == 1.0
    assert float(r.headers["x-prefill-router-overhead-ms"]) > 0
    assert c.post("/v1/route", json={"model": "gemma3-270m", "messages": MSG}).status_code == 422


def test_prefix_cache_hits_are_counted_over_http(app):
    """Issue 16: routed prompts sharing a system prompt reuse its KV cache; /metrics counts it."""
    c = app["client"]
    system = ("You are the help desk of a small library. Answer briefly. Loans last three weeks and can be "
              "renewed twice online. Late returns cost ten cents a day. The reading room closes at eight.")

    def counter(name: str) -> float:
        line = [x for x in c.get("/metrics").text.splitlines() if x.startswith(f"prefill_router_prefix_cache_{name}_total")]
        return float(line[0].split()[-1])

    before = {k: counter(k) for k in ("hits", "misses", "tokens_saved")}
    for question in ("How long is a loan?", "What does a late return cost?", "When does the reading room close?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        assert c.post("/v1/route", json={"messages": messages}).status_code == 200
    assert counter("misses") - before["misses"] == 1 and counter("hits") - before["hits"] == 2
    assert counter("tokens_saved") - before["tokens_saved"] >= 2 * 32


def test_mid_stream_failure_is_an_openai_error_event(app):
    """D5: a target whose stream breaks after two chunks: an error event without internals, no stop."""
    import openai

    body = {"model": "flaky-endpoint", "messages": MSG, "stream": True}
    with app["client"].stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    events = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert content == "Paris is"
    assert events[-1]["error"]["code"] == "target_failed" and "flaky-endpoint" in events[-1]["error"]["message"]
    assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events)
    for leak in ("Actor", "pid", "127.0.0.1", "namespace", "ip="):
        assert leak not in lines[-2]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app['port']}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        list(client.chat.completions.create(model="flaky-endpoint", messages=MSG, stream=True))


def test_client_disconnect_stops_the_target_and_counts_499(app):
    """D1/D7: a client that gives up cancels the generation in the target replica."""
    target = replica(APP, "Target-smollm2-135m")
    before = target.stats.remote().result(timeout_s=30)
    disconnected = 'prefill_router_requests_total{endpoint="chat_completions",status="499"}'
    counted = metric(app["client"], disconnected)
    body = {"model": "smollm2-135m", "messages": COUNTING, "max_tokens": 1500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"http://127.0.0.1:{app['port']}/v1/chat/completions", json=body, timeout=6)
    deadline = time.monotonic() + 30
    while (now := target.stats.remote().result(timeout_s=30))["active"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert now["active"] == 0 and now["cancelled"] == before["cancelled"] + 1, (before, now)
    time.sleep(2)
    assert target.stats.remote().result(timeout_s=30) == now  # nothing computes any more
    assert metric(app["client"], disconnected) == counted + 1
    assert 'status="500"' not in app["client"].get("/metrics").text


def test_huge_prompts_are_refused_before_any_target(app):
    """D1: a 200 KB prompt pinned to a target is a fast 413, and so is a body over max_body_bytes."""
    c = app["client"]
    huge = [{"role": "user", "content": "lorem ipsum " * 17_000}]
    t0 = time.monotonic()
    r = c.post("/v1/chat/completions", json={"model": "gemma3-270m", "messages": huge})
    assert r.status_code == 413 and "limit of 200" in r.json()["detail"]
    assert time.monotonic() - t0 < 30
    r = c.post("/v1/chat/completions", content=b" " * (1 << 20) + b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["detail"]
    assert c.get("/readyz").status_code == 200


def test_failing_target_falls_back(app):
    """A target whose endpoint refuses connections: the next target answers, marked in a header and counted."""
    c = app["client"]
    r = c.post("/v1/chat/completions", json={"model": BROKEN, "messages": MSG})
    assert r.status_code == 200, r.text
    assert r.headers["x-prefill-router-fallback-from"] == BROKEN
    assert r.json()["model"] != BROKEN and r.json()["choices"][0]["message"]["content"].strip()
    assert f'prefill_router_fallbacks_total{{failed_target="{BROKEN}"' in c.get("/metrics").text


def test_artifact_reload_in_place_and_bad_artifact_keeps_old(app):
    c, fresh = app["client"], app["tmp"] / "router-v2"
    shutil.copytree(app["artifact"], fresh)
    wait_ready(str(c.base_url).rstrip("/"), 240)  # an encoder an earlier test killed may still be starting
    app["redeploy"](artifact=str(fresh))
    assert (r := c.post("/v1/route", json={"messages": MSG})).status_code == 200 and r.json()["artifact"] == str(fresh)
    broken = app["tmp"] / "router-broken"
    shutil.copytree(app["artifact"], broken)
    (broken / "weights.safetensors").write_bytes(b"corrupt")
    app["redeploy"](artifact=str(broken))
    r = c.post("/v1/route", json={"messages": MSG})
    assert r.status_code == 200 and r.json()["artifact"] == str(fresh)


def test_publish_reloads_the_running_app(app):
    """The retraining pipeline's publish step copies the artifact and points the running app at it."""
    from cluster.pipeline.publish import PublishConfig, ReloadServeConfig, publish

    c = app["client"]
    serve_yaml = app["tmp"] / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(app["cfg"]))
    pub = PublishConfig(uri=str(app["tmp"] / "published" / "{run_id}"), pointer=str(app["tmp"] / "current.json"),
                        reload_serve_app=ReloadServeConfig(serve_config=str(serve_yaml), timeout_s=300))
    record = publish(pub, app["artifact"], {"gap_closed": 0.5}, None, str(app["tmp"]))
    assert record["published"] and record["reloaded"]["artifact"] == record["artifact"]
    assert "{run_id}" not in record["artifact"] and record["artifact"].startswith(str(app["tmp"] / "published"))
    assert c.post("/v1/route", json={"messages": MSG}).json()["artifact"] == record["artifact"]
    assert json.loads((app["tmp"] / "current.json").read_text())["artifact"] == record["artifact"]
    app["deployed"].changed_elsewhere()  # publish redeployed it with the published copy


def test_encoder_killed_mid_request_gives_json_503_then_recovers(app):
    """D3/D4: no fallback_target: requests around an encoder SIGKILL get a 200 or a JSON 503, never a bare
    500; /readyz says not ready until Serve has replaced the replica."""
    c = app["client"]
    responses, ready = kill_encoder_during(c, APP, {"model": "router", "messages": MSG})
    assert {r.status_code for r in responses} <= {200, 503}, [(r.status_code, r.text) for r in responses]
    unavailable = [r for r in responses if r.status_code == 503]
    assert unavailable and all("no fallback_target" in r.json()["detail"] for r in unavailable)
    assert ready == 503
    wait_ready(f"http://127.0.0.1:{app['port']}", 240)
    assert c.post("/v1/chat/completions", json={"model": "router", "messages": MSG}).status_code == 200


@pytest.fixture
def hardened(served):
    """The app updated for production (:data:`HARDENED`): a bearer token, a short target timeout and a fallback."""
    served["ensure"](**HARDENED)
    return {**served, "auth": {"authorization": f"bearer {TOKEN}"}}


def test_ingress_settings_change_in_place(served):
    """Ingress settings travel in user_config: applied in place, no replica (no model) restarts."""
    served["ensure"]()
    before = replica_pids(APP)
    served["ensure"](**HARDENED)
    assert replica_pids(APP) == before


def test_auth_is_required_and_the_bearer_scheme_case_insensitive(hardened):
    """D2: a 401 says how to authenticate."""
    c = hardened["client"]
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG}, headers=hardened["auth"])
    assert r.status_code == 200, r.text


def test_a_target_that_times_out_is_cancelled(hardened):
    """D1: a target slower than target_timeout_s is cancelled and stops computing; when every
    target fails the answer is a 502 that says so."""
    c = hardened["client"]
    targets = {t: replica(APP, f"Target-{t}") for t in ("smollm2-135m", "gemma3-270m")}
    before = {t: h.stats.remote().result(timeout_s=30)["cancelled"] for t, h in targets.items()}
    body = {"model": "smollm2-135m", "messages": COUNTING, "max_tokens": 1500}
    r = c.post("/v1/chat/completions", json=body, headers=hardened["auth"])
    assert r.status_code == 502 and "timed out" in r.json()["detail"], r.text
    deadline = time.monotonic() + 30
    while any(h.stats.remote().result(timeout_s=30)["active"] for h in targets.values()):
        assert time.monotonic() < deadline, "a target kept computing after its timeout"
        time.sleep(0.5)
    assert all(h.stats.remote().result(timeout_s=30)["cancelled"] == before[t] + 1 for t, h in targets.items())


def test_encoder_killed_mid_request_falls_back_to_the_configured_target(hardened):
    """D3: routed requests around an encoder SIGKILL are answered by fallback_target, marked in a header."""
    c = hardened["client"]
    responses, _ = kill_encoder_during(c, APP, {"model": "router", "messages": MSG}, headers=hardened["auth"])
    assert {r.status_code for r in responses} == {200}, [(r.status_code, r.text) for r in responses]
    degraded = [r for r in responses if "x-prefill-router-degraded" in r.headers]
    assert degraded and all(r.headers["x-prefill-router-target"] == "smollm2-135m" for r in degraded)
    wait_ready(f"http://127.0.0.1:{hardened['port']}", 240)


def test_decision_service_serves_no_target(app):
    """Issue 17: `targets: []` deploys no target; /v1/route decides among every artifact target
    (the client calls the chosen provider itself) and chat completions say so with a 400."""
    from ray import serve

    from shared.artifact import read_meta

    app["redeploy"](targets=[])
    c = app["client"]
    wait_ready(f"http://127.0.0.1:{app['port']}", 240)
    assert not [d for d in serve.status().applications[APP].deployments if d.startswith("Target-")]
    routed = [t.name for t in read_meta(app["artifact"]).targets]
    r = c.post("/v1/route", json={"messages": MSG})
    assert r.status_code == 200, r.text
    decision = r.json()
    assert decision["target"] in routed and sorted(decision["probabilities"]) == sorted(routed)
    assert set(decision["eligible"]) <= set(routed) and sorted(decision["expected_cost"]) == sorted(routed)
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 400 and "decision service" in r.json()["error"]["message"] and "/v1/route" in r.text
    assert c.post("/v1/chat/completions", json={"model": "stream", "messages": "x"}).status_code == 422
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["router"]
    assert c.get("/readyz").status_code == 200


def test_auth_token_env_naming_an_unset_variable_refuses_to_start(served):
    """D2: no silent start without auth. From any state; it leaves the app failed (the next ensure redeploys)."""
    with pytest.raises(RuntimeError, match="PR_UNSET_TOKEN_VARIABLE is unset"):
        served["redeploy"](targets=[], auth_token_env="PR_UNSET_TOKEN_VARIABLE")
