"""`label judge` on a real local Ray cluster with the real SmolLM2 as judge: verdicts written as feedback
parts the importer reads, a rerun that skips every shard, and a parse failure that writes no row."""

import json
from pathlib import Path

import pytest

from shared import storage
from shared.config import load_config
from shared.decision_log import DECISIONS, FEEDBACK, DecisionRecord, list_parts, part_uri, prompt_hash, read_log
from training.label.judge import JudgeConfig
from training.label.judge_run import run_judge

pytestmark = [pytest.mark.slow, pytest.mark.system]  # a whole `label judge` run: the second stage of .ci/run

T0 = 1_750_000_000.0
QA = [("What is 2 + 2?", "4"), ("What is the capital of France?", "Paris"), ("Is ice cold?", "Yes, ice is cold."),
      ("What is 3 + 5?", "7")]
NEVER = r"(?!)(\d)"  # a pattern that can never match: every verdict is unparsable
TEMPLATE = ("Question: {prompt}\nAnswer: {response}\nRate the answer from 1 to 10. Reply with one number.")


def write_log(log: Path) -> str:
    """Four answered chats with their text kept, one without its prompt, one /v1/route decision."""
    records = []
    for i, (q, a) in enumerate(QA):
        messages = [{"role": "user", "content": q}]
        records.append(DecisionRecord(request_id=f"r{i}", time=T0 + i, endpoint="chat", model="router",
                                      target="smollm2-135m", response=a, prompt_hash=prompt_hash(messages),
                                      messages=json.dumps(messages)))
    hidden = [{"role": "user", "content": "secret"}]
    records.append(DecisionRecord(request_id="r-hidden", time=T0 + 10, endpoint="chat", model="router",
                                  target="smollm2-135m", response="ok", prompt_hash=prompt_hash(hidden)))
    records.append(DecisionRecord(request_id="r-route", time=T0 + 11, endpoint="route", model="router",
                                  target="smollm2-135m", prompt_hash=prompt_hash(hidden)))
    storage.write_parquet(DecisionRecord.table(records), part_uri(str(log), DECISIONS, T0, "w1", 0))
    return str(log)


def cfg_for(log: str, pattern: str = r"(\d+)") -> JudgeConfig:
    return load_config(JudgeConfig, None, [f"log={log}", "judge=smollm2-135m", "max_new_tokens=4", "shard_size=2",
                                           "batch_size=2", "progress=false"],
                       base={"template": TEMPLATE, "pattern": pattern})


def test_judge_smollm_writes_feedback_the_importer_reads_and_rerun_skips(ray_cluster, tmp_path):
    from training.data.import_config import ImportConfig
    from training.data.importer import run_import

    log = write_log(tmp_path / "log")
    summary = run_judge(cfg_for(log))
    assert summary["decisions"] == 6 and summary["eligible"] == 4 and summary["calls"] == 4
    assert summary["skipped"] == {"no prompt kept": 1, "route endpoint": 1, "already scored": 0}
    assert summary["judged"] + summary["unparsable"] == 4 and summary["failed"] == 0
    assert summary["shards"] == {"total": 2, "written": 2, "skipped": 0, "unfinished": 0}
    assert summary["cost_usd"] > 0
    rows = read_log(log, FEEDBACK).to_pylist()
    assert len(rows) == summary["judged"] and {r["source"] for r in rows} == {"judge:smollm2-135m"}
    assert all(0.0 <= r["score"] <= 1.0 and r["cost"] > 0 and r["comment"] for r in rows)
    assert {r["request_id"] for r in rows} <= {"r0", "r1", "r2", "r3"}
    parts = list_parts(log, FEEDBACK)
    assert len(parts) == 2 and all(f"-judge-{summary['identity']}-" in p for p in parts)
    stored = storage.read_json(storage.join(log, "judge", summary["identity"], "summary.json"))
    assert stored["judged"] == summary["judged"]

    mtimes = {p: Path(p).stat().st_mtime_ns for p in parts}
    again = run_judge(cfg_for(log))
    assert again["shards"] == {"total": 2, "written": 0, "skipped": 2, "unfinished": 0}
    assert again["calls"] == 0 and again["cost_usd"] == 0
    assert mtimes == {p: Path(p).stat().st_mtime_ns for p in list_parts(log, FEEDBACK)}

    # the importer reads the verdicts as judge labels, with no change (SmolLM2 greedy: 2 of 4 parse)
    assert summary["judged"] >= 1, summary["unparsable_sample"]
    cfg = load_config(ImportConfig, None, ["format=decision-log", f"inputs=[{log}]",
                                           f"output={tmp_path / 'q.parquet'}", f"labels={tmp_path / 'labels'}"])
    counts = run_import(cfg)["decision_log"]
    assert counts["decisions labelled"] == summary["judged"] and counts["feedback used"] == summary["judged"]


def test_unmatchable_pattern_writes_no_row_and_keeps_the_verdicts(ray_cluster, tmp_path):
    log = write_log(tmp_path / "log")
    summary = run_judge(cfg_for(log, NEVER))
    assert summary["unparsable"] == 4 and summary["judged"] == 0 and summary["cost_usd"] > 0
    assert summary["shards"]["written"] == 2 and len(summary["unparsable_sample"]) == 4
    assert read_log(log, FEEDBACK).num_rows == 0                  # no row, never a 0
    assert len(list_parts(log, FEEDBACK)) == 2                    # empty parts: the shards are done
    side = Path(summary["side_files"]) / "unparsable"
    kept = [r for p in side.glob("*.parquet") for r in storage.read_parquet(str(p)).to_pylist()]
    assert sorted(r["request_id"] for r in kept) == ["r0", "r1", "r2", "r3"]
    assert all(r["status"] == "unparsable" and r["verdict"] is not None for r in kept)
    assert run_judge(cfg_for(log, NEVER))["shards"]["skipped"] == 2
