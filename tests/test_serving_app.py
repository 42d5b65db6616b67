"""The Serve app on a real local Ray cluster with the real SmolLM2 and Gemma models, over real HTTP.

One app, deployed once, then updated twice (a target endpoint broken; the artifact
reloaded). The ``smol-remote`` target is an OpenAI-compatible endpoint: this same app
serving SmolLM2 on loopback.
"""

import json
import shutil

import httpx
import pytest
import yaml

from tests.procs import free_port
from tests.serving_fixtures import router_artifact

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve

    from serving.app import deploy
    from serving.config import ServeConfig
    from shared.config import read_yaml
    from shared.registry import DEFAULT_REGISTRY

    tmp = tmp_path_factory.mktemp("serve")
    artifact = router_artifact(tmp)
    port = free_port()
    registry = read_yaml(DEFAULT_REGISTRY)
    registry["models"] += [
        {"name": "smol-remote", "role": "target", "backend": "openai", "source": "openai",
         "base_url": f"http://127.0.0.1:{port}/v1", "remote_model": "smollm2-135m",
         "price_input_per_m": 0.03, "price_output_per_m": 0.06},
        {"name": "broken-endpoint", "role": "target", "backend": "openai", "source": "openai",
         "base_url": "http://127.0.0.1:9/v1"},
    ]
    reg_path = tmp / "models.yaml"
    reg_path.write_text(yaml.safe_dump(registry))
    cfg = {"artifact": artifact, "registry": str(reg_path), "http_port": port, "max_prompt_tokens": 200,
           "default_max_tokens": 12, "target_timeout_s": 90,
           "targets": ["smollm2-135m", "gemma3-270m", "smol-remote"],
           "target_overrides": {"smol-remote": {"num_cpus": 0.1}}}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(ServeConfig.model_validate(cfg))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180)

    def redeploy(artifact=None, **changes):
        deploy(ServeConfig.model_validate({**cfg, **changes}), artifact=artifact)

    yield {"client": client, "artifact": artifact, "tmp": tmp, "redeploy": redeploy, "cfg": cfg}
    client.close()
    serve.shutdown()
    ray.shutdown()


def test_health_models_and_route(app):
    c = app["client"]
    assert c.get("/healthz").json()["status"] == "ok"
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["router", "smollm2-135m", "gemma3-270m", "smol-remote"]
    r = c.post("/v1/route", json={"messages": MSG})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["target"] in ("smollm2-135m", "gemma3-270m") and d["target"] == d["eligible"][0]
    assert set(d["probabilities"]) == {"smollm2-135m", "gemma3-270m"}
    assert all(0 <= p <= 1 for p in d["probabilities"].values()) and d["prompt_tokens"] > 5
    assert d["artifact"] == app["artifact"]
    # tolerance 1: every target is eligible, so the cheapest one is chosen
    assert c.post("/v1/route", json={"messages": MSG, "tolerance": 1.0}).json()["target"] == "smollm2-135m"


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
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status", [
    (b"{oops", 400),
    (json.dumps({"model": "router", "messages": []}).encode(), 422),
    (json.dumps({"model": "nope", "messages": MSG}).encode(), 404),
    (json.dumps({"model": "router", "messages": [{"role": "user", "content": "word " * 400}]}).encode(), 413),
])
def test_bad_input_is_4xx_with_reason(app, body, status):
    r = app["client"].post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_metrics_count_requests_and_decisions(app):
    text = app["client"].get("/metrics").text
    assert 'prefill_router_requests_total{endpoint="chat_completions",status="200"}' in text
    assert "prefill_router_decisions_total" in text and "prefill_router_overhead_seconds_count" in text
    assert 'prefill_router_requests_total{endpoint="chat_completions",status="413"} 1.0' in text


def test_failing_target_falls_back(app):
    app["redeploy"](endpoints={"gemma3-270m": "broken-endpoint"})
    c = app["client"]
    r = c.post("/v1/chat/completions", json={"model": "gemma3-270m", "messages": MSG})
    assert r.status_code == 200, r.text
    assert r.headers["x-prefill-router-fallback-from"] == "gemma3-270m"
    assert r.json()["model"] != "gemma3-270m" and r.json()["choices"][0]["message"]["content"].strip()
    assert 'prefill_router_fallbacks_total{failed_target="gemma3-270m"' in c.get("/metrics").text
    app["redeploy"]()


def test_artifact_reload_in_place_and_bad_artifact_keeps_old(app):
    c = app["client"]
    fresh = app["tmp"] / "router-v2"
    shutil.copytree(app["artifact"], fresh)
    app["redeploy"](artifact=str(fresh))
    assert c.post("/v1/route", json={"messages": MSG}).json()["artifact"] == str(fresh)
    broken = app["tmp"] / "router-broken"
    shutil.copytree(app["artifact"], broken)
    (broken / "weights.safetensors").write_bytes(b"corrupt")
    app["redeploy"](artifact=str(broken))
    r = c.post("/v1/route", json={"messages": MSG})
    assert r.status_code == 200 and r.json()["artifact"] == str(fresh)


def test_publish_reloads_the_running_app(app):
    """The retraining pipeline's publish step copies the artifact and points the running app at it."""
    from training.publish import PublishConfig, ReloadServeConfig, publish

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
