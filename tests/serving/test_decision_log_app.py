"""The decision log, feedback and exploration (issue 36, parts 1-3) over real HTTP against the real Serve app.

One small app: the real encoder and router head on the artifact; its two targets served through a
loopback OpenAI-compatible endpoint (``echo-endpoint``: the log is under test, not the answers), plus
``down-endpoint`` (nothing listens there) for fallbacks; the log in a local folder. S3 is a loopback moto
server, set before Ray starts. The buffer written when the app stops (SIGTERM): test_serve_sigterm.py.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from shared.decision_log import read_log
from tests.serving.serving_fixtures import echo_app, metric

pytestmark = pytest.mark.slow
APP = "prefill-router"
SMOL, GEMMA, DOWN = "smollm2-135m", "gemma3-270m", "down-endpoint"
MSG = [{"role": "user", "content": "Name three colours of the rainbow, separated by commas."}]
DROPPED = 'prefill_router_log_dropped_total{kind="decisions",reason="write_failed"}'


@pytest.fixture(scope="module")
def app(tmp_path_factory, moto_s3):
    tmp = tmp_path_factory.mktemp("logged")
    log_cfg = {"uri": str(tmp / "log"), "keep_prompts": True, "part_s": 0.2}
    down = {"name": DOWN, "role": "target", "backend": "openai", "source": "openai", "base_url": "http://127.0.0.1:9/v1"}
    cfg = {"targets": [SMOL, GEMMA, DOWN], "endpoints": {SMOL: "echo-endpoint", GEMMA: "echo-endpoint"},
           "default_max_tokens": 12, "target_timeout_s": 30, "route_timeout_s": 30, "decision_log": log_cfg,
           "encoder_batch": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
           "target_defaults": {"num_cpus": 0.05}}
    with echo_app(tmp, [down], cfg) as client:
        client.log_uri, client.base = log_cfg["uri"], cfg
        yield client
    ray.shutdown()


@pytest.fixture
def plain(app):
    """The app as first configured (a test that changes the ingress's settings in place changed it)."""
    app.deploy_with()
    return app


def logged(app, ids, timeout_s=30.0):
    """The log's records of these request ids, once all are written."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {r["request_id"]: r for r in read_log(app.log_uri, "decisions").to_pylist() if r["request_id"] in ids}
        if len(rows) == len(set(ids)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def chat(app, **fields):
    return app.post("/v1/chat/completions", json={"model": "router", "messages": MSG, **fields})


def test_one_record_per_answered_request_routed_pinned_streamed_fallen_back_and_concurrent(plain):
    asks = [{}, {"model": SMOL}, {"model": DOWN}, {"stream": True}] * 6  # 24 at once
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda fields: chat(plain, **fields), asks))
    assert [r.status_code for r in answers] == [200] * len(asks)
    ids = [r.headers["x-prefill-router-request-id"] for r in answers]
    assert len(set(ids)) == len(ids)
    for r, fields in zip(answers, asks):
        body_id = (json.loads(r.text.split("\n")[0].removeprefix("data: ")) if fields.get("stream") else r.json())["id"]
        assert body_id == r.headers["x-prefill-router-request-id"]
    rows = logged(plain, ids)
    assert set(rows) == set(ids), f"{len(set(ids) - set(rows))} answered requests have no record"
    for r, fields in zip(answers, asks):
        row = rows[r.headers["x-prefill-router-request-id"]]
        assert row["status"] == 200 and row["target"] == r.headers["x-prefill-router-target"]
        assert json.loads(row["messages"]) == MSG and row["stream"] == bool(fields.get("stream"))
        if fields.get("model") == DOWN:  # pinned to a dead endpoint: the next target answered
            assert row["fallback_from"] == [DOWN] and row["policy"] is None and row["propensity"] is None
        elif "model" not in fields:  # routed: the head's decision, whole
            assert row["chosen"] in (SMOL, GEMMA) and row["propensity"] == 1.0 and not row["explored"]
            assert set(dict(row["probabilities"])) == {SMOL, GEMMA} and row["artifact"]
        assert row["response"] and row["latency_s"] > 0


def test_feedback_round_trips_into_an_import(plain, tmp_path):
    """An answer, its thumbs-down over HTTP, then ``data import format=decision-log`` on the log: the
    answering target's label for that prompt is the 0 the client gave (no other target is labelled)."""
    from training.data.import_config import ImportConfig
    from training.data.importer import run_import
    from training.labels import load_labels

    asked = [{"role": "user", "content": "Is a tomato a fruit? Answer yes or no."}]
    answer = plain.post("/v1/chat/completions", json={"model": "router", "messages": asked})
    rid, target = answer.json()["id"], answer.headers["x-prefill-router-target"]
    assert plain.post("/v1/feedback", json={"request_id": rid, "thumbs": "down"}).status_code == 202
    assert plain.post("/v1/feedback", json={"request_id": rid, "score": 2}).status_code == 422
    deadline = time.monotonic() + 30
    while not [r for r in read_log(plain.log_uri, "feedback").to_pylist() if r["request_id"] == rid]:
        assert time.monotonic() < deadline, "the feedback was never written"
        time.sleep(0.2)
    assert logged(plain, [rid])
    cfg = ImportConfig(format="decision-log", inputs=[plain.log_uri], output=str(tmp_path / "queries.parquet"),
                       labels=str(tmp_path / "labels"))
    report = run_import(cfg)
    assert report["decision_log"]["feedback unmatched"] == 0
    qid = next(r["query_id"] for r in read_queries(cfg.output) if r["messages"][0]["content"] == asked[0]["content"])
    labelled = {t: {r["query_id"]: r["correct"] for r in table.to_pylist() if r["status"] == "ok"}
                for t, table in load_labels(cfg.labels).items()}
    assert labelled[target][qid] == 0.0
    assert all(qid not in cells for t, cells in labelled.items() if t != target)


def read_queries(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(uri).to_pylist()


def test_a_storage_outage_drops_and_counts_records_and_fails_no_request(app):
    app.deploy_with(decision_log={"uri": "s3://no-such-bucket/log", "part_s": 0.2, "retries": 0})
    before = metric(app, DROPPED)
    answers = [chat(app, model=SMOL) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    deadline = time.monotonic() + 30
    while metric(app, DROPPED) < before + 4:
        assert time.monotonic() < deadline, f"dropped records not counted: {metric(app, DROPPED) - before}"
        time.sleep(0.2)


def test_exploration_respects_its_cost_cap_and_logs_its_propensity(app):
    """Epsilon 1 explores every routed request where the cap allows, whatever the policy's tolerance band
    (tolerance 0: the band is the choice alone, as with equal prices)."""
    app.deploy_with(default_tolerance=1.0, exploration={"epsilon": 1.0, "max_cost_ratio": None})
    free = [chat(app) for _ in range(2)]
    app.deploy_with(default_tolerance=0.0, exploration={"epsilon": 1.0, "max_cost_ratio": None})
    free += [chat(app) for _ in range(2)]
    app.deploy_with(default_tolerance=1.0, exploration={"epsilon": 1.0, "max_cost_ratio": 1e-9})
    capped = [chat(app) for _ in range(4)]
    rows = logged(app, [r.json()["id"] for r in free + capped])
    for r in free:
        row = rows[r.json()["id"]]
        assert row["explored"] and row["target"] != row["chosen"] and row["propensity"] == 1.0  # the one other target
        assert r.headers["x-prefill-router-target"] == row["target"] and r.json()["route"]["target"] == row["target"]
    for r in capped:  # nothing else is as cheap as a billionth of the choice
        row = rows[r.json()["id"]]
        assert not row["explored"] and row["target"] == row["chosen"] and row["propensity"] == 1.0
    pinned = logged(app, [chat(app, model=GEMMA).json()["id"]])
    assert not next(iter(pinned.values()))["explored"]
