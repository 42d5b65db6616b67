"""The decision log's writer, exploration and the ingress's records, with in-process stand-ins for the
deployments (the real Serve app over HTTP: test_decision_log_app.py)."""

import json
import random
import time
from collections import Counter

import pytest

from serving.config import DecisionLogConfig, ExplorationConfig
from serving.decision_log import LogWriter
from serving.exploration import candidates, explore
from serving.schemas import RouteDecision
from shared.decision_log import DecisionRecord, FeedbackRecord, list_parts, per_target, prompt_hash, read_log
from tests.serving.test_ingress_logic import MSG, client

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def record(i: int) -> DecisionRecord:
    return DecisionRecord(request_id=f"r{i}", endpoint="chat", model="router", prompt_hash=prompt_hash([]))


def wait_for(check, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_parts_rotate_by_count_and_by_age_and_close_writes_the_rest(tmp_path):
    drops = []
    cfg = DecisionLogConfig(uri=str(tmp_path), part_records=3, part_s=0.3)
    writer = LogWriter(cfg, DecisionRecord, lambda reason, n: drops.append((reason, n)))
    for i in range(7):
        writer.put(record(i))
    wait_for(lambda: len(list_parts(str(tmp_path), "decisions")) >= 3)  # 3 + 3 by count, the last 1 by age
    writer.put(record(7))
    writer.close()
    ids = read_log(str(tmp_path), "decisions").column("request_id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(8)) and not drops and writer.written == 8
    writer.close()  # twice is fine


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path):
    drops = []
    cfg = DecisionLogConfig(uri=str(tmp_path), queue_records=2, part_records=1000, part_s=60)
    writer = LogWriter(cfg, DecisionRecord, lambda reason, n: drops.append((reason, n)))
    writer._stop.set()  # the thread drains and stops: the queue fills
    writer._thread.join(5)
    start = time.monotonic()
    for i in range(5):
        writer.put(record(i))
    assert time.monotonic() - start < 0.5 and drops == [("queue_full", 1)] * 3 and writer.dropped == 3


def test_storage_down_drops_and_counts_the_part_and_says_so(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    drops = []
    cfg = DecisionLogConfig(uri=str(blocked / "log"), part_records=2, retries=1)
    writer = LogWriter(cfg, DecisionRecord, lambda reason, n: drops.append((reason, n)))
    with caplog.at_level("ERROR", logger="serving.decision_log"):
        for i in range(2):
            writer.put(record(i))
        writer.close()
    assert drops == [("write_failed", 2)] and writer.written == 0
    assert any("could not write" in r.message and "requests are still answered" in r.message for r in caplog.records)


DECISION = RouteDecision(target="mid", probabilities={"cheap": 0.5, "mid": 0.6, "big": 0.9},
                         expected_cost={"cheap": 0.001, "mid": 0.01, "big": 0.1}, eligible=["mid", "cheap", "big"],
                         policy="tolerance", prompt_tokens=3)


def test_exploration_keeps_to_served_targets_under_the_cost_cap():
    assert candidates(DECISION, {"cheap", "mid", "big"}, 1.0) == ["cheap"]
    assert candidates(DECISION, {"cheap", "mid", "big"}, None) == ["cheap", "big"]
    assert candidates(DECISION, {"mid", "big"}, None) == ["big"]  # cheap is not served
    narrow = DECISION.model_copy(update={"eligible": ["mid"]})  # tolerance 0: the band is the choice alone
    assert candidates(narrow, {"cheap", "mid", "big"}, None) == ["cheap", "big"]  # still explored
    assert candidates(narrow, {"cheap", "mid", "big"}, 1.0) == ["cheap"]
    alike = DECISION.model_copy(update={"eligible": ["mid"], "expected_cost": dict.fromkeys(["cheap", "mid", "big"], 0.0)})
    assert candidates(alike, {"cheap", "mid", "big"}, 1.0) == ["cheap", "big"]  # equal prices: every target
    off = explore(DECISION, {"cheap", "mid", "big"}, ExplorationConfig(epsilon=0), random.Random(0))
    assert (off.target, off.explored, off.propensity) == ("mid", False, 1.0)


def test_exploration_frequencies_match_the_logged_propensities():
    cfg, rng = ExplorationConfig(epsilon=0.3, max_cost_ratio=None), random.Random(1)
    draws = [explore(DECISION, {"cheap", "mid", "big"}, cfg, rng) for _ in range(6000)]
    counts = Counter(d.target for d in draws)
    props = {d.target: d.propensity for d in draws}
    assert props == pytest.approx({"mid": 0.7, "cheap": 0.15, "big": 0.15})
    for name, p in props.items():
        assert counts[name] / len(draws) == pytest.approx(p, abs=0.02)
    assert all(d.explored == (d.target != "mid") for d in draws)


def logged_client(tmp_path, **cfg):
    log_cfg = {"uri": str(tmp_path / "log"), "part_s": 0.05, "keep_prompts": True}
    return client(decision_log=log_cfg, **cfg)


def records(ingress, tmp_path, n):
    wait_for(lambda: ingress.request_log.decisions.written >= n)
    return {r["request_id"]: r for r in read_log(str(tmp_path / "log"), "decisions").to_pylist()}


def test_each_answered_request_leaves_one_record_with_the_response_id(tmp_path):
    c, ingress = logged_client(tmp_path, fail=("mid",))
    routed = c.post("/v1/chat/completions", json={"model": "router:0.35", "messages": MSG})
    pinned = c.post("/v1/chat/completions", json={"model": "big", "messages": MSG, "max_tokens": 2})
    stream = c.post("/v1/chat/completions", json={"model": "router", "messages": MSG, "stream": True})
    route = c.post("/v1/route", json={"messages": MSG})
    too_long = c.post("/v1/chat/completions", json={"model": "big", "messages": [{"role": "user", "content": "x" * 99}]})
    bad = c.post("/v1/chat/completions", json={"model": "router"})  # 422 before any plan: no record
    assert [r.status_code for r in (routed, pinned, stream, route, too_long, bad)] == [200, 200, 200, 200, 413, 422]
    ids = [routed.json()["id"], pinned.json()["id"], json.loads(stream.text.split("\n")[0][6:])["id"],
           route.json()["id"], too_long.headers["x-prefill-router-request-id"]]
    assert routed.headers["x-prefill-router-request-id"] == ids[0] and stream.headers["x-prefill-router-request-id"] == ids[2]
    got = records(ingress, tmp_path, 5)
    assert set(got) == set(ids)
    r = got[ids[0]]  # routed: mid chosen (cheapest within 0.35 of the best), failed, big answered
    assert (r["chosen"], r["target"], r["fallback_from"], r["status"], r["propensity"]) == ("mid", "big", ["mid"], 200, 1.0)
    assert per_target(r["probabilities"])["big"] == 0.9 and r["response"] == "big says hi" and r["policy_param"] == 0.35
    assert json.loads(r["messages"]) == MSG and r["prompt_hash"] == prompt_hash(MSG) and r["policy"] == "tolerance"
    p = got[ids[1]]
    assert (p["model"], p["target"], p["policy"], p["propensity"], p["finish_reason"]) == ("big", "big", None, None,
                                                                                             "length")
    s = got[ids[2]]
    assert s["stream"] and s["response"] == "abc" and s["target"] == "big" and s["completion_tokens"] == 3
    assert got[ids[3]]["endpoint"] == "route" and got[ids[3]]["target"] == "big" and got[ids[3]]["response"] is None
    assert got[ids[4]]["status"] == 413 and "limit" in got[ids[4]]["error"]


def test_feedback_is_accepted_written_and_refused_with_reasons(tmp_path):
    c, ingress = logged_client(tmp_path)
    assert c.post("/v1/feedback", json={"request_id": "chatcmpl-x", "score": 0.25}).status_code == 202
    assert c.post("/v1/feedback", json={"request_id": "chatcmpl-y", "thumbs": "up", "comment": "ok"}).status_code == 202
    for body in ({"request_id": "a"}, {"request_id": "a", "score": 1.5}, {"request_id": "a", "score": 1, "thumbs": "up"},
                 {"request_id": "", "score": 1}, {"request_id": "a", "thumbs": "maybe"}, {"score": 1}):
        r = c.post("/v1/feedback", json=body)
        assert r.status_code == 422 and r.json()["error"]["message"], body
    wait_for(lambda: ingress.request_log.feedback.written == 2)
    rows = read_log(str(tmp_path / "log"), FeedbackRecord.KIND).to_pylist()
    assert {(r["request_id"], r["score"], r["comment"]) for r in rows} == {("chatcmpl-x", 0.25, None),
                                                                          ("chatcmpl-y", 1.0, "ok")}
    unlogged, _ = client()
    r = unlogged.post("/v1/feedback", json={"request_id": "a", "score": 1})
    assert r.status_code == 404 and "decision_log" in r.json()["detail"]


def test_exploration_in_the_ingress_logs_its_propensity_and_never_touches_pinned(tmp_path):
    c, ingress = logged_client(tmp_path, exploration={"epsilon": 1.0, "max_cost_ratio": None, "seed": 3})
    routed = [c.post("/v1/chat/completions", json={"model": "router:1", "messages": MSG}) for _ in range(6)]
    pinned = c.post("/v1/chat/completions", json={"model": "big", "messages": MSG})
    got = records(ingress, tmp_path, 7)
    for r in routed:
        row = got[r.json()["id"]]
        assert row["explored"] and row["target"] != row["chosen"] and row["propensity"] == pytest.approx(0.5)
        assert r.headers["x-prefill-router-target"] == row["target"]
    assert not got[pinned.json()["id"]]["explored"] and got[pinned.json()["id"]]["target"] == "big"


def test_a_new_log_config_in_place_writes_the_old_buffer_first(tmp_path):
    c, ingress = logged_client(tmp_path)
    ingress.reconfigure({"max_prompt_tokens": 50, "decision_log": {"uri": str(tmp_path / "log"), "part_s": 60}})
    first = c.post("/v1/chat/completions", json={"model": "big", "messages": MSG}).json()["id"]
    ingress.reconfigure({"max_prompt_tokens": 50, "decision_log": {"uri": str(tmp_path / "log2"), "part_s": 60}})
    assert read_log(str(tmp_path / "log"), "decisions").column("request_id").to_pylist() == [first]
    ingress.reconfigure({"max_prompt_tokens": 50})
    assert ingress.request_log.decisions is None
