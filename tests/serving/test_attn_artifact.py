"""An attn artifact's round trip: a real Ray capture of layer-12 token states of real prompts, ``fit`` with
``blocks=[h12_last, h12_attn]`` (tiny trunk) writes the artifact, and (1) evaluate's ``load_data`` on that
capture, (2) ``capture artifact=<uri>`` (which sets the token layers and window) then ``load_data``, and (3) the
real Encoder and router-head replicas with the prefix cache on give the training side's probabilities."""

import asyncio

import numpy as np
import pyarrow.parquet as pq
import pytest

from serving.replicas import EncoderReplica, RouterHeadReplica
from shared.config import load_config
from tests.serving import test_adapted_artifact as adapted
from training.capture.run import CaptureConfig, for_artifact, run_capture
from training.evaluate.baselines import ArtifactRouter
from training.evaluate.run import load_data
from training.fit.attn import fit_attn, write_attn
from training.fit.run import FitConfig, chosen_objective, chosen_pool
from training.pooled import ensemble_proba
from training.shards import read_shards

TARGETS, write_labels = adapted.TARGETS, adapted.write_labels
queries = adapted.queries  # the same 16 real queries (10 train, 4 val, 2 test): a module fixture
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("session_smollm")]
CAPTURE = ["layers=[12]", "poolings=[last]", "dtype=float32", "shard_size=8", "bucket_window=8", "batch_size=4",
           "progress=false"]


def served(encoder, head, messages) -> np.ndarray:
    decision = head.decide(asyncio.run(encoder.encode(messages)), None)
    return np.array([decision.probabilities[t] for t in TARGETS])


def test_attn_artifact_round_trip_through_evaluate_capture_and_the_replicas(ray_cluster, queries, tmp_path):
    act, uri = str(tmp_path / "act"), str(tmp_path / "router")
    run_capture(load_config(CaptureConfig, None, [f"queries={queries}", f"out={act}", "token_layers=[12]",
                                                  "token_window=48", *CAPTURE]))
    table = read_shards(act)
    labels = write_labels(str(tmp_path / "labels"), table.column("query_id").to_pylist(),
                          table.column("n_tokens").to_pylist())
    cfg = FitConfig(activations=act, labels=labels, targets=TARGETS, out=uri, blocks=["h12_last", "h12_attn"],
                    n_components=4, pool={"n_components": 8, "n_queries": 2, "window": 32},
                    train={"seeds": 2, "keep": 2, "num_workers": 1, "storage_path": str(tmp_path / "ray-train"),
                           "trunk": {"hidden": [16], "dropout": [0.0], "batch_size": 4, "max_epochs": 5,
                                     "patience": 5, "lr": 0.01}})
    fit = fit_attn(cfg, list(cfg.blocks), cfg.n_components, "config", chosen_objective(cfg), chosen_pool(cfg))
    meta = write_attn(cfg, fit)
    assert meta["pooled"]["blocks"][0]["name"] == "h12_attn" and meta["pooled"]["blocks"][0]["window"] == 32
    expected = ensemble_proba(fit.kept, fit.inputs)  # (train + val rows, T): the training side
    row_of = {q: i for i, q in enumerate(fit.data.query_ids)}

    def evaluated(activations: str) -> np.ndarray:
        data = load_data(ArtifactRouter.load(uri), uri, activations, labels)
        rows = np.array([int(np.flatnonzero(data.query_ids == q)[0]) for q in fit.data.query_ids])
        return ArtifactRouter.load(uri).router.predict_proba({b: v[rows] for b, v in data.blocks.items()})

    np.testing.assert_allclose(evaluated(act), expected, rtol=0, atol=1e-6)  # the same capture: the same inputs
    again = for_artifact(load_config(CaptureConfig, None, [f"queries={queries}", f"out={tmp_path / 'act2'}",
                                                          f"artifact={uri}", *CAPTURE]))
    assert again.token_layers == [12] and again.token_window == 32 and again.layers == [12]
    run_capture(again)
    np.testing.assert_allclose(evaluated(str(tmp_path / "act2")), expected, rtol=0, atol=5e-5)

    encoder = EncoderReplica(artifact=uri,
                             prefix_cache={"max_mb": 64, "min_tokens": 16, "min_seen": 1, "block_tokens": 16})
    head = RouterHeadReplica(artifact=uri)
    assert encoder.encoder.token_layers == [12] and encoder.encoder.columns == ["h12_last", "h12_attn"]
    qt = pq.read_table(queries)
    messages, ids = qt.column("messages").to_pylist(), qt.column("query_id").to_pylist()
    for row in (0, 11):  # a train row and a val row
        want = expected[row_of[ids[row]]]
        for _ in range(2):  # the second time on the cached prefix
            np.testing.assert_allclose(served(encoder, head, messages[row]), want, rtol=0, atol=5e-5)
    assert encoder.ready()["prefix_cache"]["hits"] >= 2
    cached = encoder.cache
    encoder.cache = None  # a full forward gives the window the cached prefix + suffix gave
    np.testing.assert_allclose(served(encoder, head, messages[0]), expected[row_of[ids[0]]], rtol=0, atol=5e-5)
    encoder.cache = cached
