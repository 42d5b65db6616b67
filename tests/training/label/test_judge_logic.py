"""Pure parts of `label judge`: verdict parsing and scale, the template, the config, the shards and
their resume (no model, no Ray), and the decision log's new feedback `cost` column."""

import json

import pyarrow as pa
import pytest

from shared import storage
from shared.backends import Completion
from shared.config import ConfigError, load_config
from shared.decision_log import DECISIONS, FEEDBACK, DecisionRecord, FeedbackRecord, list_parts, part_uri, \
    prompt_hash, read_log
from shared.registry import load_registry
from training.label.judge import (JudgeConfig, ScaleConfig, judge_chat, parse_verdict, plan_shards, render_prompt,
                                  render_template, shard_part_uri, to_unit, verdict_score)
from training.label.judge_run import UDF_SCHEMA, plan_run, verdict_row

T0 = 1_750_000_000.0
PATTERN = r"(?i)score[\s:=*]*(-?\d+(?:\.\d+)?)"


def cfg_for(log: str = "/nowhere", *extra: str) -> JudgeConfig:
    return load_config(JudgeConfig, None, [f"log={log}", "judge=smollm2-135m", *extra])


def decision(rid: str, t: float, prompt: str | None = "What is 2 + 2?", response: str | None = "4",
             **kw) -> DecisionRecord:
    messages = [{"role": "user", "content": prompt or "secret"}]
    return DecisionRecord(**{**dict(request_id=rid, time=T0 + t, endpoint="chat", model="router",
                                    target="smollm2-135m", response=response, prompt_hash=prompt_hash(messages),
                                    messages=json.dumps(messages) if prompt else None), **kw})


def write_decisions(log: str, records: list[DecisionRecord]) -> str:
    storage.write_parquet(DecisionRecord.table(records), part_uri(log, DECISIONS, records[0].time, "w1", 0))
    return log


# --------------------------------------------------------------------------- verdicts
def test_parse_verdict_first_match_wins_and_no_match_is_missing():
    assert parse_verdict("Score: 7", PATTERN) == 7.0
    assert parse_verdict("**Score**: 8.5 (score 2 for style)", PATTERN) == 8.5  # the first match
    assert parse_verdict("I cannot grade this.", PATTERN) is None
    assert parse_verdict(None, PATTERN) is None and parse_verdict("", PATTERN) is None
    assert parse_verdict("3 then 9", r"(\d+)") == 3.0
    assert parse_verdict("grade: x", r"grade: (\S+)") is None  # a match that is not a number


def test_scale_maps_to_unit_and_out_of_range_is_missing():
    scale = ScaleConfig(min=1, max=10)
    assert to_unit(1, scale) == 0.0 and to_unit(10, scale) == 1.0 and to_unit(5.5, scale) == pytest.approx(0.5)
    assert to_unit(0, scale) is None and to_unit(11, scale) is None and to_unit(None, scale) is None
    cfg = cfg_for()
    assert verdict_score("Score: 10", cfg) == 1.0 and verdict_score("Score: 1", cfg) == 0.0
    assert verdict_score("Score: 0", cfg) is None       # out of scale: missing, never a 0
    assert verdict_score("no number", cfg) is None
    with pytest.raises(ValueError, match="below"):
        ScaleConfig(min=5, max=5)


def test_template_rendering():
    one = [{"role": "user", "content": "What is {response}?"}]
    assert render_prompt(one) == "What is {response}?"
    many = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(many) == "system: Be brief.\n\nuser: Hi"
    # one pass: a placeholder inside the logged text stays text
    assert render_template("Q: {prompt} A: {response} {other}", "What is {response}?", "4") == \
        "Q: What is {response}? A: 4 {other}"
    cfg = cfg_for("/x", "system=You grade.", "template='P={prompt};R={response}'")
    assert judge_chat(cfg, one, "an answer") == [{"role": "system", "content": "You grade."},
                                                 {"role": "user", "content": "P=What is {response}?;R=an answer"}]
    assert judge_chat(cfg_for(), one, "x")[0]["role"] == "user"  # no system message by default


def test_config_refuses_bad_templates_patterns_and_windows():
    for bad, match in (("template='no placeholders {prompt}'", "response"), ("pattern='(a)(b)'", "exactly one"),
                       ("pattern='(unclosed'", "not a regex"), ("since=2025-07-01", "before"), ("typo=1", "typo")):
        with pytest.raises(ConfigError, match=match):
            cfg_for("/x", bad, "until=2025-06-01")
    cfg = cfg_for("/x", "since=2025-06-01", "until=2025-06-02T00:00:00Z")
    assert (cfg.since, cfg.until, cfg.source) == (1748736000.0, 1748822400.0, "judge:smollm2-135m")


def test_verdict_rows_ok_unparsable_failed():
    spec, cfg = load_registry().get("smollm2-135m"), cfg_for()
    row = {"request_id": "r1", "_shard": 0}
    ok = verdict_row(spec, cfg, row, Completion("Score: 10", 100, 3, 0.5), 0.1)
    assert (ok["status"], ok["score"], ok["cost"]) == ("ok", 1.0, spec.cost(100, 3)) and ok["latency_s"] == 0.5
    bad = verdict_row(spec, cfg, row, Completion("Great answer!", 100, 4), 0.1)
    assert (bad["status"], bad["score"], bad["verdict"]) == ("unparsable", None, "Great answer!")
    assert bad["cost"] == spec.cost(100, 4) and bad["latency_s"] == 0.1  # an unparsable verdict still cost
    failed = verdict_row(spec, cfg, row, Completion(None, None, None, 2.0, "EndpointError: down"), 0.1)
    assert (failed["status"], failed["score"], failed["cost"], failed["error"]) == ("failed", None, None,
                                                                                   "EndpointError: down")


# --------------------------------------------------------------------------- shards
def test_plan_shards_orders_skips_and_counts():
    records = [decision("b", 2), decision("a", 2), decision("c", 1), decision("d", 3, prompt=None),
               decision("e", 4, response=None), decision("f", 5, endpoint="route"), decision("g", 6, status=500),
               decision("h", 7, messages="not json"), decision("a", 8)]
    shards, skipped = plan_shards(DecisionRecord.table(records), 2)
    assert [[m["request_id"] for m in s] for s in shards] == [["c", "a"], ["b"]]   # by time, then request id
    assert skipped == {"no prompt kept": 1, "no response kept": 1, "route endpoint": 1, "status not 200": 1,
                       "unreadable messages": 1, "duplicate request id": 1}


def test_part_names_are_deterministic_and_found_by_list_parts(tmp_path):
    log = str(tmp_path / "log")
    members = [{"request_id": "a", "time": T0}, {"request_id": "b", "time": T0 + 5}]
    uri = shard_part_uri(log, "abc123", 3, members)
    assert uri == shard_part_uri(log, "abc123", 3, list(members))
    assert uri != shard_part_uri(log, "abc123", 3, members[:1])          # other members, another part
    assert uri.rsplit("/", 1)[-1].startswith("part-20250615T150645-judge-abc123-")
    storage.write_parquet(FeedbackRecord.table([]), uri)
    assert list_parts(log, FEEDBACK) == [uri]


def test_read_log_fills_columns_older_parts_lack(tmp_path):
    log = str(tmp_path / "log")
    old = pa.table({"request_id": ["r1"], "time": [T0], "score": [1.0], "source": ["user"], "comment": [None]},
                   schema=pa.schema([f for f in FeedbackRecord.SCHEMA if f.name != "cost"]))
    storage.write_parquet(old, part_uri(log, FEEDBACK, T0, "old", 0))
    new = FeedbackRecord(request_id="r2", time=T0 + 1, score=0.5, source="judge:x", cost=2e-6)
    storage.write_parquet(FeedbackRecord.table([new]), part_uri(log, FEEDBACK, T0 + 1, "new", 0))
    table = read_log(log, FEEDBACK)
    assert table.schema.equals(FeedbackRecord.SCHEMA)
    assert [(r["request_id"], r["cost"]) for r in table.to_pylist()] == [("r1", None), ("r2", 2e-6)]
    with pytest.raises(ValueError):
        FeedbackRecord(request_id="r", score=1.0, cost=-1.0)


def result(rid: str, shard: int, status: str, score: float | None = None) -> dict:
    return {"request_id": rid, "status": status, "score": score, "verdict": f"verdict {rid}", "input_tokens": 10,
            "output_tokens": 2, "cost": None if status == "failed" else 1e-6, "latency_s": 0.1,
            "error": "down" if status == "failed" else None, "_shard": shard}


def test_shards_resume_failed_calls_and_keep_unparsable_out(tmp_path):
    """Without Ray: a shard with a failed call stays unwritten, its other verdicts are carried to the
    rerun, which asks only for the failed one; an unparsable verdict writes no row; done shards are skipped."""
    log = write_decisions(str(tmp_path / "log"), [decision(r, i) for i, r in enumerate("abcd")])
    cfg = cfg_for(log, "shard_size=2")
    shards, _ = plan_shards(read_log(log, DECISIONS), 2)
    side = str(tmp_path / "side")
    pending, writer, planned = plan_run(cfg, shards, side, "id1")
    assert pending.column("request_id").to_pylist() == list("abcd") and planned == {"skipped": 0,
                                                                                    "already scored": 0}
    writer.add(pa.Table.from_pylist([result("a", 0, "ok", 0.5), result("b", 0, "unparsable"),
                                     result("c", 1, "ok", 1.0), result("d", 1, "failed")], schema=UDF_SCHEMA))
    assert writer.written == [0] and writer.failed == [1] and writer.counts == {"judged": 1, "unparsable": 1}
    rows = read_log(log, FEEDBACK).to_pylist()
    assert [(r["request_id"], r["score"], r["source"], r["cost"]) for r in rows] == [
        ("a", 0.5, "judge:smollm2-135m", 1e-6)]                                # b: no row, never a 0
    assert writer.sample == [{"request_id": "b", "verdict": "verdict b"}]
    kept = [storage.read_parquet(str(p)).to_pylist() for p in (tmp_path / "side" / "unparsable").glob("*.parquet")]
    assert [[(r["request_id"], r["verdict"]) for r in rows] for rows in kept] == [[("b", "verdict b")]]

    pending, writer, planned = plan_run(cfg, shards, side, "id1")             # the rerun
    assert pending.column("request_id").to_pylist() == ["d"] and planned["skipped"] == 1
    writer.add(pa.Table.from_pylist([result("d", 1, "ok", 0.0)], schema=UDF_SCHEMA))
    assert writer.written == [1] and not writer.failed
    assert sorted((r["request_id"], r["score"]) for r in read_log(log, FEEDBACK).to_pylist()) == [
        ("a", 0.5), ("c", 1.0), ("d", 0.0)]
    assert not list((tmp_path / "side" / "failed").glob("*.parquet"))        # the failed file is gone
    pending, _, planned = plan_run(cfg, shards, side, "id1")
    assert pending.num_rows == 0 and planned["skipped"] == 2


def test_skip_scored_leaves_this_judges_and_the_users_requests_out(tmp_path):
    log = write_decisions(str(tmp_path / "log"), [decision(r, i) for i, r in enumerate("abc")])
    scores = [FeedbackRecord(request_id="a", time=T0, score=1.0, source="judge:smollm2-135m"),
              FeedbackRecord(request_id="b", time=T0, score=1.0, source="user"),          # not this judge
              FeedbackRecord(request_id="c", time=T0, score=1.0, source="judge:other")]
    storage.write_parquet(FeedbackRecord.table(scores), part_uri(log, FEEDBACK, T0, "w1", 0))
    shards, _ = plan_shards(read_log(log, DECISIONS), 1)
    pending, writer, planned = plan_run(cfg_for(log, "shard_size=1"), shards, str(tmp_path / "side"), "id1")
    assert pending.column("request_id").to_pylist() == ["c"] and planned["already scored"] == 2  # a: this judge, b: a user
    assert writer.written == [0, 1]                      # nothing left to judge in shards 0 and 1: empty parts, done
    pending, _, planned = plan_run(cfg_for(log, "shard_size=1", "skip_user_scored=false"), shards,
                                   str(tmp_path / "side3"), "id3")
    assert pending.column("request_id").to_pylist() == ["b", "c"] and planned["already scored"] == 1
    pending, _, planned = plan_run(cfg_for(log, "shard_size=1", "skip_scored=false", "skip_user_scored=false"), shards,
                                   str(tmp_path / "side2"), "id2")
    assert pending.column("request_id").to_pylist() == ["a", "b", "c"] and planned["already scored"] == 0
