"""Evaluating a foreign artifact on a fresh table: every row is test, baselines that need
train rows are skipped (or fitted on given train data), activations the artifact cannot read
are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.dataset import RoutingData
from training.evaluate.run import EvalConfig, run_evaluation
from tests.training.evaluate.test_evaluate import evaluated, lookup_embedder, one_thread, write_datasets  # noqa: F401 - fixtures

def _write_manifest(acts: Path, **identity) -> None:
    from shared import storage

    storage.write_json(str(acts / "manifest.json"), {"identity": identity})


def _fresh(data: RoutingData) -> RoutingData:
    """The test rows alone, as a newly imported table would hold them (every row 'test')."""
    te = data.where("test")
    return replace(te, split=np.full(len(te.query_ids), "test"))


IDENT = {"encoder": {"name": "smollm2-135m", "sha256": "abc"}, "layers": [4, 8], "poolings": ["last", "mean"]}


def test_foreign_artifact_on_an_all_test_table_skips_the_trained_baselines(evaluated, tmp_path):
    data, cfg, _ = evaluated
    fresh = _fresh(data)
    paths = write_datasets(fresh, tmp_path)
    _write_manifest(tmp_path / "acts", **IDENT)
    ecfg = EvalConfig(artifact=cfg.artifact, out=str(tmp_path / "out"), bootstrap=20, **paths,
                      routers=["random", "always-best", "knn-minilm", "mlp-minilm", "task-best"])
    report = run_evaluation(ecfg)  # no MiniLM is loaded: the semantic baselines are skipped
    assert report.all_rows_test and report.n.test == len(fresh.query_ids)
    assert report.n.train == report.n.val == 0
    assert set(report.subsets["test"].routers) == {"prefill-router", "random"}
    assert report.skipped_routers == {"always-best": "needs train rows (none given); the artifact records no best "
                                                     "single target (fitted before fit recorded one)",
                                         "knn-minilm": "needs train rows (none given)",
                                         "mlp-minilm": "needs train and val rows (none given)",
                                         "task-best": "needs train rows (none given); the artifact records no "
                                                      "task-level choices (evaluate records them when it scores "
                                                      "task-best with train rows)"}
    op = report.operating_point
    assert op.status == "default" and "no val rows" in op.note and not report.operating_point_written
    assert set(report.by_task) == {"task0", "task1"} and report.semantic_text is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "scored as test (all_rows_test)" in md and "Skipped (not evaluated): `always-best` needs train" in md
    # all_rows_test: true scores every row of a table that has train rows too
    whole = write_datasets(data, tmp_path / "whole")
    full = run_evaluation(ecfg.model_copy(update={**whole, "all_rows_test": True, "routers": ["random"],
                                                  "out": str(tmp_path / "out2")}))
    assert full.n.test == len(data.query_ids) and full.n.train == 0


def test_always_cheapest_and_always_best_come_from_the_artifact_on_an_all_test_table(evaluated, tmp_path):
    import json

    from shared.artifact import copy_artifact
    from training.evaluate.baselines import AlwaysBest
    from training.router_meta import best_single_record

    data, cfg, _ = evaluated
    train = data.where("train")
    record = best_single_record(train)  # what fit now keeps in the artifact: always-best's own choice on train
    assert record["target"] == data.targets[AlwaysBest().fit(train, []).index] and record["n"] == len(train.query_ids)
    uri = str(tmp_path / "router")
    copy_artifact(cfg.artifact, uri)
    meta = json.loads((tmp_path / "router" / "meta.json").read_text())
    meta["training_metrics"]["best_single"] = {**record, "target": "mid"}  # not the test rows' best: read, not refitted
    (tmp_path / "router" / "meta.json").write_text(json.dumps(meta))
    fresh = _fresh(data)
    ecfg = EvalConfig(artifact=uri, out=str(tmp_path / "out"), bootstrap=0, **write_datasets(fresh, tmp_path),
                      routers=["random", "always-cheapest", "always-best", "knn-minilm"])
    report = run_evaluation(ecfg)
    assert report.skipped_routers == {"knn-minilm": "needs train rows (none given)"}
    refs = report.subsets["test"].references
    assert report.router("always-best").accuracy == pytest.approx(refs.single["mid"].accuracy)
    assert report.router("always-cheapest").cost == pytest.approx(refs.single["small"].cost)  # the lowest prices
    assert set(report.artifact_baselines) == {"always-cheapest", "always-best"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "From the artifact (no train rows): `always-cheapest` always takes small" in md
    assert f"`always-best` always takes mid, the best single target on the artifact's {len(train.query_ids)} train" in md


def test_foreign_artifact_with_train_data_fits_the_baselines(evaluated, tmp_path):
    data, cfg, before = evaluated
    fresh = write_datasets(_fresh(data), tmp_path / "fresh")
    train = write_datasets(data, tmp_path / "train")
    index = {f"question {q}": i for i, q in enumerate(data.query_ids)}
    table = lookup_embedder(data)(list(data.query_ids))
    ecfg = EvalConfig(artifact=cfg.artifact, out=str(tmp_path / "out"), **fresh, train_data=train, bootstrap=0,
                      routers=["random", "always-best", "knn-minilm", "task-best"], knn_ks=[10, 30],
                      operating_point={"target_accuracy": "best_single"}, write_operating_point=False)
    report = run_evaluation(ecfg, embedder=lambda texts: table[[index[t] for t in texts]])
    n = {s: int((data.split == s).sum()) for s in ("train", "val", "test")}
    assert report.all_rows_test and {k: getattr(report.n, k) for k in n} == n and report.skipped_routers == {}
    ours, then = (r.router("prefill-router") for r in (report, before))
    for key in ("policy", "param", "accuracy", "cost", "gap_closed", "mean_auc"):  # same val calibration and rows
        assert getattr(ours, key) == pytest.approx(getattr(then, key)), key
    kept = ours.candidate_points[ours.policy]  # every calibrated policy on test; the kept one is the row itself
    assert set(ours.candidate_points) == {"tolerance", "value"} and (kept.param, kept.accuracy) == (ours.param, ours.accuracy)
    assert set(report.subsets["test"].routers) == {"prefill-router", "random", "always-best", "knn-minilm",
                                                         "task-best"}
    with pytest.raises(ValueError, match="also train / val rows of train_data"):
        run_evaluation(ecfg.model_copy(update={**train, "all_rows_test": True}))
    with pytest.raises(ValueError, match="train_data is for a table scored all as test"):
        run_evaluation(ecfg.model_copy(update={**train, "all_rows_test": False}))


def test_evaluate_refuses_activations_the_artifact_cannot_read(evaluated, tmp_path):
    from training.evaluate.run import main

    data, cfg, _ = evaluated
    fresh = _fresh(data)
    paths = write_datasets(fresh, tmp_path)
    ecfg = EvalConfig(artifact=cfg.artifact, out=str(tmp_path / "out"), routers=["random"], bootstrap=0, **paths)
    cases = [({**IDENT, "encoder": {"name": "qwen3-0.6b"}}, "fitted on encoder name='smollm2-135m', but .* "
              "captured with name='qwen3-0.6b'"),
             ({**IDENT, "layers": [4], "poolings": ["last"]}, r"reads layers/poolings \['h4_last', 'h8_mean'\]"),
             ({**IDENT, "hidden_size": 576}, "has hidden size 576")]
    for identity, match in cases:
        _write_manifest(tmp_path / "acts", **identity)
        with pytest.raises(ValueError, match=match):
            run_evaluation(ecfg)
    args = [f"{k}={v}" for k, v in paths.items()] + [f"artifact={cfg.artifact}", f"out={tmp_path / 'o'}"]
    assert main(args) == 2  # one red line, no traceback
    narrow = replace(fresh, blocks={"h4_last": fresh.blocks["h4_last"][:, :10], "h8_mean": fresh.blocks["h8_mean"]})
    with pytest.raises(ValueError, match="h4_last has width 10"):
        run_evaluation(ecfg, data=narrow)


def test_a_next_block_is_three_wide_whatever_the_hidden_size(tmp_path):
    """The width check reads h<L>_next as NEXT_TOKEN_DIMS wide, hidden-state blocks as hidden_size."""
    from types import SimpleNamespace as NS

    from shared.features import NEXT_TOKEN_DIMS
    from training.evaluate.run import check_activations

    def artifact(next_width):
        blocks = [NS(name="h18_last", d_in=576), NS(name="h30_next", d_in=next_width)]
        meta = NS(encoder=NS(name="smollm2-135m", sha256=None, revision=None), layers=[18, 30],
                  poolings=["last", "next"], transform=NS(blocks=blocks))
        return NS(router=NS(meta=meta, block_names=["h18_last", "h30_next"]))

    _write_manifest(tmp_path, encoder={"name": "smollm2-135m"}, layers=[18, 30], poolings=["last", "next"],
                    num_layers=30, hidden_size=576)
    check_activations(artifact(NEXT_TOKEN_DIMS), "a", str(tmp_path))  # columns from layers x poolings: h30_next
    with pytest.raises(ValueError, match=r"blocks \['h30_next'\] of width"):
        check_activations(artifact(576), "a", str(tmp_path))
