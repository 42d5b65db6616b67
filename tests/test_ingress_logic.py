"""Request handling of the ingress with in-process stand-ins for the deployment handles.

These check the pure request logic (validation, fallback order, headers, metrics,
streaming format). The real app on a Ray cluster with real models is tested in
test_serving_app.py.
"""

import json

import pytest
from fastapi.testclient import TestClient

from serving.ingress import RouterIngress, make_fastapi_app


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class Handle:
    def __init__(self, **methods):
        for name, fn in methods.items():
            setattr(self, name, Method(fn))

    def options(self, **_):
        return self


def target(name, fail=False):
    async def generate(messages, max_tokens, temperature):
        if fail:
            raise RuntimeError(f"{name} is down")
        return {"text": f"{name} says hi", "prompt_tokens": 3, "completion_tokens": 2}

    async def stream(messages, max_tokens, temperature):
        if fail:
            raise RuntimeError(f"{name} is down")
        for piece in ("a", "b", "c"):
            yield piece

    return Handle(generate=generate, stream=stream)


async def encode(messages):
    text = " ".join(m["content"] for m in messages)
    if len(text) > 50:
        raise ValueError("PromptTooLong: 60 tokens > 50")
    return {"n_tokens": len(text.split())}


async def decide(features, tolerance):
    tol = 0.1 if tolerance is None else tolerance
    probs = {"cheap": 0.5, "mid": 0.55, "big": 0.9}
    eligible = [t for t in ("cheap", "mid", "big") if probs[t] >= 0.9 - tol]
    return {"target": eligible[0], "probabilities": probs, "expected_cost": {t: 0.0 for t in probs},
            "eligible": eligible, "tolerance": tol, "prompt_tokens": features["n_tokens"]}


def client(fail=(), token_env=None, monkeypatch=None):
    targets = {n: target(n, n in fail) for n in ("cheap", "mid", "big")}
    cfg = {"auth_token_env": token_env}
    ingress = RouterIngress(cfg, Handle(encode=encode), Handle(decide=decide), targets)
    return TestClient(make_fastapi_app(lambda: ingress)), ingress


MSG = [{"role": "user", "content": "hello"}]


def test_routes_with_tolerance_from_model_suffix():
    c, _ = client()
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 200 and r.headers["x-prefill-router-target"] == "big"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "big says hi" and body["route"]["target"] == "big"
    r = c.post("/v1/chat/completions", json={"model": "router:0.5", "messages": MSG})
    assert r.json()["model"] == "cheap" and float(r.headers["x-prefill-router-overhead-ms"]) >= 0
    r = c.post("/v1/chat/completions", json={"model": "mid", "messages": MSG})
    assert r.json()["model"] == "mid" and r.json()["route"] is None


def test_fallback_goes_to_next_eligible_then_502():
    c, ingress = client(fail=("cheap",))
    r = c.post("/v1/chat/completions", json={"model": "router:0.5", "messages": MSG})
    assert r.status_code == 200 and r.json()["model"] == "mid"
    assert r.headers["x-prefill-router-fallback-from"] == "cheap"
    metrics = c.get("/metrics").text
    assert 'prefill_router_fallbacks_total{failed_target="cheap",next_target="mid"} 1.0' in metrics
    c, _ = client(fail=("cheap", "mid", "big"))
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 502 and "every target failed" in r.json()["detail"]


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "router", "messages": []}).encode(), 422, "must not be empty"),
    (json.dumps({"model": "router", "messages": [{"role": "user", "content": "  "}]}).encode(), 422, "no text"),
    (json.dumps({"model": "router", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 422, "role"),
    (json.dumps({"model": "gpt-9", "messages": MSG}).encode(), 404, "unknown model"),
    (json.dumps({"model": "router:abc", "messages": MSG}).encode(), 404, "bad tolerance"),
    (json.dumps({"model": "router", "messages": MSG, "max_tokens": -1}).encode(), 422, "max_tokens"),
    (json.dumps({"model": "router", "messages": [{"role": "user", "content": "x" * 60}]}).encode(), 413, "PromptTooLong"),
])
def test_bad_requests_get_4xx_with_reason(body, status, reason):
    c, _ = client()
    r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"]


def test_stream_is_openai_sse_and_falls_back_before_first_token():
    c, _ = client(fail=("big",))
    with c.stream("POST", "/v1/chat/completions", json={"model": "router", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == "abc"
    assert chunks[0]["model"] != "big" and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_route_models_health_and_auth(monkeypatch):
    monkeypatch.setenv("ROUTER_TOKEN", "s3cret")
    c, _ = client(token_env="ROUTER_TOKEN")
    assert c.post("/v1/route", json={"messages": MSG}).status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    r = c.post("/v1/route", json={"messages": MSG, "tolerance": 0.5}, headers=auth)
    assert r.status_code == 200 and r.json()["target"] == "cheap" and r.json()["eligible"] == ["cheap", "mid", "big"]
    assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == ["router", "cheap", "mid", "big"]
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.post("/v1/route", json={"messages": MSG, "bogus": 1}, headers=auth).status_code == 422
    text = c.get("/metrics").text
    assert 'prefill_router_requests_total{endpoint="route",status="401"} 1.0' in text
    assert 'prefill_router_decisions_total{target="cheap"} 1.0' in text
