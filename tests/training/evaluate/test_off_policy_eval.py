"""`evaluate` on labels imported from a decision log: the off-policy section of the report (IPS / SNIPS /
DR of every router, the logging policy as reference), the classical metrics it skips, and the publish
gate on dr_accuracy re-scoring the published artifact on the same logged rows.

The log is simulated: 700 prompts with known P(correct) per target (from an 8-dimensional feature that
the synthetic activations carry), routed by an epsilon-greedy logging router, every answer scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import storage
from shared.artifact import ArtifactMeta, EncoderInfo, PolicyDefaults, TargetInfo, save_artifact
from shared.decision_log import DECISIONS, FEEDBACK, DecisionRecord, FeedbackRecord, part_uri, prompt_hash
from shared.trunk import FeatureTransform
from training.data.import_config import ImportConfig
from training.data.importer import run_import
from training.dataset import load_routing_data
from training.loop import TrunkConfig, build_ensemble, train_one
from training.shards import check_manifest, shard_path

A, B = "smollm2-135m", "gpt-4o-mini"
COST = {A: 1e-4, B: 2e-3}
EPSILON = 0.3
N = 700
T0 = 1_750_000_000.0
SMALL = TrunkConfig(hidden=[16], dropout=[0.0], batch_size=128, max_epochs=40, patience=6)


def truth(x: np.ndarray) -> np.ndarray:
    """``(n, 2)`` true P(correct) of A and B: B is better where feature 1 is high."""
    return 1 / (1 + np.exp(-np.stack([2 * x[:, 0] - 0.3, 1.5 * x[:, 0] + 2.5 * x[:, 1] + 0.3], axis=1)))


def simulate(root: Path) -> tuple[str, np.ndarray]:
    """Write the log: request i asks prompt i % N (the first 40 prompts twice); the logging router sends it to B
    when feature 0 is low, explores the other target with probability EPSILON; every 10th request is pinned to B.
    Returns the log's URI and the features ``(N, 8)``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8))
    P = truth(x)
    decisions, feedback = [], []
    for i in range(N + 40):
        q = i % N
        messages = [{"role": "user", "content": f"question {q}"}]
        chosen = 1 if x[q, 0] < 0 else 0
        pinned = i % 10 == 9
        explored = not pinned and rng.random() < EPSILON
        target = 1 if pinned else (1 - chosen if explored else chosen)
        prop = None if pinned else (EPSILON if explored else 1 - EPSILON)
        rid, name = f"r{i}", (A, B)[target]
        decisions.append(DecisionRecord(
            request_id=rid, time=T0 + i, endpoint="chat", model=B if pinned else "router", target=name,
            chosen=None if pinned else (A, B)[chosen], explored=explored, propensity=prop, expected_cost=COST,
            prompt_tokens=10, completion_tokens=20, response="ok", prompt_hash=prompt_hash(messages),
            messages=json.dumps(messages)))
        feedback.append(FeedbackRecord(request_id=rid, time=T0 + i + 0.5, score=float(rng.random() < P[q, target]),
                                       source="user"))
    uri = str(root / "log")
    for kind, records in ((DECISIONS, decisions), (FEEDBACK, feedback)):
        storage.write_parquet(type(records[0]).table(records), part_uri(uri, kind, records[0].time, "w1", 0))
    return uri, x


def write_activations(root: Path, queries: str, x: np.ndarray) -> str:
    """Activations of the imported queries: block h4_last = the prompt's features plus noise."""
    table = pq.read_table(queries).to_pylist()
    idx = [int(r["messages"][0]["content"].split()[1]) for r in table]
    feats = (x[idx] + np.random.default_rng(1).normal(scale=0.3, size=(len(idx), 8))).astype(np.float32)
    acts = str(root / "activations")
    check_manifest(acts, {"encoder": {"name": "smollm2-135m", "sha256": None}, "synthetic": True})
    storage.write_parquet(pa.table({"query_id": [r["query_id"] for r in table], "split": [r["split"] for r in table],
                                    "n_tokens": [10] * len(table),
                                    "h4_last": pa.FixedShapeTensorArray.from_numpy_ndarray(feats)}),
                          shard_path(acts, 0))
    return acts


def fit_artifact(data, uri: str, flip: bool = False) -> str:
    """A small real artifact on the logged train / val cells (``flip``: on 1 - y, a bad router)."""
    tr, va = data.where("train"), data.where("val")
    transform = FeatureTransform.fit({"h4_last": tr.blocks["h4_last"]}, n_components=8)
    Xtr, Xva = (transform.transform({"h4_last": d.blocks["h4_last"]}) for d in (tr, va))
    Ytr, Yva = (1 - d.Y if flip else d.Y for d in (tr, va))
    ensemble = build_ensemble([train_one(Xtr, Ytr, None, Xva, Yva, None, seed=s, cfg=SMALL) for s in (0, 1)])
    meta = ArtifactMeta(encoder=EncoderInfo(name="smollm2-135m"), layers=[4], pooling={"h4_last": "last"},
                        targets=[TargetInfo(name=t, price_in=p, price_out=4 * p, median_output_tokens=20)
                                 for t, p in ((A, 0.1), (B, 2.0))],
                        policy=PolicyDefaults(tolerance=0.05))
    save_artifact(uri, meta, transform, ensemble)
    return uri


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks train faster on one thread
    root = tmp_path_factory.mktemp("logged")
    log, x = simulate(root)
    imp = ImportConfig(format="decision-log", inputs=[log], output=str(root / "queries.parquet"),
                       labels=str(root / "labels"))
    run_import(imp)
    acts = write_activations(root, imp.output, x)
    data = load_routing_data(acts, imp.labels, [A, B])
    good, bad = fit_artifact(data, str(root / "good")), fit_artifact(data, str(root / "bad"), flip=True)
    yield {"root": root, "labels": imp.labels, "queries": imp.output, "activations": acts, "data": data, "x": x,
           "good": good, "bad": bad}
    torch.set_num_threads(threads)


def eval_config(logged, artifact: str, out: str, **kw):
    from training.evaluate.run import EvalConfig

    return EvalConfig(artifact=artifact, activations=logged["activations"], labels=logged["labels"],
                      queries=logged["queries"], out=str(logged["root"] / out), bootstrap=200,
                      **{"routers": ["random", "always-cheapest", "always-best"], **kw})


@pytest.fixture(scope="module")
def report(logged):
    from training.evaluate.run import run_evaluation

    return run_evaluation(eval_config(logged, logged["good"], "eval"))


def test_the_loaded_labels_carry_propensities(logged):
    data = logged["data"]
    assert data.logged and data.propensity.shape == data.Y.shape
    labelled = ~np.isnan(data.Y)
    assert np.isnan(data.propensity[~labelled]).all() and (data.decisions[~labelled] == 0).all()
    assert set(np.unique(data.propensity[labelled & ~np.isnan(data.propensity)]).round(6)) == {0.3, 0.7}
    assert data.decisions.max() == 2                                   # the prompts asked twice, same target


def test_report_has_the_off_policy_section(logged, report):
    out = json.loads((Path(report.config["out"]) / "report.json").read_text())
    off = out["off_policy"]
    data = logged["data"].where("test")
    labelled = ~np.isnan(data.Y)
    assert off["n_rows"] == labelled.sum()
    assert off["n_without_propensity"] == (labelled & np.isnan(data.propensity)).sum()
    assert off["n_without_propensity"] > 0 and off["n_used"] == off["n_rows"] - off["n_without_propensity"]
    assert set(off["routers"]) == {"prefill-router", "random", "always-cheapest", "always-best"}
    used = labelled & ~np.isnan(data.propensity)
    d = data.decisions[used]
    assert off["logging_policy"]["accuracy"][0] == pytest.approx((data.Y[used] * d).sum() / d.sum())
    assert off["n_decisions"] == d.sum()
    ours = off["routers"]["prefill-router"]
    for key in ("accuracy", "cost"):
        for est in ("ips", "snips", "dm", "dr"):
            value, low, high = ours[key][est]
            assert low <= value <= high
    assert ours["reward_model"] == "prefill-router" and off["routers"]["random"]["reward_model"] == "prefill-router"
    assert off["routers"]["random"]["n_match"] == off["n_used"]       # a mixed router may pick any logged target
    assert set(off["skipped_metrics"]) == {"disagreement", "operating_point_interval", "task_averaged_interval"}
    assert set(out["subsets"]) == {"test"} and out["operating_point_interval"] is None
    md = (Path(report.config["out"]) / "report.md").read_text()
    assert "## Off-policy estimates (logged traffic)" in md and "logging policy (the log as served)" in md
    assert "observed cells only" in md and "## Test split" in md


def test_the_estimates_track_the_truth(logged, report):
    """The simulated truth of each router on the test queries (as requests: the repeated prompts twice) lies in
    or near its DR interval, and the prefill router beats the logging policy only if its truth does."""
    from shared.policy import Policy
    from training.evaluate.baselines import ArtifactRouter
    from training.evaluate.scoring import decision_costs

    data = logged["data"].where("test")
    off = report.off_policy
    ids = [int(t.split()[1]) for t in _texts(logged, data.query_ids)]
    P = truth(logged["x"][ids])
    art = ArtifactRouter.load(logged["good"])
    choice = Policy.of(report.operating_point.policy, report.operating_point.param).route(
        art.predict_proba(data, []), decision_costs(art.router, data))
    w = np.where(np.isnan(data.propensity), 0.0, data.decisions).sum(axis=1)  # logged requests per query
    routed = (P[np.arange(len(ids)), choice] * w).sum() / w.sum()
    low, high = off.routers["prefill-router"].accuracy.dr[1:]
    assert low - 0.03 <= routed <= high + 0.03
    low, high = off.routers["always-cheapest"].accuracy.dr[1:]          # always A, the cheaper target
    assert low - 0.03 <= (P[:, 0] * w).sum() / w.sum() <= high + 0.03


def _texts(logged, query_ids) -> list[str]:
    rows = {r["query_id"]: r["messages"][0]["content"] for r in pq.read_table(logged["queries"]).to_pylist()}
    return [rows[q] for q in query_ids]


def test_publish_gates_on_dr_accuracy(logged, report):
    from cluster.pipeline.publish import PublishConfig, artifact_test_metrics, publish

    new = artifact_test_metrics(report)
    assert new["dr_accuracy"] == report.off_policy.routers["prefill-router"].accuracy.dr[0]
    assert {"ips_accuracy", "snips_accuracy", "gap_closed"} <= set(new)
    cfg = eval_config(logged, logged["good"], "eval-again")
    pub = PublishConfig(uri=str(logged["root"] / "published"), baseline=logged["bad"], metric="dr_accuracy")
    done = publish(pub, logged["good"], new, cfg, str(logged["root"] / "work-good"))
    assert done["published"] and done["metric"] == "dr_accuracy" and done["current"] < done["new"]

    from training.evaluate.run import run_evaluation

    worse = artifact_test_metrics(run_evaluation(eval_config(logged, logged["bad"], "eval-bad", routers=[])))
    refused = publish(pub.model_copy(update={"baseline": logged["good"], "uri": str(logged["root"] / "p2")}),
                      logged["bad"], worse, cfg, str(logged["root"] / "work-bad"))
    assert not refused["published"] and refused["current"] == pytest.approx(new["dr_accuracy"])
    assert refused["new"] == worse["dr_accuracy"] < new["dr_accuracy"]
    plain = {k: v for k, v in new.items() if not k.endswith("_accuracy") or k == "accuracy"}
    no_log = publish(pub, logged["good"], plain, cfg, str(logged["root"] / "work-none"))
    assert not no_log["published"] and "no propensities" in no_log["reason"]
