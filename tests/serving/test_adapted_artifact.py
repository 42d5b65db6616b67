"""An adapted artifact's round trip: a real Ray capture of layer-12 token states of real prompts, ``adapt``
trains one adapted block and a trunk for a few steps and writes the artifact, and the real Encoder and
router-head replicas serve it (prefix cache on): the served probabilities are the training side's for the same
prompt, and so are evaluate's on a fresh ``capture artifact=`` of the same queries. The replica then reloads the committed reference artifact (schema 2, no adapter) in place."""

import asyncio

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from serving.replicas import EncoderReplica, RouterHeadReplica
from shared import storage
from shared.artifact import read_meta
from shared.config import load_config
from training.adapt.model import predict_proba
from training.adapt.run import AdaptConfig, adapt_from_capture, write_adapted
from training.capture.run import CaptureConfig, run_capture
from training.data.build import DataConfig, run_build
from training.shards import read_shards, shard_path

from tests.procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("session_smollm")]
TARGETS = ["smollm2-135m", "gemma3-270m"]
REFERENCE = ROOT / "data" / "router"


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    """16 real queries (12 MMLU + 4 syllogisms), 10 train, 4 val, 2 test."""
    out = tmp_path_factory.mktemp("q") / "queries.parquet"
    cfg = load_config(DataConfig, ROOT / "configs" / "data-quick.yaml",
                      [f"output={out}", "mmlu.n=12", "reasoning_gym=[{task: syllogism, n: 4}]"])
    run_build(cfg)
    table = pq.read_table(out)
    split = pa.array(["train"] * 10 + ["val"] * 4 + ["test"] * 2)
    pq.write_table(table.set_column(table.schema.get_field_index("split"), "split", split), out)
    return out


def write_labels(root: str, query_ids: list[str], n_tokens: list[int]) -> str:
    """Soft labels a prompt's length predicts (for target 0) and does not (target 1)."""
    rng = np.random.default_rng(0)
    rank = np.argsort(np.argsort(n_tokens)) / (len(n_tokens) - 1)
    for t, target in enumerate(TARGETS):
        correct = rank if t == 0 else rng.random(len(query_ids))
        storage.write_parquet(pa.table({
            "query_id": query_ids, "status": ["ok"] * len(query_ids), "correct": correct.tolist(),
            "input_tokens": n_tokens, "output_tokens": [5] * len(query_ids), "cost": [1e-6] * len(query_ids)}),
            shard_path(storage.join(root, target), 0))
    return root


def test_adapted_artifact_round_trip_through_the_replicas(ray_cluster, queries, tmp_path, smollm):
    act = str(tmp_path / "act")
    run_capture(load_config(CaptureConfig, None, [
        f"queries={queries}", f"out={act}", "layers=[12]", "poolings=[last]", "dtype=float32", "token_layers=[12]",
        "token_window=48", "shard_size=8", "bucket_window=8", "batch_size=4", "progress=false"]))
    table = read_shards(act)
    labels = write_labels(str(tmp_path / "labels"), table.column("query_id").to_pylist(),
                          table.column("n_tokens").to_pylist())
    cfg = load_config(AdaptConfig, None, [
        f"activations={act}", f"labels={labels}", f"targets={TARGETS}", f"out={tmp_path / 'router'}", "from_layer=12",
        "n_blocks=1", "window=32", "frozen_blocks=[h12_last]", "n_components=4",
        "train={hidden: [16], dropout: [0.0], batch_size: 4, max_epochs: 1, evals_per_epoch: 2, warm_epochs: 5, "
        "patience: 5, block_lr: 0.001, lr: 0.01}"])
    fit, data, windows, spec = adapt_from_capture(cfg)
    r = fit.result
    assert len(r.history) == 2 and r.val_loss <= r.start_val_loss
    pretrained = smollm.model.model.layers[12].mlp.down_proj.weight
    assert not torch.equal(fit.adapter.blocks[0].mlp.down_proj.weight, pretrained)  # the block was trained
    meta = write_adapted(cfg, fit, data, windows, spec)
    assert meta["adapter"]["from_layer"] == 12 and meta["layers"] == [12]
    assert [b["name"] for b in meta["transform"]["blocks"]] == ["h12_last", "h13a12_last", "h13a12_mean"]

    uri = str(tmp_path / "router")
    # the held-out check's capture: `capture artifact=` (no token_layers given) keeps the adapter's token states,
    # and evaluate reads the adapted blocks from them the way serving computes them
    from training.evaluate.baselines import ArtifactRouter
    from training.evaluate.run import load_data
    checked = str(tmp_path / "checked")
    run_capture(load_config(CaptureConfig, None, [
        f"queries={queries}", f"out={checked}", f"artifact={uri}", "dtype=float32", "shard_size=8",
        "bucket_window=8", "batch_size=4", "progress=false"]))
    identity = storage.read_json(storage.join(checked, "manifest.json"))["identity"]
    assert identity["token_layers"] == [12] and identity["token_window"] == 32
    evaluated = load_data(ArtifactRouter.load(uri), uri, checked, labels)
    rows = np.array([int(np.flatnonzero(evaluated.query_ids == q)[0]) for q in data.query_ids])
    P = ArtifactRouter.load(uri).router.predict_proba({b: v[rows] for b, v in evaluated.blocks.items()})
    np.testing.assert_allclose(P, predict_proba(fit.adapter, fit.transform, fit.trunk, windows,
                                                {"h12_last": data.blocks["h12_last"]}), rtol=0, atol=1e-6)

    encoder = EncoderReplica(artifact=uri,
                             prefix_cache={"max_mb": 64, "min_tokens": 16, "min_seen": 1, "block_tokens": 16})
    head = RouterHeadReplica(artifact=uri)
    qt = pq.read_table(queries)
    messages, ids = qt.column("messages").to_pylist(), qt.column("query_id").to_pylist()
    for row in (0, 11):  # a train row and a val row
        i = int(np.flatnonzero(data.query_ids == ids[row])[0])
        expected = predict_proba(fit.adapter, fit.transform, fit.trunk, windows.take(np.array([i])),
                                 {"h12_last": data.blocks["h12_last"][[i]]})[0]
        for _ in range(2):  # the second time on the cached prefix
            encoded = asyncio.run(encoder.encode(messages[row]))
            decision = head.decide(encoded, None)
            got = np.array([decision.probabilities[t] for t in TARGETS])
            np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)  # measured: 3e-6
    assert encoder.ready()["prefix_cache"]["hits"] >= 2

    if (REFERENCE / "meta.json").is_file():  # an artifact without an adapter still loads, in place
        assert read_meta(str(REFERENCE)).adapter is None
        encoder.reconfigure({"artifact": str(REFERENCE)})
        assert encoder.artifact == str(REFERENCE) and encoder.encoder.adapter is None
        assert all("a" not in c.split("_")[0] for c in encoder.encoder.columns)
