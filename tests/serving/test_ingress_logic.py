"""Request handling of the ingress with in-process stand-ins for the deployment handles.

These check the pure request logic (validation, fallback order, headers, metrics,
streaming format). The real app on a Ray cluster with real models is tested in
test_serving_app.py.
"""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.http_app import make_fastapi_app
from serving.ingress import RouterIngress
from serving.messages import EncodedPrompt, EncodeFailed, PromptRejected, PromptTooLong, StreamEnd, TargetAnswer, TokenCount
from serving.schemas import RouteDecision
from shared.policy import Policy


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


def target(name, fail=False, fail_mid_stream=False):
    async def generate(messages, max_tokens, temperature, sampling=None):
        if fail:
            raise RuntimeError(f"{name} is down")
        return TargetAnswer(f"{name} says hi", 3, 2, "length" if max_tokens <= 2 else "stop")

    async def stream(messages, max_tokens, temperature, sampling=None):
        if fail:
            raise RuntimeError(f"{name} is down")
        for piece in ("a", "b", "c"):
            yield piece
        if fail_mid_stream:
            raise RuntimeError(f"{name} died: actor 0xdeadbeef pid=4242 ip=10.1.2.3")
        yield StreamEnd("length" if max_tokens <= 3 else "stop", 3, 3)

    async def ready():
        if fail:
            raise RuntimeError(f"{name} is down")
        return {"target": name}

    return Handle(generate=generate, stream=stream, ready=ready)


LIMIT = 50


async def encode(messages):
    text = " ".join(m["content"] for m in messages)
    if len(text) > LIMIT:
        return PromptTooLong(len(text), LIMIT)
    return EncodedPrompt({}, len(text.split()), "enc", "art")


async def count_tokens(messages):
    return TokenCount(len(" ".join(m["content"] for m in messages)), LIMIT)


async def encoder_ready():
    return {"encoder": "enc"}


PROBS, COSTS = {"cheap": 0.5, "mid": 0.55, "big": 0.9}, {"cheap": 0.001, "mid": 0.01, "big": 0.1}


async def decide(features, rule):
    rule = rule or Policy.of("tolerance", 0.1)  # the artifact's rule
    order = [list(PROBS)[i] for i in rule.candidates(np.array([*PROBS.values()]), np.array([*COSTS.values()]))]
    return RouteDecision(target=order[0], probabilities=PROBS, expected_cost=COSTS, eligible=order,
                         **rule.fields(), prompt_tokens=features.n_tokens)


async def broken(*args):
    raise RuntimeError("ActorDiedError: the actor died unexpectedly")


def client(fail=(), token_env=None, encoder=None, **cfg):
    mid_stream = cfg.pop("fail_mid_stream", ())
    targets = {n: target(n, n in fail, n in mid_stream) for n in ("cheap", "mid", "big")}
    cfg = {"auth_token_env": token_env, "max_prompt_tokens": LIMIT, **cfg}
    encoder = encoder or Handle(encode=encode, count_tokens=count_tokens, ready=encoder_ready)
    ingress = RouterIngress(encoder, Handle(decide=decide, ready=encoder_ready), targets, cfg)
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
    (json.dumps({"model": "router:abc", "messages": MSG}).encode(), 422, "bad tolerance"),
    (json.dumps({"model": "router", "messages": MSG, "tolerance": 0.1, "value": 1}).encode(), 422, "at most one"),
    (json.dumps({"model": "router:0.1", "messages": MSG, "value": 1}).encode(), 422, "one routing policy"),
    (json.dumps({"model": "router", "messages": MSG, "value": -1}).encode(), 422, "value"),
    (json.dumps({"model": "router", "messages": MSG, "stream": "yes"}).encode(), 422, "stream"),
    (json.dumps({"model": "router", "messages": MSG, "max_tokens": -1}).encode(), 422, "max_tokens"),
    (json.dumps({"model": "router", "messages": [{"role": "user", "content": "x" * 60}]}).encode(), 413, "limit"),
    (json.dumps({"model": "mid", "messages": [{"role": "user", "content": "x" * 60}]}).encode(), 413, "limit"),
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
    c, ingress = client(token_env="ROUTER_TOKEN")
    assert c.post("/v1/route", json={"messages": MSG}).status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    r = c.post("/v1/route", json={"messages": MSG, "tolerance": 0.5}, headers=auth)
    assert r.status_code == 200 and r.json()["target"] == "cheap" and r.json()["eligible"] == ["cheap", "mid", "big"]
    # value policy: net values 0.1 * P - cost = 0.049, 0.045, -0.01 (cheap first); at 1.0: 0.499, 0.54, 0.8
    r = c.post("/v1/route", json={"messages": MSG, "value": 0.1}, headers=auth).json()
    assert (r["policy"], r["value"], r["tolerance"], r["eligible"]) == ("value", 0.1, None, ["cheap", "mid", "big"])
    r = c.post("/v1/route", json={"messages": MSG, "value": 1.0}, headers=auth).json()
    assert r["target"] == "big" and r["eligible"] == ["big", "mid", "cheap"]
    ingress.reconfigure({"auth_token_env": "ROUTER_TOKEN", "default_value": 0.1})  # the operator's default rule
    r = c.post("/v1/route", json={"messages": MSG}, headers=auth).json()
    assert (r["policy"], r["value"], r["target"]) == ("value", 0.1, "cheap")
    r = c.post("/v1/route", json={"messages": MSG, "tolerance": 0.0}, headers=auth).json()  # the request's wins
    assert (r["policy"], r["tolerance"], r["target"]) == ("tolerance", 0.0, "big")
    with pytest.raises(ValueError, match="at most one of default_tolerance and default_value"):
        ingress.reconfigure({"default_tolerance": 0.1, "default_value": 0.1})
    assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == ["router", "cheap", "mid", "big"]
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.post("/v1/route", json={"messages": MSG, "bogus": 1}, headers=auth).status_code == 422
    text = c.get("/metrics").text
    assert 'prefill_router_requests_total{endpoint="route",status="401"} 1.0' in text
    assert 'prefill_router_decisions_total{target="cheap"} 3.0' in text


def test_auth_refuses_to_start_without_its_token(monkeypatch):
    monkeypatch.delenv("UNSET_ROUTER_TOKEN", raising=False)
    with pytest.raises(ValueError, match="UNSET_ROUTER_TOKEN is unset"):
        client(token_env="UNSET_ROUTER_TOKEN")


def test_reconfigure_applies_in_place_and_a_bad_config_changes_nothing(monkeypatch):
    """Serve's user_config update: auth and fallback change on the live ingress; a config naming an
    unset token variable or an unserved fallback raises and leaves the running settings as they were."""
    monkeypatch.setenv("ROUTER_TOKEN", "s3cret")
    c, ingress = client()
    assert c.get("/v1/models").status_code == 200
    ingress.reconfigure({"auth_token_env": "ROUTER_TOKEN", "fallback_target": "mid", "max_prompt_tokens": LIMIT})
    assert c.get("/v1/models").status_code == 401 and ingress.cfg.fallback_target == "mid"
    monkeypatch.delenv("UNSET_ROUTER_TOKEN", raising=False)
    with pytest.raises(ValueError, match="UNSET_ROUTER_TOKEN is unset"):
        ingress.reconfigure({"auth_token_env": "UNSET_ROUTER_TOKEN"})
    with pytest.raises(ValueError, match="not served"):
        ingress.reconfigure({"auth_token_env": "ROUTER_TOKEN", "fallback_target": "nowhere"})
    assert ingress.token == "s3cret" and ingress.cfg.fallback_target == "mid" and ingress.cfg.max_prompt_tokens == LIMIT
    assert c.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_bearer_scheme_is_case_insensitive_and_401_says_how(monkeypatch):
    monkeypatch.setenv("ROUTER_TOKEN", "s3cret")
    c, _ = client(token_env="ROUTER_TOKEN")
    r = c.get("/v1/models", headers={"authorization": "bearer s3cret"})
    assert r.status_code == 200
    r = c.get("/v1/models", headers={"authorization": "Basic s3cret"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


def test_non_json_content_type_is_415_and_route_takes_model():
    c, _ = client()
    r = c.post("/v1/chat/completions", content=json.dumps({"messages": MSG}), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = c.post("/v1/route", json={"model": "router:0.5", "messages": MSG})
    assert r.status_code == 200 and r.json()["target"] == "cheap"
    assert float(r.headers["x-prefill-router-overhead-ms"]) >= 0
    assert c.post("/v1/route", json={"model": "mid", "messages": MSG}).status_code == 422


def test_dead_router_degrades_to_fallback_target_or_503():
    dead = Handle(encode=broken, count_tokens=broken, ready=broken)
    c, _ = client(encoder=dead, fallback_target="mid", max_prompt_tokens=1000)
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 200 and r.json()["model"] == "mid"
    assert r.headers["x-prefill-router-degraded"].startswith("router unavailable")
    assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["checks"]["encoder"] != "ok"
    long = [{"role": "user", "content": "x" * 2000}]  # cannot be checked against the limit without the encoder
    assert c.post("/v1/chat/completions", json={"model": "router", "messages": long}).status_code == 503
    c, _ = client(encoder=dead)
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 503 and "no fallback_target" in r.json()["detail"]
    assert r.json()["error"]["message"] == r.json()["detail"]


def test_readyz_needs_encoder_head_and_one_target():
    c, _ = client(fail=("cheap", "mid"))
    assert c.get("/readyz").status_code == 200
    c, _ = client(fail=("cheap", "mid", "big"))
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["targets"]["big"].startswith("not ready")


def test_stream_mid_failure_is_an_error_event_without_internals():
    c, _ = client(fail_mid_stream=("big",))
    with c.stream("POST", "/v1/chat/completions", json={"model": "big", "messages": MSG, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    events = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
    assert "error" in events[-1] and events[-1]["error"]["code"] == "target_failed"
    assert not any(ev.get("choices") and ev["choices"][0]["finish_reason"] for ev in events)
    assert "pid" not in lines[-2] and "10.1.2.3" not in lines[-2] and "0xdeadbeef" not in lines[-2]


def test_stream_finish_reason_and_usage_follow_openai():
    c, _ = client()
    body = {"model": "mid", "messages": MSG, "stream": True, "max_tokens": 3,
            "stream_options": {"include_usage": True}}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 6
    assert all(ev["usage"] is None for ev in events[:-1])
    r = c.post("/v1/chat/completions", json={"model": "mid", "messages": MSG, "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_request_fault_is_answered_not_retried_elsewhere():
    from serving.messages import TargetRequestError

    calls = []

    def refusing(name):
        async def generate(messages, max_tokens, temperature, sampling=None):
            calls.append(name)
            raise TargetRequestError(413, f"the prompt is over {name}'s context limit")

        return Handle(generate=generate)

    ingress = RouterIngress(Handle(encode=encode, count_tokens=count_tokens), Handle(decide=decide),
                            {"cheap": refusing("cheap"), "mid": refusing("mid")}, {"max_prompt_tokens": 1000})
    r = TestClient(make_fastapi_app(lambda: ingress)).post("/v1/chat/completions", json={"model": "mid", "messages": MSG})
    assert r.status_code == 413 and "mid's context limit" in r.json()["detail"]
    assert calls == ["mid"]
    import pickle

    again = pickle.loads(pickle.dumps(TargetRequestError(413, "too long")))  # how Ray carries it to the ingress
    assert (again.status, again.reason) == (413, "too long")


def test_a_target_call_timeout_changes_in_place():
    """Serve's user_config update of a Target replica: an endpoint's client takes the new bound."""
    from serving.targets import TargetReplica

    spec = {"name": "remote", "role": "target", "backend": "openai", "source": "openai",
            "base_url": "http://127.0.0.1:9/v1"}
    target = TargetReplica(spec, timeout_s=120)
    assert target.backend.client.timeout.read == 120
    target.reconfigure({"timeout_s": 3})
    assert target.backend.client.timeout.read == target.backend.client.timeout.connect == 3
    with pytest.raises(ValueError, match="timeout_s"):
        target.reconfigure({"timeout_s": 0})
    assert target.backend.client.timeout.read == 3


SURROGATE = '{"model": %s, "messages": [{"role": "user", "content": %s}]}'


@pytest.mark.parametrize("path, model, content", [
    ("/v1/chat/completions", '"router"', '"a\\ud800b"'),  # routed
    ("/v1/chat/completions", '"mid"', '"a\\ud800b"'),  # pinned: no encoder call at all
    ("/v1/chat/completions", '"mid"', '[{"type": "text", "text": "\\udfff"}]'),  # inside a content part
    ("/v1/route", '"router"', '"a\\ud800b"'),
    ("/v1/chat/completions", '"\\ud83d"', '"hello"'),  # the model name (404 would echo it, unencodable)
])
def test_lone_surrogates_are_a_400_of_their_own_on_every_path(path, model, content):
    c, ingress = client()
    r = c.post(path, content=(SURROGATE % (model, content)).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone UTF-16 surrogate" in r.json()["detail"] and r.json()["error"]["type"] == "invalid_request_error"
    assert "prefill_router_errors_total{kind=\"router\"}" not in c.get("/metrics").text


def test_encoder_answers_for_one_prompt_are_4xx_or_503_for_that_prompt_only():
    async def rejecting(messages):
        return PromptRejected("the encoder cannot tokenize the prompt (TypeError: bad text); send valid UTF-8 text")

    async def failing(messages):
        return EncodeFailed("RuntimeError", "the forward pass failed on this prompt")

    c, _ = client(encoder=Handle(encode=rejecting, count_tokens=rejecting, ready=encoder_ready))
    for model in ("router", "mid"):  # routed (encode) and pinned over the length bound (count_tokens)
        content = "x" * (1 if model == "router" else 400)
        r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 400 and "cannot tokenize" in r.json()["detail"], r.text
    metrics = c.get("/metrics").text
    assert 'prefill_router_errors_total{kind="request"} 2.0' in metrics and 'kind="router"' not in metrics
    c, _ = client(encoder=Handle(encode=failing, count_tokens=count_tokens, ready=encoder_ready))
    r = c.post("/v1/route", json={"messages": MSG})
    assert r.status_code == 503 and "(RuntimeError)" in r.json()["detail"] and r.headers["retry-after"] == "5"
    c, _ = client(encoder=Handle(encode=failing, count_tokens=count_tokens, ready=encoder_ready),
                  fallback_target="cheap")
    r = c.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 200 and r.headers["x-prefill-router-degraded"] == "router unavailable (RuntimeError)"


def test_the_length_bound_never_raises_on_text_that_is_not_unicode():
    from serving.messages import surely_within

    assert surely_within([{"role": "user", "content": "a\ud800b"}], 1000)
    assert not surely_within([{"role": "user", "content": "\ud800" * 400}], 1000)  # 3 bytes each
