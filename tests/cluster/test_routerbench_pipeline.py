"""RouterBench end to end on a few dozen rows of the shared files (skipped where they are absent):
``pipeline run -c configs/pipeline-routerbench.yaml`` (import -> capture -> probe -> fit ->
evaluate, 11 closed targets, measured costs), then the held-out check of the README: import
rows the router never saw, capture them with the artifact's encoder and layers, evaluate the
artifact on them with every row as test."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from shared.config import load_config
from cluster.pipeline.config import PipelineConfig
from cluster.pipeline.run import run_pipeline
from tests.procs import ROOT

SHARED = ROOT.parent / "shared" / "data" / "routerbench"
FILES = ("arc_challenge_train.csv", "mbpp_train.csv", "winograde_train.csv")
pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not SHARED.is_dir(), reason=f"RouterBench data not at {SHARED}")]

TINY_TRUNK = "{hidden: [32], dropout: [0.1], max_epochs: 30, patience: 6, batch_size: 64}"


def slice_files(out: Path, start: int, stop: int) -> Path:
    """Rows ``start:stop`` of each shared CSV, RouterBench columns untouched (a tmp folder, never committed)."""
    out.mkdir(parents=True)
    for name in FILES:
        pd.read_csv(SHARED / name, dtype=str, keep_default_na=False).iloc[start:stop].to_csv(out / name, index=False)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_routerbench_pipeline_then_a_held_out_check(tmp_path, caplog, local_ray):
    from shared.artifact import load_artifact
    from training.capture.run import CaptureConfig, run_capture
    from training.data.import_config import ImportConfig
    from training.data.importer import run_import
    from training.evaluate.run import EvalConfig, run_evaluation

    work = tmp_path / "work"
    cfg = load_config(PipelineConfig, ROOT / "configs" / "pipeline-routerbench.yaml", [
        f"work_dir={work}", f"data_import.inputs=[{slice_files(tmp_path / 'rows', 0, 24)}]",
        "capture.layers=[2,3]", "capture.shard_size=64", "capture.max_actors=1", "capture.max_tokens=1024",
        "probe.folds=3", "probe.pca_dims=8", "probe.n_blocks=1", "tune=null", "adapt=null", "capture.token_layers=[]",
        "fit.train.seeds=1", "fit.train.keep=1", "fit.train.num_workers=1", f"fit.train.trunk={TINY_TRUNK}",
        "evaluate.routers=[random,always-cheapest,always-best,task-best]", "evaluate.bootstrap=50"])
    summary = run_pipeline(cfg)
    stages = summary["stages"]
    assert stages["data"]["imported"] and stages["data"]["rows"] == 72
    assert stages["label"]["reused"] == str(work / "labels") and len(stages["label"]["accuracy"]) == 11
    router = load_artifact(str(work / "router"))
    assert router.target_names == cfg.targets and router.meta.encoder.name == "smollm2-135m"
    report = json.loads((work / "eval" / "report.json").read_text())
    assert set(report["by_task"]) == {"arc-challenge", "mbpp", "winogrande"}
    assert set(report["within_task_auc"]) == {"prefill-router"}  # AUC ranked inside each task
    capture = json.loads((work / "activations" / "manifest.json").read_text())["summary"]
    assert capture["computed_tokens"] < 0.6 * capture["prompt_tokens"], "few-shot headers are prefilled once"

    # the held-out check: rows 40-52 of each file, never seen, every one scored as test
    fresh = tmp_path / "fresh"
    imported = run_import(ImportConfig(inputs=[str(slice_files(tmp_path / "unseen", 24, 32))],
                                       output=str(fresh / "queries.parquet"), labels=str(fresh / "labels"),
                                       splits={"train": 0.0, "val": 0.0, "test": 1.0}))
    assert imported["rows"] == 24
    with caplog.at_level(logging.WARNING, logger="training.capture.run"):
        summary = run_capture(CaptureConfig(queries=str(fresh / "queries.parquet"), out=str(fresh / "acts"),
                                            artifact=str(work / "router"), layers=[1], max_actors=1, progress=False))
    assert "replacing the config's {'layers': [1]" in caplog.text and summary["rows"] == 24
    held = run_evaluation(EvalConfig(artifact=str(work / "router"), activations=str(fresh / "acts"),
                                     labels=str(fresh / "labels"), queries=str(fresh / "queries.parquet"),
                                     out=str(fresh / "eval"), routers=["random", "always-best", "task-best"],
                                     bootstrap=50))
    assert held.n.test == 24 and held.n.train == 0 and held.all_rows_test
    assert not held.skipped_routers, "always-best and task-best come from what the artifact recorded"
    assert "recorded at evaluate" in held.artifact_baselines["task-best"]
    assert (fresh / "eval" / "report.json").is_file()
