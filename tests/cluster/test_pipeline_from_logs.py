"""``configs/pipeline-from-logs.yaml`` on a small logged window (issue 36, part 4).

Real prompts and real labels (the committed reference queries and their SmolLM2 and Gemma labels),
written as the Serve app writes its log: a uniform logging policy over the two targets (propensity
0.5), the feedback of each answer the label of the target that gave it. The first run imports,
captures, fits, evaluates off-policy on the held logged rows and publishes (nothing was published);
a second run of the same router, under a gate that asks for an improvement, refuses, and says why.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.system]
TARGETS = ["smollm2-135m", "gemma3-270m"]


def write_window(log: str, n: int = 80) -> int:
    """A logged window of ``n`` answered requests with their feedback; returns how many were logged."""
    from shared import storage
    from shared.decision_log import DecisionRecord, FeedbackRecord, part_uri, prompt_hash
    from training.labels import load_labels

    labels = {t: {r["query_id"]: r["correct"] for r in table.to_pylist() if r["status"] == "ok"}
              for t, table in load_labels(str(ROOT / "data" / "labels"), TARGETS).items()}
    rows = [r for r in pq.read_table(ROOT / "data" / "queries.parquet").to_pylist()
            if all(r["query_id"] in labels[t] for t in TARGETS)]
    rng = np.random.default_rng(0)
    picked = [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]
    decisions, feedback, t0 = [], [], 1_790_000_000.0
    for i, row in enumerate(picked):
        target = TARGETS[int(rng.integers(2))]
        messages = [dict(m) for m in row["messages"]]
        rid = f"chatcmpl-window-{i}"
        decisions.append(DecisionRecord(
            request_id=rid, time=t0 + i, endpoint="chat", model="router", policy="tolerance", policy_param=1.0,
            probabilities=dict.fromkeys(TARGETS, 0.5), expected_cost=dict.fromkeys(TARGETS, 1e-5), chosen=TARGETS[0],
            target=target, explored=target != TARGETS[0], propensity=0.5, prompt_tokens=100, completion_tokens=1,
            response="A", prompt_hash=prompt_hash(messages), messages=json.dumps(messages, ensure_ascii=False)))
        feedback.append(FeedbackRecord(request_id=rid, time=t0 + n + i, score=labels[target][row["query_id"]]))
    storage.write_parquet(DecisionRecord.table(decisions), part_uri(log, "decisions", t0, "test", 1))
    storage.write_parquet(FeedbackRecord.table(feedback), part_uri(log, "feedback", t0 + n, "test", 1))
    return n


def test_the_from_logs_pipeline_publishes_then_its_gate_refuses_a_router_no_better(tmp_path):
    from cluster.pipeline.config import PipelineConfig
    from cluster.pipeline.run import run_pipeline
    from shared.artifact import load_artifact
    from shared.config import load_config

    log = str(tmp_path / "log")
    write_window(log)
    overrides = [
        f"work_dir={tmp_path / 'work'}", f"data_import.inputs=[{log}]", "data_import.splits={train: 0.5, val: 0.2, test: 0.3}",
        "capture.layers=[6]", "capture.shard_size=40", "capture.max_actors=1", "capture.progress=false",
        "probe.folds=2", "probe.pca_dims=8", "probe.n_blocks=1",
        "fit.n_components=8", "fit.train.seeds=1", "fit.train.keep=1",
        "fit.train.trunk={hidden: [16], dropout: [0.1], max_epochs: 20, patience: 5, batch_size: 32}",
        f"publish.uri={tmp_path / 'published'}/{{run_id}}", f"publish.pointer={tmp_path / 'pointer.json'}",
        "publish.metric=dr_accuracy", "publish.reload_serve_app=null",
    ]
    cfg = load_config(PipelineConfig, ROOT / "configs" / "pipeline-from-logs.yaml", overrides)
    first = run_pipeline(cfg)["stages"]
    assert first["data"]["imported"] and first["publish"]["published"], first["publish"]
    assert first["publish"]["reason"] == "no published artifact to compare with"
    assert first["evaluate"]["metrics"]["dr_accuracy"] is not None
    pointer = json.loads((tmp_path / "pointer.json").read_text())
    assert load_artifact(pointer["artifact"]).target_names == TARGETS

    stricter = load_config(PipelineConfig, ROOT / "configs" / "pipeline-from-logs.yaml",
                           [*overrides, "publish.max_regression=-0.01"])
    second = run_pipeline(stricter)["stages"]
    assert second["fit"].get("skipped") and not second["publish"]["published"]  # the same router, not better
    assert second["publish"]["current"] == pytest.approx(second["publish"]["new"]), second["publish"]
    assert "not better than published" in second["publish"]["reason"]
    assert json.loads((tmp_path / "pointer.json").read_text())["artifact"] == pointer["artifact"]
