"""The evaluation report as a type (training.evaluate.results.EvalReport): committed reports
read back and write out byte for byte; nan in memory is null on disk."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from training.evaluate.results import EvalReport, FixedScores, ProbabilisticScores

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = sorted((ROOT / "data").glob("**/eval/report.json"))


def test_there_are_committed_reports():
    assert len(COMMITTED) >= 3, COMMITTED  # data/eval, data/routerbench/eval, data/routerbench-qwen/eval


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_report_reads_back_and_writes_the_same_bytes(path):
    text = path.read_text()
    report = EvalReport.read(str(path))
    assert report.to_json() == json.loads(text)
    assert report.json_text() == text  # same keys, same order, same numbers (1 stays 1, 1.0 stays 1.0)
    ours = report.router("prefill-router")
    assert isinstance(ours, ProbabilisticScores) and ours.operating_point.policy == ours.policy
    assert ours.sweep is not None and len(ours.sweep.cost) == len(ours.sweep.accuracy) > 1
    assert isinstance(report.router("random"), FixedScores)
    assert report.n.test == report.subsets["test"].references.n
    assert set(report.subsets["test"].references.single) == set(report.targets)


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(COMMITTED[0].read_text())


def test_nan_in_memory_is_null_on_disk_and_none_read_back(raw):
    scores = copy.deepcopy(raw)
    scores["subsets"]["test"]["routers"]["prefill-router"]["gap_closed"] = float("nan")
    report = EvalReport.model_validate(scores)
    assert math.isnan(report.router("prefill-router").gap_closed)
    out = json.loads(report.json_text())
    assert out["subsets"]["test"]["routers"]["prefill-router"]["gap_closed"] is None
    assert EvalReport.model_validate(out).router("prefill-router").gap_closed is None


def test_keys_an_older_report_lacks_stay_absent(raw):
    dropped = ("within_task_auc", "auc_margin_within_task", "paper")
    old = {k: v for k, v in copy.deepcopy(raw).items() if k not in dropped}
    del old["subsets"]["test"]["references"]["zero_router_gap_at_savings"]
    report = EvalReport.model_validate(old)
    assert report.within_task_auc is None and report.paper is None
    assert report.to_json() == old and list(report.to_json()) == list(old)


def test_unknown_keys_and_kinds_are_refused(raw):
    with pytest.raises(ValidationError, match="extra"):
        EvalReport.model_validate({**raw, "surprise": 1})
    bad = copy.deepcopy(raw)
    bad["subsets"]["test"]["routers"]["random"]["kind"] = "psychic"
    with pytest.raises(ValidationError):
        EvalReport.model_validate(bad)
    bad = copy.deepcopy(raw)
    del bad["subsets"]["test"]["routers"]["prefill-router"]["accuracy"]
    with pytest.raises(ValidationError, match="accuracy"):
        EvalReport.model_validate(bad)
