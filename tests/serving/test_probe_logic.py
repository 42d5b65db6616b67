"""The request logic behind issue 35's probe findings, with in-process stand-ins for the handles
(the same behaviours over real HTTP against the real app: test_serving_probe.py)."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from serving.faults import _GONE, ReplicasGone, _key, bounded, live_replicas, min_replicas, warm
from serving.messages import TargetAnswer
from shared.backends import Sampling, StopCutter
from shared.errors import ConfigError
from tests.serving.test_ingress_logic import MSG, Handle, client


@pytest.mark.parametrize("pieces, stops, want, stopped", [
    (["Hello, wor", "ld = 4"], ["="], "Hello, world ", True),
    (["a", "b", "<", "/s", ">tail"], ["</s>"], "ab", True),
    (["no stop ", "here <"], ["</s>"], "no stop here <", False),
    (["x=1"], [], "x=1", False),
])
def test_stop_cutter_cuts_before_the_first_stop_string_across_pieces(pieces, stops, want, stopped):
    cutter = StopCutter(stops)
    out = "".join(cutter.feed(p) for p in pieces) + cutter.flush()
    assert out == want and cutter.stopped is stopped
    assert StopCutter(stops).cut("".join(pieces)) == want


@pytest.mark.parametrize("fields, status, named", [
    ({"n": 2}, 400, "n"), ({"n": 0}, 422, "n"), ({"n": -1}, 422, "n"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, 400, "tools"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"), ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"whatever": True}, 400, "whatever"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, *MSG]}, 400,
     "messages.0.tool_calls"), ({"stop": ["a"] * 5}, 422, "stop"), ({"stop": [""]}, 422, "stop"),
])
def test_a_field_that_would_be_dropped_is_refused_naming_it(fields, status, named):
    c, _ = client()
    r = c.post("/v1/chat/completions", json={"model": "mid", "messages": MSG, **fields})
    assert r.status_code == status and r.json()["detail"].startswith(f"{named}:"), r.text
    assert r.json()["error"]["code"] == status


def test_harmless_fields_and_no_op_values_are_accepted_and_stop_and_seed_reach_the_target():
    seen = []

    async def generate(messages, max_tokens, temperature, sampling):
        seen.append(sampling)
        return TargetAnswer("ok", 1, 1, "stop", 0.25)

    c, ingress = client()
    ingress.targets["mid"] = Handle(generate=generate)
    echoed = {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": None, "annotations": [],
              "name": "bot"}
    body = {"model": "mid", "messages": [*MSG, echoed, *MSG], "user": "u", "metadata": {"a": "b"}, "top_p": 1, "n": 1,
            "logprobs": False, "response_format": {"type": "text"}, "tools": [], "stop": "=", "seed": 5}
    assert c.post("/v1/chat/completions", json=body).status_code == 200
    assert seen == [Sampling(("=",), 5)]


def test_an_endpoint_gets_stop_and_seed_passed_on_and_only_when_asked():
    from shared.registry import ModelSpec
    from shared.targets.openai import chat_body

    spec = ModelSpec(name="e", role="target", backend="openai", source="openai", base_url="http://x/v1")
    msgs = [{"role": "user", "content": "q"}]
    assert chat_body(spec, msgs, 5, 0.7, False, Sampling(("=", "\n"), 3)) == {
        "model": "e", "messages": msgs, "max_tokens": 5, "temperature": 0.7, "stream": False, "stop": ["=", "\n"],
        "seed": 3}
    assert "stop" not in chat_body(spec, msgs, 5, 0.0) and "seed" not in chat_body(spec, msgs, 5, 0.0)


def test_nan_temperature_is_not_finite_rather_than_over_two():
    c, _ = client()
    r = c.post("/v1/chat/completions", content=b'{"model": "mid", "messages": [{"role": "user", "content": "hi"}], '
               b'"temperature": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["detail"] and "2" not in r.json()["detail"]


def test_unknown_path_and_wrong_method_carry_the_openai_error():
    c, _ = client()
    for r, status in ((c.get("/nope"), 404), (c.put("/v1/route"), 405)):
        assert r.status_code == status and r.json()["error"] == {
            "message": r.json()["detail"], "type": "invalid_request_error", "code": status}


def test_auth_probes_puts_health_ready_and_metrics_behind_the_token(monkeypatch):
    monkeypatch.setenv("PR_T", "tok")
    for probes, status in ((False, 200), (True, 401)):
        c, _ = client(token_env="PR_T", auth_probes=probes)
        assert [c.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")] == [status] * 3
        assert c.get("/healthz", headers={"authorization": "Bearer tok"}).status_code == 200


def test_request_duration_and_queue_time_are_in_metrics():
    async def generate(messages, max_tokens, temperature, sampling):
        await asyncio.sleep(0.3)  # 0.1 s queued before the target's own 0.2 s of work
        return TargetAnswer("ok", 1, 1, "stop", 0.2)

    c, ingress = client()
    ingress.targets["mid"] = Handle(generate=generate)
    assert c.post("/v1/chat/completions", json={"model": "mid", "messages": MSG}).status_code == 200
    assert c.post("/v1/route", json={"messages": [{"role": "user", "content": "x" * 60}]}).status_code == 413
    text = c.get("/metrics").text
    sample = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert 0.09 < sample['prefill_router_queue_seconds_sum{target="mid"}'] < 0.3
    assert sample['prefill_router_request_duration_seconds_sum{endpoint="chat_completions",status="200"}'] >= 0.3
    assert sample['prefill_router_request_duration_seconds_count{endpoint="route",status="413"}'] == 1


def serve_like(n_replicas, floor=1, populated=None):
    """A stand-in with the attributes of a Serve handle's router that :func:`live_replicas`,
    :func:`min_replicas` and :func:`seen_live` read (``populated``: whether the router has heard of a
    running replica; by default, whether it starts with one)."""
    seen = n_replicas > 0 if populated is None else populated
    router = SimpleNamespace(request_router=SimpleNamespace(curr_replicas={f"r{i}": object()
                                                                          for i in range(n_replicas)}),
                             _metrics_manager=SimpleNamespace(autoscaling_config=SimpleNamespace(min_replicas=floor)),
                             running_replicas_populated=lambda: seen)
    return SimpleNamespace(_router=SimpleNamespace(_asyncio_router=router))


@pytest.mark.parametrize("floor", [1, 0])
def test_a_replica_dropped_before_the_call_fails_at_once_unless_the_deployment_scales_to_zero(floor):
    """The controller can drop a dead replica before any call meets its death: a handle that had live
    replicas and finds none, with a floor of 1, is down; with a floor of 0 it scaled to zero."""
    async def run():
        handle = serve_like(1, floor)
        done = asyncio.get_running_loop().create_future()
        done.set_result("ok")
        assert await bounded(done, 1, handle, "t") == "ok"
        handle._router._asyncio_router.request_router.curr_replicas.clear()
        start = time.monotonic()
        try:
            await bounded(asyncio.get_running_loop().create_future(), 0.5, handle, "t")
        except (ReplicasGone, asyncio.TimeoutError) as exc:
            return type(exc), time.monotonic() - start

    kind, took = asyncio.run(run())
    assert kind is (ReplicasGone if floor else asyncio.TimeoutError)
    assert took < (0.1 if floor else 1.0)
    assert min_replicas(serve_like(1, 3)) == 3 and min_replicas(Handle()) is None


def test_a_call_whose_replicas_all_die_fails_at_once_but_scale_from_zero_is_waited_for():
    async def run():
        handle = serve_like(1)
        never = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.3, handle._router._asyncio_router.request_router.curr_replicas.clear)
        start = time.monotonic()
        with pytest.raises(ReplicasGone):
            await bounded(never, 30, handle, "t")
        gone_after = time.monotonic() - start
        with pytest.raises(asyncio.TimeoutError):  # no replica at the start: Serve is starting one
            await bounded(asyncio.get_running_loop().create_future(), 0.5, serve_like(0), "t")
        return gone_after, never.cancelled()

    gone_after, cancelled = asyncio.run(run())
    assert gone_after < 1.5 and cancelled
    assert live_replicas(Handle()) is None and live_replicas(serve_like(2)) == 2


def test_a_dead_deployment_is_remembered_by_deployment_not_by_handle_object():
    """Streaming makes a new handle per call (``.options(stream=True)``) sharing the deployment: the
    hold after its replicas died applies to all of them, and never to another deployment's handle."""
    async def run():
        dead = serve_like(0, populated=False)
        dead.deployment_id = ("app", "Target-a")
        copy, other = serve_like(0, populated=False), serve_like(0, populated=False)
        copy.deployment_id, other.deployment_id = ("app", "Target-a"), ("app", "Target-b")
        _GONE[_key(dead)] = time.monotonic()
        with pytest.raises(ReplicasGone):
            await bounded(asyncio.get_running_loop().create_future(), 0.5, copy, "a")
        with pytest.raises(asyncio.TimeoutError):  # never heard of a replica, floor 1: still starting
            await bounded(asyncio.get_running_loop().create_future(), 0.3, other, "b")

    asyncio.run(run())


def test_warm_starts_an_uninitialised_serve_handle_and_leaves_the_rest():
    started = []
    cold = SimpleNamespace(is_initialized=False, _init=lambda: started.append("cold"))
    hot = SimpleNamespace(is_initialized=True, _init=lambda: started.append("hot"))
    for handle in (cold, hot, object()):
        warm(handle)
    assert started == ["cold"]


def dying_handle():
    """A Serve-like handle with one replica that dies once called: the call hangs, as Serve holds it
    for a replacement, while the handle's router drops the dead replica."""
    handle = serve_like(1)
    replicas = handle._router._asyncio_router.request_router.curr_replicas

    async def dies(*args):
        replicas.clear()
        await asyncio.sleep(60)

    for name in ("generate", "encode", "count_tokens", "ready"):
        setattr(handle, name, SimpleNamespace(remote=dies))
    return handle


def test_a_dead_target_is_passed_over_and_a_dead_encoder_degrades_without_waiting():
    c, ingress = client(fallback_target="big", target_timeout_s=30, route_timeout_s=30, max_prompt_tokens=4096)
    ingress.targets["mid"] = dying_handle()
    start = time.monotonic()
    r = c.post("/v1/chat/completions", json={"model": "mid", "messages": MSG})
    assert r.status_code == 200 and r.headers["x-prefill-router-fallback-from"] == "mid", r.text
    ingress.encoder = dying_handle()
    r = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG})
    assert r.status_code == 200 and r.headers["x-prefill-router-degraded"] == "router unavailable (ReplicasGone)"
    r = c.post("/v1/chat/completions", json={"model": "mid", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 503 and "ReplicasGone" in r.json()["detail"]  # the dead encoder cannot count it
    assert time.monotonic() - start < 3


def test_serve_run_refuses_an_unset_token_variable_before_starting_anything(monkeypatch):
    from serving import app
    from serving.config import ServeConfig

    monkeypatch.delenv("PR_UNSET_TOKEN", raising=False)
    monkeypatch.setattr(app, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    cfg = ServeConfig(artifact="data/router", auth_token_env="PR_UNSET_TOKEN")
    with pytest.raises(ConfigError, match="PR_UNSET_TOKEN is unset or empty"):
        app.run_serve(cfg, blocking=False, address="local")
