"""The pipeline's stage table (``cluster.pipeline.run.STAGES``) and its resume bookkeeping
(``cluster.pipeline.state.run_stage``), without running any stage's real work."""

from __future__ import annotations

import json

from cluster.demo import pipeline_config
from cluster.pipeline.run import STAGES, data_key, data_output
from cluster.pipeline.state import Stage, run_stage, stage_key


def test_one_table_names_every_stage_in_order():
    assert [s.name for s in STAGES] == ["judge", "data", "label", "capture", "probe", "tune", "fit", "adapt",
                                        "evaluate", "publish"]
    recorded = {s.name for s in STAGES if s.output is not None}
    assert recorded == {"data", "probe", "tune", "fit", "adapt", "evaluate"}  # label and capture resume by their shards
    assert all(s.key is not None for s in STAGES if s.name in recorded)


def test_tune_and_judge_run_only_when_configured(tmp_path):
    cfg = pipeline_config(tmp_path, quick=True, reference_labels=None)
    optional = {s.name: s for s in STAGES if s.name in ("tune", "judge", "adapt")}
    assert cfg.tune is None and cfg.judge is None and cfg.adapt is None and not any(s.when(cfg) for s in optional.values())
    assert all(s.when(cfg) for s in STAGES if s.name not in optional)


def test_data_stage_keys_and_output(tmp_path):
    built = pipeline_config(tmp_path, quick=True, reference_labels=None)
    assert data_key(built, {}) == stage_key(built.data.model_dump(mode="json"))
    assert data_output(built) == built.data.output
    existing = built.model_copy(update={"data": None, "queries": "some/queries.parquet"})
    assert data_key(existing, {}) == stage_key("some/queries.parquet") and data_output(existing) is None


class FakeCfg:
    def __init__(self, work_dir: str, version: int = 1):
        self.work_dir, self.version = work_dir, version


def counting_stage(calls: list, output) -> Stage:
    def run(cfg, results):
        calls.append(cfg.version)
        return {"version": cfg.version, "before": sorted(results)}

    return Stage("probe", run, key=lambda cfg, keys: stage_key(cfg.version, keys["data"]), output=output)


def test_run_stage_records_then_skips_until_key_or_output_changes(tmp_path):
    out = tmp_path / "probe.json"
    calls: list[int] = []
    stage = counting_stage(calls, lambda cfg: str(out))
    keys = {"data": "d1"}
    first = run_stage(stage, FakeCfg(str(tmp_path)), keys, {"data": {}})
    assert first == {"version": 1, "before": ["data"]} and calls == [1]
    assert keys["probe"] == stage_key(1, "d1")
    stamp = tmp_path / "stages" / "probe.json"
    assert json.loads(stamp.read_text()) == {"key": keys["probe"], "result": first}
    assert stamp.read_text() == json.dumps({"key": keys["probe"], "result": first}, indent=2, sort_keys=True) + "\n"

    assert run_stage(stage, FakeCfg(str(tmp_path)), {"data": "d1"}, {}) == {"version": 1, "before": []}
    assert calls == [1, 1]  # run again: its output is not there
    out.write_text("{}")
    assert run_stage(stage, FakeCfg(str(tmp_path)), {"data": "d1"}, {}) == {"version": 1, "before": [],
                                                                         "skipped": True}
    assert calls == [1, 1]  # skipped: same key, output there
    run_stage(stage, FakeCfg(str(tmp_path)), {"data": "d2"}, {})  # an earlier stage changed
    run_stage(stage, FakeCfg(str(tmp_path), version=2), {"data": "d2"}, {})  # this stage's config changed
    assert calls == [1, 1, 1, 2]


def test_a_stage_without_output_always_runs_and_records_nothing(tmp_path):
    calls: list[int] = []
    stage = Stage("data", lambda cfg, results: calls.append(1) or {"built": False}, key=lambda cfg, keys: "k")
    keys: dict[str, str] = {}
    for _ in range(2):
        assert run_stage(stage, FakeCfg(str(tmp_path)), keys, {}) == {"built": False}
    assert calls == [1, 1] and keys == {"data": "k"} and not (tmp_path / "stages").exists()
