"""Label, capture and fit on a cluster of three Ray nodes (issue 35, parts 1 and 2): the work runs on two
worker nodes, S3 (moto) is the only storage they share, and the results equal a single process's.
A node with a disk of its own loses nothing where the driver writes (label, capture), and a path it
cannot see stops fit, whose Ray Train workers write checkpoints, before any work starts. A worker
node killed mid-label or mid-capture costs no query and repeats none."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shared import storage
from shared.config import load_config
from shared.errors import ConfigError
from tests.multinode.conftest import ONE_PER_NODE, own_disk_node
from tests.procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
LAYERS = [0, 6]


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """8 real queries with references: 6 MMLU + 2 one-digit sums."""
    from training.data.build import DataConfig, run_build

    out = tmp_path_factory.mktemp("q") / "queries.parquet"
    run_build(load_config(DataConfig, ROOT / "configs" / "data-quick.yaml", [
        f"output={out}", "mmlu.n=6", "reasoning_gym=[{task: basic_arithmetic, n: 2, config: {min_terms: 2, "
        "max_terms: 2, min_digits: 1, max_digits: 1}}]"]))
    return out


@pytest.fixture(scope="module")
def bucket(nodes, moto_s3) -> str:
    import boto3

    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
        Bucket="multinode")
    return "s3://multinode"


def test_a_node_with_a_disk_of_its_own_loses_no_shard_and_a_checkpoint_path_it_cannot_see_fails_at_once(
        nodes, queries, tmp_path):
    """A third node sees an empty tmpfs where the driver sees ``hidden``. Capture into ``hidden`` with its
    one actor on that node (the only one with 3 CPUs free): every result comes back to the driver, which
    writes the shards, so none is lost. Fit's checkpoints are written by Ray Train workers: ``hidden`` as
    ``train.storage_path`` stops fit before it trains, naming the node."""
    from tests.synthetic import write_synthetic
    from training.capture.run import CaptureConfig, read_features, run_capture
    from training.fit.run import FitConfig, run_fit

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    synth = write_synthetic(str(tmp_path / "synth"), n=60, d=4)
    with own_disk_node(nodes["address"], hidden, nodes["root"] / "own-disk", cpus=4):
        capture = load_config(CaptureConfig, None, [
            f"queries={queries}", f"out={hidden / 'acts'}", "layers=[0]", "progress=false", "shard_size=2",
            "min_actors=1", "max_actors=1", "num_cpus=3"])
        assert run_capture(capture)["captured_rows"] == pq.read_table(queries).num_rows
        ids, _ = read_features(str(hidden / "acts"), "h0_last")
        assert ids == pq.read_table(queries).column("query_id").to_pylist()
        cfg = FitConfig(activations=synth["activations"], labels=synth["labels"], targets=synth["targets"],
                        out=str(tmp_path / "router"), blocks=["h2_last"], n_components=2,
                        train={"seeds": 1, "num_workers": 1, "storage_path": str(hidden / "ckpt")})
        with pytest.raises(ConfigError, match=r"train.storage_path=.* cannot see it .*Use an s3:// URI"):
            run_fit(cfg)
        assert not (hidden / "ckpt").exists() or not any((hidden / "ckpt").iterdir()), "training started"


def test_capture_and_label_on_two_worker_nodes_through_s3(nodes, bucket, queries, smollm):
    """One actor per worker node (1.5 CPUs each on 2-CPU nodes, the head has none), shards to S3; every
    query once, and the vectors are the encoder's."""
    from shared.encoder import Encoder
    from training.capture.run import CaptureConfig, read_features, run_capture
    from training.label.run import LabelConfig, run_label
    from training.labels import read_target

    n = pq.read_table(queries).num_rows
    capture = load_config(CaptureConfig, None, [
        f"queries={queries}", "out=s3://multinode/acts", f"layers={LAYERS}", "poolings=[last, mean]",
        "shard_size=2", "batch_size=2", "progress=false", "min_actors=2", "max_actors=2", f"num_cpus={ONE_PER_NODE}"])
    summary = run_capture(capture)
    assert summary["captured_rows"] == n and summary["shards_written"] == n // 2
    direct = Encoder(smollm, LAYERS, ("last", "mean")).encode(pq.read_table(queries).column("messages").to_pylist())
    for block in ("h0_last", "h6_mean"):
        ids, captured = read_features("s3://multinode/acts", block)
        assert ids == pq.read_table(queries).column("query_id").to_pylist()
        np.testing.assert_allclose(captured.astype(np.float32), direct.features[block], rtol=2e-2, atol=2e-2)

    label = load_config(LabelConfig, None, [
        f"queries={queries}", "out=s3://multinode/labels", "targets=[smollm2-135m]", "shard_size=2", "batch_size=2",
        "progress=false", "scoring.max_new_tokens=8", "pool.min_actors=2", "pool.max_actors=2",
        f"pool.num_cpus={ONE_PER_NODE}"])
    stats = run_label(label)["targets"]["smollm2-135m"]
    assert stats["ok"] == n and stats["failed"] == 0 and stats["missing"] == 0
    got = read_target("s3://multinode/labels/smollm2-135m").column("query_id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == n


def test_an_actor_on_a_node_with_an_empty_model_cache_converts_there_once(nodes, queries, smollm):
    """The capture actor itself, pinned to a node that joins with an empty model cache of its own (the
    ``cold`` node's may be filled meanwhile by an earlier stage's actor still converting there): the
    first one converts SmolLM2 into that node's cache and says so in its log; a second one there loads
    the copy; both encode as the warm node's actor does."""
    import json

    import ray

    from shared.models import converted_dir, is_converted
    from tests.multinode.conftest import add_worker, wait_nodes
    from training.capture.run import CaptureUDF

    messages = pq.read_table(queries).column("messages").to_pylist()[:2]
    batch = {"messages_json": np.array([json.dumps(m) for m in messages]), "query_id": np.array(["a", "b"]),
             "split": np.array(["train"] * 2), "_shard": np.zeros(2, int), "_row": np.arange(2)}
    args = ("smollm2-135m", None, LAYERS, ["last"], "float32", 2048, 2, None, "right", 1.0, False)
    fresh = nodes["caches"]["fresh"] = nodes["root"] / "fresh-cache"
    add_worker(nodes, "fresh")
    wait_nodes(ray, 4)
    udf = ray.remote(CaptureUDF)
    out = {}
    try:
        assert not is_converted(smollm.spec, fresh)
        for i, node in enumerate(("fresh", "fresh", "warm")):
            actor = udf.options(num_cpus=1, resources={node: 0.01}).remote(*args)
            out[i] = ray.get(actor.__call__.remote(batch), timeout=300)
            ray.kill(actor)
        logs = (nodes["root"] / "fresh" / "session_latest" / "logs").glob("worker-*")
        conversions = sum(p.read_text(errors="replace").count("converting smollm2-135m") for p in logs)
    finally:
        nodes["cluster"].remove_node(nodes["node"].pop("fresh"), allow_graceful=False)
        wait_nodes(ray, 3)
    assert (converted_dir(smollm.spec, fresh) / "model.safetensors").is_file()
    assert conversions == 1, "one conversion on the fresh node, logged there"
    for i in (0, 1):
        np.testing.assert_allclose(out[i]["h6_last"], out[2]["h6_last"], rtol=1e-5, atol=1e-5)


def test_fit_on_ray_train_with_a_worker_on_each_node_checkpoints_to_s3(nodes, bucket, tmp_path):
    """Two Ray Train workers, one per worker node; checkpoints in S3; each seed's member equals the
    one a single process trains from the same features."""
    from shared.artifact import load_artifact
    from tests.synthetic import write_synthetic
    from training.fit.run import FitConfig, fit_features, run_fit
    from training.loop import TrunkConfig, train_one

    synth = write_synthetic(str(tmp_path), n=200, d=8)
    trunk = {"hidden": [16], "dropout": [0.1], "max_epochs": 20, "patience": 5, "batch_size": 64}
    cfg = FitConfig(activations=synth["activations"], labels=synth["labels"], targets=synth["targets"],
                    out=str(tmp_path / "router"), blocks=["h2_last"], n_components=4,
                    train={"seeds": 2, "keep": 2, "num_workers": 2, "cpus_per_worker": ONE_PER_NODE,
                           "storage_path": "s3://multinode/ray-train", "trunk": trunk})
    meta = run_fit(cfg)
    assert meta["trunk"]["n_members"] == 2
    assert load_artifact(str(tmp_path / "router")).target_names == synth["targets"]
    data, _, Xtr, Xva = fit_features(cfg)
    tr, va = data.where("train"), data.where("val")
    for seed, val_loss in meta["training_metrics"]["members_val_loss"].items():
        alone = train_one(Xtr, tr.Y, None, Xva, va.Y, None, seed=int(seed), cfg=TrunkConfig.model_validate(trunk))
        assert alone.val_loss == pytest.approx(val_loss, rel=1e-4), seed


@pytest.fixture(scope="module")
def more_queries(tmp_path_factory) -> Path:
    """24 real MMLU queries: enough that a node dies while shards are still being written."""
    from training.data.build import DataConfig, run_build

    out = tmp_path_factory.mktemp("q24") / "queries.parquet"
    run_build(load_config(DataConfig, ROOT / "configs" / "data-quick.yaml",
                          [f"output={out}", "mmlu.n=24", "reasoning_gym=[]"]))
    return out


def run_stage(stage: str, queries: Path, out: str) -> dict:
    from training.capture.run import CaptureConfig, run_capture
    from training.label.run import LabelConfig, run_label

    common = [f"queries={queries}", f"out={out}", "shard_size=2", "batch_size=1", "progress=false"]
    if stage == "capture":
        return run_capture(load_config(CaptureConfig, None, [*common, "layers=[30]", "bucket_window=2", "min_actors=2",
                                                             "max_actors=2", f"num_cpus={ONE_PER_NODE}"]))
    return run_label(load_config(LabelConfig, None, [*common, "targets=[smollm2-135m]", "scoring.max_new_tokens=8",
                                                     "pool.min_actors=2", "pool.max_actors=2",
                                                     f"pool.num_cpus={ONE_PER_NODE}"]))


@pytest.mark.parametrize("stage", ["capture", "label"])
def test_a_worker_node_killed_mid_stage_loses_and_repeats_nothing(nodes, bucket, more_queries, stage):
    """The ``cold`` node's raylet is killed while the driver's second shard upload is held (one shard
    written, the run mid-way, every time): the stage finishes on the node that remains (or, if it fails,
    a rerun resumes it), and every query is in the output once."""
    import threading

    import ray

    from tests.multinode.conftest import add_worker, wait_nodes
    from tests.s3_gate import GatedS3
    from training.capture.run import read_features
    from training.labels import read_target

    out = f"{bucket}/killed-{stage}"
    shards = storage.join(out, "smollm2-135m") if stage == "label" else out
    result: dict = {}

    def drive() -> None:
        try:
            result["summary"] = run_stage(stage, more_queries, out)
        except Exception as exc:  # noqa: BLE001 - the test reruns the stage and reports the error
            result["error"] = exc

    with GatedS3(allow=1) as gated, pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL_S3", gated.url)  # the driver writes; Ray's nodes never see this
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        gated.gate.wait_holding(240, alive=driver.is_alive)
        killed = time.monotonic()
        try:
            nodes["cluster"].remove_node(nodes["node"]["cold"], allow_graceful=False)
            gated.gate.set_mode("pass")
            driver.join(300)
            took = time.monotonic() - killed
            assert not driver.is_alive(), f"{stage} hung after the node died"
            if "error" in result:  # the run failed with the node: the rerun must resume it
                result["summary"] = run_stage(stage, more_queries, out)
        finally:
            add_worker(nodes, "cold")
            wait_nodes(ray, 3)
    ids = (read_features(out, "h30_last")[0] if stage == "capture" else read_target(shards).column("query_id").to_pylist())
    expected = pq.read_table(more_queries).column("query_id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)), f"{stage}: lost or repeated queries"
    how = f"rerun after {type(result['error']).__name__}" if "error" in result else "finished on its own"
    print(f"{stage}: node killed with 1 of 12 shards written; {how}, {took:.1f} s after the kill")


def test_a_worker_node_killed_during_fit_resumes_from_the_last_s3_checkpoint(nodes, bucket):
    """Six seeds on two Ray Train workers (one per node, three rounds). Once the first round's checkpoint
    is in S3, the ``cold`` node's raylet is killed and a replacement node joins (as KubeRay replaces a
    pod): training restarts from that checkpoint, trains only the seeds it lacks, and returns all six."""
    import threading

    import ray

    from tests.multinode.conftest import add_worker, wait_nodes
    from training.fit.train_ray import MEMBERS_FILE, TrainRunConfig, train_ensemble

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 8)).astype(np.float32)  # seconds per seed, so the kill lands mid-run
    Y = (rng.random((3000, 2)) < 1 / (1 + np.exp(-X[:, :2]))).astype(np.float32)
    cfg = TrainRunConfig(seeds=6, keep=6, num_workers=2, cpus_per_worker=ONE_PER_NODE, max_failures=2,
                         storage_path=f"{bucket}/kill-fit", name="kill",
                         trunk={"hidden": [64], "dropout": [0.1], "max_epochs": 60, "patience": 60, "batch_size": 32})
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(out=train_ensemble(X[:2400], Y[:2400], X[2400:], Y[2400:],
                                                                              cfg)), daemon=True)
    driver.start()
    fs, root = storage.filesystem(f"{bucket}/kill-fit/kill")
    deadline = time.monotonic() + 240

    def members_checkpointed() -> int:
        """Members in the newest checkpoint Ray Train has registered (its snapshot file is written then)."""
        import io

        import torch
        from pyarrow import fs as pafs

        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except FileNotFoundError:
            return 0
        if not any(i.path.endswith("checkpoint_manager_snapshot.json") for i in infos):
            return 0
        files = sorted(i.path for i in infos if "checkpoint_" in i.path and i.path.endswith(MEMBERS_FILE))
        with fs.open_input_file(files[-1]) as fh:
            return len(torch.load(io.BytesIO(fh.read()), weights_only=False))

    while not (done := members_checkpointed()) and driver.is_alive():
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.1)
    assert driver.is_alive() and done < 6, f"fit ended ({done} members checkpointed) before the node could be killed"
    killed = time.monotonic()
    nodes["cluster"].remove_node(nodes["node"]["cold"], allow_graceful=False)
    add_worker(nodes, "cold")
    wait_nodes(ray, 3)
    driver.join(400)
    assert not driver.is_alive(), "fit hung after the node died"
    members, metrics = result["out"]
    assert sorted(m.seed for m in members) == list(range(6))
    resumed_rounds = -(-(6 - done) // 2)  # the seeds the checkpoint lacked, two per round
    assert metrics["round"] + 1 <= resumed_rounds < 3, (done, metrics)
    print(f"fit: {done} of 6 members checkpointed at the kill; resumed from S3, done "
          f"{time.monotonic() - killed:.1f} s after the kill")
