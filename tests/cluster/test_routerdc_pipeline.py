"""RouterDC end to end on a few dozen rows of the shared files (skipped where they are absent):
``pipeline run -c configs/pipeline-routerdc.yaml`` on four of its tasks (import -> capture ->
probe -> fit -> evaluate, seven equal-price targets, soft scores), then the held-out check of
the README on the fifth task, which the artifact never saw: import, capture with the
artifact's encoder and layers, evaluate with every row as test."""

import json
from pathlib import Path

import pytest

from shared.config import load_config
from cluster.pipeline.config import PipelineConfig
from cluster.pipeline.run import run_pipeline
from tests.procs import ROOT

SHARED = ROOT.parent / "shared" / "data" / "routerdc"
SEEN = ("mmlu_train.json", "gsm8k-train.json", "cmmlu_train.json", "arc_challenge_train.json")
pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not SHARED.is_dir(), reason=f"RouterDC data not at {SHARED}")]

TINY_TRUNK = "{hidden: [32], dropout: [0.1], max_epochs: 30, patience: 6, batch_size: 64}"


def slice_files(out: Path, names, start: int, stop: int) -> Path:
    """Rows ``start:stop`` of each named shared file, as RouterDC's JSON (a tmp folder, never committed)."""
    out.mkdir(parents=True)
    for name in names:
        rows = json.loads((SHARED / name).read_text(encoding="utf-8"))[start:stop]
        (out / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_routerdc_pipeline_then_an_unseen_task(tmp_path, local_ray):
    from shared.artifact import load_artifact
    from training.capture.run import CaptureConfig, run_capture
    from training.data.import_config import ImportConfig
    from training.data.importer import run_import
    from training.evaluate.run import EvalConfig, run_evaluation

    work = tmp_path / "work"
    cfg = load_config(PipelineConfig, ROOT / "configs" / "pipeline-routerdc.yaml", [
        f"work_dir={work}", f"data_import.inputs=[{slice_files(tmp_path / 'rows', SEEN, 0, 16)}]",
        "capture.layers=[2,3]", "capture.shard_size=32", "capture.max_actors=1", "capture.max_tokens=512",
        "probe.folds=3", "probe.pca_dims=8", "probe.n_blocks=1", "tune=null", "adapt=null", "capture.token_layers=[]",
        "fit.train.seeds=1", "fit.train.keep=1", "fit.train.num_workers=1", f"fit.train.trunk={TINY_TRUNK}",
        "evaluate.routers=[random,always-best,task-best]", "evaluate.bootstrap=50", "evaluate.task_min_rows=5"])
    summary = run_pipeline(cfg)
    assert summary["stages"]["data"]["rows"] == 64
    router = load_artifact(str(work / "router"))
    assert router.target_names == cfg.targets and len({(t.price_in, t.price_out) for t in router.meta.targets}) == 1
    report = json.loads((work / "eval" / "report.json").read_text())
    assert set(report["by_task"]) == {"mmlu", "gsm8k", "cmmlu", "arc_challenge"}
    md = (work / "eval" / "report.md").read_text()
    assert "-0.00%" not in md and "nan" not in md.lower().replace("nanochat", "")
    # the shipped config's novelty gate: calibrated on val, written into the artifact, reported
    assert router.meta.policy.novelty.quantile == cfg.evaluate.novelty_quantile == report["novelty"]["quantile"]
    assert "Novelty gate" in md

    # the held-out check on a task the router never saw: every row is test
    fresh = tmp_path / "fresh"
    imported = run_import(ImportConfig(format="routerdc", output=str(fresh / "queries.parquet"),
                                       inputs=[str(slice_files(tmp_path / "unseen", ["humaneval_train.json"], 0, 12))],
                                       labels=str(fresh / "labels"), splits={"train": 0.0, "val": 0.0, "test": 1.0}))
    assert imported["rows"] == 12
    run_capture(CaptureConfig(queries=str(fresh / "queries.parquet"), out=str(fresh / "acts"),
                              artifact=str(work / "router"), max_actors=1, progress=False))
    held = run_evaluation(EvalConfig(artifact=str(work / "router"), activations=str(fresh / "acts"),
                                     labels=str(fresh / "labels"), queries=str(fresh / "queries.parquet"),
                                     out=str(fresh / "eval"), routers=["random", "always-best", "task-best"],
                                     bootstrap=50))
    assert held.n.test == 12 and held.n.train == 0 and held.all_rows_test
    assert not held.skipped_routers, "always-best and task-best come from the artifact's records"
    recorded = load_artifact(str(work / "router")).meta.training_metrics
    assert set(recorded["task_best"]["groups"]) == {"mmlu", "gsm8k", "cmmlu", "arc_challenge"}
    assert "humaneval" not in recorded["task_best"]["groups"]
    test = held.subsets["test"]
    # on a task it never saw, task-best is the best single target of the artifact's train + val rows
    assert test.routers["task-best"].accuracy == pytest.approx(
        test.references.single[recorded["task_best"]["default"]].accuracy)
    assert "task-best" in held.artifact_baselines and (fresh / "eval" / "report.json").is_file()
    assert held.novelty["test_rows"] == 12 and held.novelty["threshold"] == report["novelty"]["threshold"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_adapt_stage_competes_with_tunes_choice_and_its_artifact_replaces_fits_only_when_chosen(
        tmp_path, local_ray):
    """Tune, then an adapted encoder cross-validated on tune's folds: with margin -1 it is chosen and its
    artifact is evaluated and published; re-run with margin 1 (the earlier stages skipped), it is not, and
    fit's artifact is evaluated again."""
    from shared.artifact import read_meta

    work, published = tmp_path / "work", tmp_path / "published"
    overrides = [
        f"work_dir={work}", f"data_import.inputs=[{slice_files(tmp_path / 'rows', SEEN, 0, 16)}]",
        "capture.layers=[2,3]", "capture.token_layers=[2]", "capture.token_window=32", "capture.shard_size=32",
        "capture.max_actors=1", "capture.max_tokens=512", "probe.folds=3", "probe.pca_dims=8", "probe.n_blocks=1",
        "tune.minilm=false", "tune.folds=3", "tune.seeds=1", "tune.candidates=[{blocks: probe, n_components: 4}]",
        f"tune.trunk={TINY_TRUNK}", "fit.train.seeds=1", "fit.train.keep=1", "fit.train.num_workers=1",
        f"fit.train.trunk={TINY_TRUNK}", "evaluate.routers=[random]", "evaluate.bootstrap=20",
        "evaluate.task_min_rows=5", f"publish.uri={published}",
        "adapt={from_layer: 2, n_blocks: 1, window: 32, n_components: 4, margin: -1.0, train: {hidden: [16], "
        "dropout: [0.0], batch_size: 8, max_epochs: 1, evals_per_epoch: 1, warm_epochs: 5, patience: 1}}"]
    summary = run_pipeline(load_config(PipelineConfig, ROOT / "configs" / "pipeline-routerdc.yaml", overrides))
    adapt = summary["stages"]["adapt"]
    assert adapt["chosen"] and adapt["artifact"] == str(work / "router-adapted")
    report = json.loads((work / "adapt" / "adapt.json").read_text())
    tune = json.loads((work / "tune" / "tune.json").read_text())
    assert report["tune_best"]["label"] == tune["best"]["label"] and report["n_rows"] == tune["n_rows"]
    assert len(report["adapted"]["folds"]) == 3 and 0 <= report["adapted"]["pairwise_auc"] <= 1
    assert report["adapted"]["blocks"] == ["h3a2_last", "h3a2_mean"]
    assert json.loads((work / "eval" / "report.json").read_text())["artifact"] == str(work / "router-adapted")
    assert read_meta(str(work / "router-adapted")).adapter.from_layer == 2
    assert summary["stages"]["publish"]["published"]
    assert read_meta(summary["stages"]["publish"]["artifact"]).adapter is not None

    again = run_pipeline(load_config(PipelineConfig, ROOT / "configs" / "pipeline-routerdc.yaml",
                                     [*overrides[:-1], overrides[-1].replace("margin: -1.0", "margin: 1.0")]))
    stages = again["stages"]
    assert all(stages[s].get("skipped") for s in ("data", "probe", "tune", "fit"))
    assert not stages["adapt"]["chosen"] and stages["adapt"]["artifact"] is None
    assert not stages["evaluate"].get("skipped")
    assert json.loads((work / "eval" / "report.json").read_text())["artifact"] == str(work / "router")
