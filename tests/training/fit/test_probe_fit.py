"""Probe and fit stages on synthetic activations/labels in the real on-disk formats."""

import json

import numpy as np
import pytest

from shared.artifact import load_artifact
from tests.synthetic import write_synthetic
from training.dataset import load_routing_data
from training.fit.run import FitConfig, run_fit
from training.fit.probe import ProbeConfig, run_probe


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("synth")), n=1000)


def test_failed_labels_are_masked_not_zero(synth):
    data = load_routing_data(synth["activations"], synth["labels"], synth["targets"])
    assert data.Y.shape == (1000, 2) and np.isnan(data.Y).any()
    known = ~np.isnan(data.Y)
    assert np.array_equal(data.Y[known], synth["correct"][known])
    assert set(data.blocks) == {f"h{layer}_{p}" for layer in (0, 1, 2) for p in ("last", "mean")}


def test_probe_finds_the_informative_layer_without_test_rows(synth, tmp_path):
    cfg = ProbeConfig(activations=synth["activations"], labels=synth["labels"], targets=synth["targets"],
                      out=str(tmp_path), folds=3, n_blocks=2)
    report = run_probe(cfg)
    assert set(report["selected"]["blocks"]) == {"h2_last", "h2_mean"}
    assert all(b.startswith("h2_") for b in report["selected"]["per_target"].values())
    blocks = report["blocks"]
    for t in synth["targets"]:
        assert blocks["h2_last"]["per_target"][t]["auc"] > blocks["h0_last"]["per_target"][t]["auc"] + 0.1
        assert blocks["h2_last"]["per_target"][t]["J"] > blocks["h0_last"]["per_target"][t]["J"]
    n_test = int(np.sum(load_routing_data(synth["activations"], synth["labels"], synth["targets"]).split == "test"))
    assert report["n_rows"] == 1000 - n_test
    assert (tmp_path / "probe_layers.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "probe.json").read_text())["selected"] == report["selected"]
    with pytest.raises(ValueError, match="test split"):
        run_probe(cfg.model_copy(update={"splits": ["train", "test"]}))


@pytest.mark.slow
def test_fit_on_ray_train_writes_a_loadable_artifact(synth, tmp_path):
    import ray

    from shared.ray_boot import ensure_ray

    ensure_ray("local", num_cpus=2, log_to_driver=False)
    try:
        cfg = FitConfig(activations=synth["activations"], labels=synth["labels"], targets=synth["targets"],
                        out=str(tmp_path / "router"), blocks=["h2_last", "h1_mean"], n_components=8,
                        train={"seeds": 2, "keep": 1, "num_workers": 2, "storage_path": str(tmp_path / "ckpt"),
                               "trunk": {"max_epochs": 100, "patience": 10, "batch_size": 64}})
        meta = run_fit(cfg)
    finally:
        ray.shutdown()
    assert meta["layers"] == [1, 2] and meta["pooling"] == {"h2_last": "last", "h1_mean": "mean"}
    assert meta["encoder"]["name"] == "smollm2-135m" and meta["trunk"]["n_members"] == 1
    assert [t["name"] for t in meta["targets"]] == synth["targets"]
    assert meta["targets"][0]["price_in"] == 0.02  # from the registry
    router = load_artifact(str(tmp_path / "router"), expected_encoder="smollm2-135m")
    data = load_routing_data(synth["activations"], synth["labels"], synth["targets"]).where("test")
    P = router.predict_proba(data.blocks)
    from training.metrics import masked_auc

    # Bayes-optimal AUC of this problem is about 0.78; a single-layer probe gets 0.75-0.80.
    assert np.nanmean(masked_auc(data.Y, P)) > 0.68
    assert meta["training_metrics"]["val_mean_auc"] > 0.68


def test_select_blocks_depth_tolerance_prefers_shallower_near_ties():
    from training.fit.probe import select_blocks

    aucs = {"h6_last": (0.70, 0.72), "h12_mean": (0.79, 0.80), "h24_last": (0.80, 0.81), "h30_mean": (0.60, 0.62)}
    report = {b: {"per_target": {"a": {"auc": x}, "b": {"auc": y}}} for b, (x, y) in aucs.items()}
    plain = select_blocks(report, ["a", "b"], 2)
    assert plain["blocks"] == ["h24_last", "h12_mean"] and plain["per_target"] == {"a": "h24_last", "b": "h24_last"}
    # h12_mean (0.795) is within 0.02 of the best (0.805): it goes first, then h24_last
    assert select_blocks(report, ["a", "b"], 1, depth_tolerance=0.02)["blocks"] == ["h12_mean"]
    assert select_blocks(report, ["a", "b"], 2, depth_tolerance=0.02)["blocks"] == ["h12_mean", "h24_last"]
    # a wide tolerance admits h6 too; the rest still fills by mean AUC
    assert select_blocks(report, ["a", "b"], 3, depth_tolerance=0.2)["blocks"] == ["h6_last", "h12_mean", "h24_last"]


def test_fit_run_name_changes_with_inputs_so_resume_never_mixes_configs():
    """Ray Train resumes a run by name: a different feature size, trunk or objective must not resume an old run."""
    from training.fit.run import run_name
    from training.objectives import ObjectiveConfig

    train = FitConfig(activations="a", labels="l", targets=["t"]).train
    X, Y = np.ones((10, 4), np.float32), np.zeros((10, 1))
    name = run_name(train, X, Y)
    assert name.startswith(train.name + "-") and name == run_name(train, X.copy(), Y.copy())
    assert run_name(train, np.ones((10, 8), np.float32), Y) != name
    Y2 = Y.copy()
    Y2[0, 0] = np.nan
    assert run_name(train, X, Y2) != name
    assert run_name(train.model_copy(update={"seeds": 3}), X, Y) != name
    ranked = train.trunk.model_copy(update={"objective": ObjectiveConfig(kind="listwise")})
    assert run_name(train.model_copy(update={"trunk": ranked}), X, Y) != name
    assert run_name(train.model_copy(update={"num_workers": 1}), X, Y) == name


def test_tune_ranks_the_informative_block_first_without_test_rows(synth, tmp_path):
    from training.loop import TrunkConfig
    from training.fit.tune import TuneConfig, run_tune

    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"selected": {"blocks": ["h2_last"]}}))
    cfg = TuneConfig(activations=synth["activations"], labels=synth["labels"], targets=synth["targets"],
                     probe_report=str(probe), out=str(tmp_path / "tune"), folds=3, seeds=1,
                     trunk=TrunkConfig(hidden=[16], dropout=[0.1], lr=1e-2, batch_size=64, max_epochs=40, patience=5),
                     candidates=[{"blocks": ["h0_last"], "n_components": 24}, {"blocks": "probe", "n_components": 24},
                                 {"blocks": "probe", "n_components": 24, "objective": {"kind": "pairwise"}}])
    report = run_tune(cfg)
    noise, signal, ranked = report["candidates"]
    assert signal["blocks"] == ["h2_last"] and report["best"]["label"] in (signal["label"], ranked["label"])
    assert ranked["label"] == "h2_last / 24 / pairwise x1" and ranked["objective"]["kind"] == "pairwise"
    assert signal["objective"]["kind"] == "bce" and "mean_within_task_auc" not in signal  # no query table: no tasks
    assert min(signal["pairwise_auc"], ranked["pairwise_auc"]) > noise["pairwise_auc"] + 0.05
    for t in synth["targets"]:
        assert signal["auc"][t] > 0.75 and noise["auc"][t] < 0.65
    n_test = int(np.sum(load_routing_data(synth["activations"], synth["labels"], synth["targets"]).split == "test"))
    assert report["n_rows"] == 1000 - n_test
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="unknown blocks"):
        run_tune(TuneConfig(**{**cfg.model_dump(), "candidates": [{"blocks": ["h9_last"], "n_components": 4}]}))
    with pytest.raises(ValueError, match="test split"):
        run_tune(TuneConfig(**{**cfg.model_dump(), "splits": ["train", "test"]}))


def test_choose_candidate_prefers_shallow_near_ties_and_never_minilm():
    from training.fit.tune import choose_candidate

    rows = [{"blocks": ["h21_last"], "mean_auc": 0.73}, {"blocks": ["h6_mean", "h9_last"], "mean_auc": 0.72},
            {"blocks": ["h3_mean"], "mean_auc": 0.70}, {"blocks": ["minilm"], "mean_auc": 0.80}]
    assert choose_candidate(rows)["blocks"] == ["h21_last"]
    assert choose_candidate(rows, depth_tolerance=0.02)["blocks"] == ["h6_mean", "h9_last"]
    assert choose_candidate(rows, depth_tolerance=0.05)["blocks"] == ["h3_mean"]
    with pytest.raises(ValueError, match="no prefill"):
        choose_candidate(rows[3:])
    unscored = {"blocks": ["h0_last"], "mean_auc": float("nan")}  # no fold had both classes
    assert choose_candidate([unscored, *rows], depth_tolerance=0.05)["blocks"] == ["h3_mean"]
    with pytest.raises(ValueError, match="no prefill"):
        choose_candidate([unscored])


def test_fit_takes_blocks_then_the_tune_choice_then_the_probe_selection(tmp_path):
    from training.fit.run import chosen_features

    (tmp_path / "tune.json").write_text(json.dumps({"best": {"blocks": ["h6_mean", "h9_last"], "n_components": 32}}))
    (tmp_path / "probe.json").write_text(json.dumps({"selected": {"blocks": ["h21_last"]}}))
    base = {"activations": "a", "labels": "l", "targets": ["t"], "n_components": 128}
    both = FitConfig(**base, tune_report=str(tmp_path / "tune.json"), probe_report=str(tmp_path / "probe.json"))
    assert chosen_features(both) == (["h6_mean", "h9_last"], 32, "tune")
    assert chosen_features(both.model_copy(update={"blocks": ["h3_last"]})) == (["h3_last"], 128, "config")
    assert chosen_features(both.model_copy(update={"tune_report": None})) == (["h21_last"], 128, "probe")
    assert chosen_features(FitConfig(**base)) == (None, 128, "all")


def test_fit_trains_with_the_objective_tune_chose(tmp_path):
    from training.fit.run import chosen_objective

    chosen = {"kind": "listwise", "weight": 5.0, "temperature": 0.05}
    (tmp_path / "tune.json").write_text(json.dumps({"best": {"blocks": ["h6_mean"], "n_components": 32,
                                                             "objective": chosen}}))
    (tmp_path / "old.json").write_text(json.dumps({"best": {"blocks": ["h6_mean"], "n_components": 32}}))
    cfg = FitConfig(activations="a", labels="l", targets=["t"], tune_report=str(tmp_path / "tune.json"))
    assert chosen_objective(cfg).model_dump(include=set(chosen)) == chosen  # (sample_llm adds fields, at defaults)
    assert chosen_objective(cfg.model_copy(update={"blocks": ["h3_last"]})).kind == "bce"  # config blocks: config trunk
    assert chosen_objective(cfg.model_copy(update={"tune_report": str(tmp_path / "old.json")})).kind == "bce"


def test_choose_candidate_by_another_score():
    from training.fit.tune import choose_candidate

    rows = [{"blocks": ["h6_last"], "mean_auc": 0.73, "pairwise_auc": 0.60},
            {"blocks": ["h9_last"], "mean_auc": 0.70, "pairwise_auc": 0.66}, {"blocks": ["h3_last"], "mean_auc": 0.72}]
    assert choose_candidate(rows)["blocks"] == ["h6_last"]
    assert choose_candidate(rows, key="pairwise_auc")["blocks"] == ["h9_last"]  # a row without the score: never
    with pytest.raises(ValueError, match="mean_within_task_auc"):
        choose_candidate(rows, key="mean_within_task_auc")
