"""Evaluate calibrates the novelty gate on train + val, scores test with it, reports it and writes it into the
artifact; a held-out table (no train rows) is scored with the artifact's gate as written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.training.evaluate.test_evaluate import TASKS, fit_artifact, synthetic
from training.evaluate.novelty_gate import prior_scores
from training.evaluate.run import EvalConfig, run_evaluation


def shifted(n_far: int = 90):
    """The synthetic table, its last ``n_far`` test rows moved far from every training row (a new kind of
    prompt) and labelled so that only "mid" answers them."""
    data = synthetic()
    far = np.flatnonzero(data.split == "test")[-n_far:]
    blocks = {k: v.copy() for k, v in data.blocks.items()}
    for v in blocks.values():
        v[far] += 8.0
    Y = data.Y.copy()
    Y[far] = [0.0, 1.0, 0.0]
    return replace(data, blocks=blocks, Y=Y), far


def test_prior_is_task_averaged_when_tasks_are_known():
    Y = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert prior_scores(Y, None)[0].tolist() == [0.75, 0.25]
    prior, how = prior_scores(Y, ["big", "big", "big", "small"])
    assert prior.tolist() == [0.5, 0.5] and "task-averaged" in how


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("novelty")
    data, far = shifted()
    fit_artifact(data, str(tmp / "router"))
    cfg = EvalConfig(artifact=str(tmp / "router"), activations="unused", labels="unused", out=str(tmp / "out"),
                     routers=["always-best"], novelty_quantile=0.95, bootstrap=50,
                     operating_point={"target_accuracy": "best_single"})
    report = run_evaluation(cfg, data=data, texts=list(data.query_ids), tasks=TASKS(len(data.query_ids)))
    return data, far, cfg, report


def test_evaluate_calibrates_reports_and_writes_the_gate(gated):
    from shared.artifact import load_artifact

    data, far, cfg, report = gated
    g = report.novelty
    n_test = int((data.split == "test").sum())
    assert g["quantile"] == 0.95 and g["n_calibration"] == int((data.split == "val").sum())
    assert g["test_rows"] == n_test and len(far) <= g["test_novel"] < len(far) + 0.15 * n_test
    assert "Novelty gate" in (Path(cfg.out) / "report.md").read_text()
    router = load_artifact(cfg.artifact)
    gate = router.meta.policy.novelty
    assert gate is not None and gate.threshold == pytest.approx(g["threshold"])
    assert router.meta.policy.operating_point is not None  # written beside the gate
    P, novel = router.predict({k: v[far] for k, v in data.blocks.items()})
    assert novel.all() and np.allclose(P, gate.prior)


def test_a_held_out_table_is_scored_with_the_written_gate(gated, tmp_path):
    data, far, cfg, report = gated
    test = data.where("test")
    held = EvalConfig(artifact=cfg.artifact, activations="unused", labels="unused", out=str(tmp_path / "held"),
                      routers=["always-best"], novelty_quantile=0.95, bootstrap=0, write_operating_point=False)
    again = run_evaluation(held, data=test, texts=list(test.query_ids))
    assert again.all_rows_test and again.novelty["test_novel"] == report.novelty["test_novel"]
    assert again.novelty["threshold"] == report.novelty["threshold"]
    out = json.loads((tmp_path / "held" / "report.json").read_text())
    assert out["novelty"]["test_rows"] == len(test.query_ids)
