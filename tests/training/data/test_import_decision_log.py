"""`prefill-router data import format=decision-log`: the Serve app's decision log (shared.decision_log)
and its feedback become a query table and label folders: one label per (query, target) the log
observed with a score (users' first, else judges'), every other cell masked, never a 0."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shared import storage
from shared.config import ConfigError, load_config
from shared.decision_log import DECISIONS, FEEDBACK, DecisionRecord, FeedbackRecord, part_uri, prompt_hash
from shared.errors import BadInput, MissingInput
from training.data.import_config import ImportConfig
from training.data.importer import PROPENSITY_FILE, run_import
from training.queries import QUERY_SCHEMA

A, B = "smollm2-135m", "gpt-4o-mini"        # registry names, as the Serve app logs them
T0 = 1_750_000_000.0                         # 2025-06-15T15:06:40Z
COST = {A: 1e-4, B: 2e-3}                    # the router's expected cost per target


def chat(rid: str, prompt: str | None, target: str | None, t: float, **kw) -> DecisionRecord:
    """A routed /v1/chat decision at ``T0 + t`` (``prompt=None``: the log did not keep it)."""
    messages = [{"role": "user", "content": prompt or "secret"}]
    fields = dict(request_id=rid, time=T0 + t, endpoint="chat", model="router", policy="threshold",
                  policy_param=0.05, probabilities={A: 0.6, B: 0.9}, expected_cost=COST, chosen=target,
                  target=target, propensity=0.9, prompt_tokens=12, completion_tokens=30,
                  response=f"answer of {rid}", prompt_hash=prompt_hash(messages),
                  messages=json.dumps(messages) if prompt else None, artifact="router-v1")
    return DecisionRecord(**{**fields, **kw})


def score(rid: str, value: float, source: str = "user", t: float = 100.0) -> FeedbackRecord:
    return FeedbackRecord(request_id=rid, time=T0 + t, score=value, source=source)


def write_log(uri: str, decisions: list[DecisionRecord], feedback: list[FeedbackRecord], per_part: int = 3) -> str:
    """Write the records as the Serve app does: whole parts at their part_uri (several parts, several days)."""
    for kind, records in ((DECISIONS, decisions), (FEEDBACK, feedback)):
        chunks: list[list] = []
        for rec in sorted(records, key=lambda r: r.time):
            day = int(rec.time // 86_400)
            if not chunks or len(chunks[-1]) == per_part or int(chunks[-1][0].time // 86_400) != day:
                chunks.append([])
            chunks[-1].append(rec)
        for seq, chunk in enumerate(chunks):
            storage.write_parquet(type(chunk[0]).table(chunk), part_uri(uri, kind, chunk[0].time, "w1", seq))
    return uri


def scenario() -> tuple[list[DecisionRecord], list[FeedbackRecord]]:
    """Three prompts answered, one of them three times; four decisions that make no query; a stray score."""
    decisions = [
        chat("r1", "What is 2 + 2?", A, 0, propensity=0.8),
        chat("r2", "Name a prime.", B, 1, explored=True, propensity=0.1),
        chat("r3", "Unscored question", A, 2),                                 # no feedback: masked
        chat("r4", "What is 2 + 2?", A, 3, propensity=0.6),                    # the first prompt again
        chat("r5", "What is 2 + 2?", B, 4, model=B, policy=None, policy_param=None, probabilities=None,
             expected_cost=None, chosen=None, propensity=None),                # pinned: registry prices
        chat("r6", "Broken", A, 5, status=502, error="upstream", response=None),
        chat("r7", None, A, 6),                                                # prompt not kept
        chat("r8", "Which target?", A, 7, endpoint="route", response=None, status=503),
        chat("r9", "Nobody answered", None, 86_400),                          # the next day's folder
    ]
    feedback = [score("r1", 1.0), score("r1", 0.0, t=101), score("r1", 1.0, "judge-a"),
                score("r2", 1.0, "judge-a"), score("r2", 0.5, "judge-b"), score("r4", 1.0),
                score("r5", 0.0), score("r6", 0.0), score("ghost", 1.0)]
    return decisions, feedback


def config(tmp_path: Path, inputs, name: str = "out", **kw) -> ImportConfig:
    return ImportConfig(format="decision-log", inputs=[str(i) for i in inputs],
                        output=str(tmp_path / name / "queries.parquet"), labels=str(tmp_path / name / "labels"), **kw)


def ok_labels(cfg: ImportConfig) -> dict[str, dict[str, dict]]:
    """target -> query text -> its ok label row, through training.labels.load_labels (what the stages read)."""
    from training.labels import load_labels

    text = {r["query_id"]: r["messages"][0]["content"] for r in pq.read_table(cfg.output).to_pylist()}
    return {t: {text[r["query_id"]]: r for r in table.to_pylist() if r["status"] == "ok"}
            for t, table in load_labels(cfg.labels).items()}


@pytest.fixture
def log(tmp_path) -> str:
    return write_log(str(tmp_path / "log"), *scenario())


def test_end_to_end_query_table_and_labels_training_reads(tmp_path, log):
    from training.dataset import load_labels

    cfg = config(tmp_path, [log])
    result = run_import(cfg)
    table = pq.read_table(cfg.output)
    assert table.schema.equals(QUERY_SCHEMA)
    rows = table.to_pylist()
    assert [r["messages"][0]["content"] for r in rows] == ["What is 2 + 2?", "Name a prime.", "Unscored question"]
    assert {(r["source"], r["task"], r["answer_type"]) for r in rows} == {("decision-log", "general", "exact")}
    assert json.loads(rows[0]["meta"]) == {"source_ids": ["r1", "r4", "r5"]}      # one query, three decisions
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert result["merged"]["duplicate prompts merged"] == 2

    labels = ok_labels(cfg)
    a, b = labels[A], labels[B]
    assert set(a) == {"What is 2 + 2?"} and set(b) == {"What is 2 + 2?", "Name a prime."}
    assert a["What is 2 + 2?"]["correct"] == pytest.approx((0.5 + 1.0) / 2)   # r1: users 1 and 0; r4: user 1
    assert a["What is 2 + 2?"]["cost"] == pytest.approx(COST[A])               # the decisions' expected cost
    assert (a["What is 2 + 2?"]["input_tokens"], a["What is 2 + 2?"]["output_tokens"]) == (12, 30)
    assert a["What is 2 + 2?"]["answer"] == "answer of r1"
    assert b["Name a prime."]["correct"] == pytest.approx(0.75)                # no user score: the judges' mean
    assert b["What is 2 + 2?"]["correct"] == 0.0                               # a real 0, from a user
    from shared.registry import load_registry
    assert b["What is 2 + 2?"]["cost"] == pytest.approx(load_registry().get(B).cost(12, 30))  # no expected cost

    ids = np.asarray(table.column("query_id").to_pylist())
    loaded = load_labels(cfg.labels, [A, B], ids)                             # the training loader: NaN = masked
    assert np.isnan(loaded["Y"]).tolist() == [[False, False], [True, False], [True, True]]
    assert loaded["Y"][0].tolist() == [0.75, 0.0] and loaded["cost"][0, 0] == pytest.approx(COST[A])

    summary = json.loads((Path(cfg.labels) / "summary.json").read_text())
    assert set(summary["targets"]) == {A, B} and summary["query_rows"] == 3
    assert summary["targets"][A]["ok"] == 1 and summary["targets"][A]["missing"] == 2
    manifest = json.loads((Path(cfg.labels) / "import-manifest.json").read_text())
    assert manifest["format"] == "decision-log" and manifest["counts"]["decision_log"] == result["decision_log"]
    assert [(f["path"], f["rows_read"], f["feedback_rows"]) for f in manifest["files"]] == [(log, 9, 9)]


def test_summary_counts_decisions_skipped_and_feedback(tmp_path, log):
    result = run_import(config(tmp_path, [log]))
    assert result["decision_log"] == {
        "decisions read": 9, "decisions labelled": 4, "decisions unlabelled (masked)": 1,
        "decisions skipped": {"status not 200": 2, "no prompt kept": 1, "no target": 1},
        "feedback rows": 9, "feedback used": 6, "feedback unmatched": 1, "feedback on skipped decisions": 1,
        "feedback passed over (label_sources)": 1, "labelled cells": {A: 1, B: 2}}
    assert result["skipped"] == {"decision-log: status not 200": 2, "decision-log: no prompt kept": 1,
                                 "decision-log: no target": 1}
    assert result["rows_read"] == 9 and result["rows"] == 3
    assert result["cells"][A]["labelled cells"] == 2 and result["cells"][B]["costs from registry prices"] == 1


def test_a_decision_services_route_decision_with_feedback_labels_the_target_it_named(tmp_path):
    """/v1/route answers nothing itself: the client called the target it named and scored that answer."""
    decisions = [chat("d1", "Pick for me", B, 0, endpoint="route", response=None, propensity=0.5),
                 chat("d2", "Pick again", A, 1, endpoint="route", response=None)]
    cfg = config(tmp_path, [write_log(str(tmp_path / "log"), decisions, [score("d1", 1.0)])])
    result = run_import(cfg)
    assert result["rows"] == 2 and result["decision_log"]["decisions labelled"] == 1
    labels = ok_labels(cfg)
    assert labels[B]["Pick for me"]["correct"] == 1.0 and labels[B]["Pick for me"]["cost"] == pytest.approx(COST[B])
    assert "Pick again" not in labels.get(A, {})


def test_propensity_is_kept_per_labelled_cell(tmp_path, log):
    cfg = config(tmp_path, [log])
    run_import(cfg)
    text = {r["query_id"]: r["messages"][0]["content"] for r in pq.read_table(cfg.output).to_pylist()}
    got = {t: {text[r["query_id"]]: (r["propensity"], r["decisions"], r["split"])
               for r in pq.read_table(Path(cfg.labels) / t / PROPENSITY_FILE).to_pylist()} for t in (A, B)}
    split = {text[r["query_id"]]: r["split"] for r in pq.read_table(cfg.output).to_pylist()}
    p1, p2 = "What is 2 + 2?", "Name a prime."
    assert got[A] == {p1: (pytest.approx(0.7), 2, split[p1])}                    # r1 0.8 and r4 0.6, averaged
    assert got[B] == {p2: (pytest.approx(0.1), 1, split[p2]), p1: (None, 1, split[p1])}  # explored; pinned
    names = sorted(p.name for p in (Path(cfg.labels) / A).iterdir())
    assert names == ["manifest.json", PROPENSITY_FILE, "shard-00000.parquet"]  # beside the shards, not one


def test_label_sources_pick_the_precedence(tmp_path, log):
    judges_first = config(tmp_path, [log], "judges", label_sources=["judge", "user"])
    result = run_import(judges_first)
    assert ok_labels(judges_first)[A]["What is 2 + 2?"]["correct"] == 1.0  # r1: its judge's 1; r4: user 1 (no judge)
    assert result["decision_log"]["feedback passed over (label_sources)"] == 2  # r1's two user scores

    users_only = config(tmp_path, [log], "users", label_sources=["user"])
    result = run_import(users_only)
    assert set(ok_labels(users_only)[B]) == {"What is 2 + 2?"}                # judges only: masked, not a 0
    assert result["decision_log"]["decisions unlabelled (masked)"] == 2

    one_judge = config(tmp_path, [log], "judge-b", label_sources=["judge-b"])
    run_import(one_judge)
    labels = ok_labels(one_judge)
    assert set(labels[B]) == {"Name a prime."} and labels[B]["Name a prime."]["correct"] == 0.5
    assert labels[A] == {}


def test_a_decision_without_feedback_is_masked_not_wrong(tmp_path):
    log = write_log(str(tmp_path / "log"), [chat("r1", "Scored", A, 0), chat("r2", "Never scored", A, 1)],
                    [score("r1", 1.0)])
    cfg = config(tmp_path, [log])
    result = run_import(cfg)
    from training.labels import read_target
    rows = {r["query_id"]: r for r in read_target(f"{cfg.labels}/{A}").to_pylist()}
    ids = pq.read_table(cfg.output).column("query_id").to_pylist()
    assert rows[ids[0]]["status"] == "ok" and rows[ids[0]]["correct"] == 1.0
    assert rows[ids[1]]["status"] == "missing" and rows[ids[1]]["correct"] is None
    assert result["summary"]["targets"][A]["accuracy"] == 1.0                 # the unscored answer is not a 0


def test_time_window_selects_decisions_and_counts_late_feedback(tmp_path, log):
    since, until = "2025-06-15T15:06:41Z", str(T0 + 4)                         # r2, r3, r4 (T0+1 .. T0+3)
    cfg = config(tmp_path, [log], since=since, until=until)
    assert (cfg.since, cfg.until) == (T0 + 1, T0 + 4)
    result = run_import(cfg)
    texts = [r["messages"][0]["content"] for r in pq.read_table(cfg.output).to_pylist()]
    assert texts == ["Name a prime.", "Unscored question", "What is 2 + 2?"]
    counts = result["decision_log"]
    assert counts["decisions read"] == 3 and counts["decisions skipped"] == {}
    assert counts["feedback unmatched"] == 6                                   # r1 (x3), r5, r6 and the stray id
    assert ok_labels(cfg)[A]["What is 2 + 2?"]["correct"] == 1.0               # r4 alone
    late = config(tmp_path, [log], "late", since=T0 + 200)                    # after all feedback too
    with pytest.raises(BadInput, match="no query could be imported"):
        run_import(late)


def test_config_times_and_log_only_options(tmp_path):
    def load(*overrides):
        return load_config(ImportConfig, None, ["format=decision-log", f"inputs=[{tmp_path}]", *overrides])

    assert load("since=2025-06-15").since == 1_749_945_600.0                # YAML date: midnight UTC
    assert load("since=2025-06-15T12:00:00+02:00").since == 1_749_981_600.0
    assert load("since='2025-06-15 10:00'").since == 1_749_981_600.0         # no zone: UTC
    assert load("since=1750000000", "until='1750000001.5'").until == 1_750_000_001.5
    with pytest.raises(ConfigError, match="neither unix seconds nor an ISO 8601"):
        load("since=yesterday")
    with pytest.raises(ConfigError, match="since .* must be before until"):
        load("since=2025-06-16", "until=2025-06-15")
    with pytest.raises(ConfigError, match="label_sources"):
        load("label_sources=[]")
    with pytest.raises(ConfigError, match="since, label_sources: only format=decision-log reads them, not "
                                          "format=routerbench"):
        load_config(ImportConfig, None, [f"inputs=[{tmp_path}]", "since=0", "label_sources=[user]"])
    assert load_config(ImportConfig, None, [f"inputs=[{tmp_path}]", "since=null"]).since is None  # the default


def test_several_logs_and_a_missing_one(tmp_path):
    first = write_log(str(tmp_path / "east"), [chat("e1", "Shared prompt", A, 0)], [score("w1", 1.0)])
    second = write_log(str(tmp_path / "west"), [chat("w1", "Shared prompt", B, 1), chat("e1", "Again", A, 2)],
                       [score("e1", 0.0)])
    cfg = config(tmp_path, [first, second])
    result = run_import(cfg)
    assert result["rows"] == 1 and result["decision_log"]["decisions skipped"] == {
        "duplicate request id (first kept)": 1}
    labels = ok_labels(cfg)                                                   # each log's feedback scores the other's
    assert labels[A]["Shared prompt"]["correct"] == 0.0 and labels[B]["Shared prompt"]["correct"] == 1.0
    assert [s["path"] for s in result["sources"]] == [first, second]
    with pytest.raises(MissingInput, match="no decision log here"):
        run_import(config(tmp_path, [tmp_path / "nowhere"], "none"))


def test_a_log_on_s3_reads_like_a_local_one(tmp_path, moto_s3):
    """The Serve app logs to S3; a retraining job imports from there (a loopback moto server)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="serve-logs")
    remote = write_log("s3://serve-logs/prod/log", *scenario())
    local = write_log(str(tmp_path / "log"), *scenario())
    assert any(k["Key"].startswith("prod/log/feedback/") for k in s3.list_objects_v2(Bucket="serve-logs")["Contents"])
    got = run_import(config(tmp_path, [remote], "s3", since="2025-06-15"))
    plain = run_import(config(tmp_path, [local], "local", since="2025-06-15"))
    assert got["table_hash"] == plain["table_hash"] and got["rows"] == 3
    assert got["decision_log"] == plain["decision_log"]
    assert [s["path"] for s in got["sources"]] == [remote]
    assert got["sources"][0]["sha256"] == plain["sources"][0]["sha256"]
    assert ok_labels(config(tmp_path, [remote], "s3"))[B]["Name a prime."]["correct"] == pytest.approx(0.75)
    assert not math.isnan(got["summary"]["targets"][B]["accuracy"])


def test_a_log_that_keeps_no_prompts_is_counted_not_logged_per_row(tmp_path):
    decisions = [chat(f"r{i}", None, A, i) for i in range(5)] + [chat("kept", "Kept prompt", A, 9)]
    result = run_import(config(tmp_path, [write_log(str(tmp_path / "log"), decisions, [score("r0", 1.0)])]))
    assert result["skipped"] == {"decision-log: no prompt kept": 5} and result["rows"] == 1
    assert [e for e in result["examples"] if "no prompt kept" in e] == ["decision-log: no prompt kept: log: request r0"]
    assert result["decision_log"]["feedback on skipped decisions"] == 1
