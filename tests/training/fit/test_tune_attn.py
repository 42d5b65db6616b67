"""tune scores an ``h{layer}_attn`` candidate on the same folds as the vector blocks, from a capture's token
states; fit's fixed-width feature path refuses attn blocks (run_fit trains them: test_fit_attn.py)."""

import numpy as np
import pyarrow as pa
import pytest

from shared import storage
from shared.errors import BadInput
from training.capture.output import rows_to_table
from training.shards import check_manifest, shard_path

TARGETS = ["a", "b"]


def write_token_capture(root, n=360, W=16, D=8, seed=0) -> dict:
    """A capture of ``n`` prompts whose layer-1 token states carry the labels on one marked token (dim 0 = 4,
    labels from dims 1 and 2 of that token), with ``h1_last`` the state of a random other token (noise)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, W + 1, size=n)
    states = rng.normal(size=(n, W, D)).astype(np.float16)
    states[:, :, 0] = np.clip(states[:, :, 0], -2, 2)
    key = (rng.random(n) * (lengths - 1)).astype(int)  # never the last token
    states[np.arange(n), key, 0] = 4
    correct = (states[np.arange(n), key, 1:3] > 0).astype(float)
    split = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    rows = [{"query_id": f"q{i:04d}", "split": split[i], "n_tokens": int(lengths[i]), "truncated": False,
             "h1_last": states[i, lengths[i] - 1].astype(np.float32), "t1": states[i, :lengths[i]].tobytes(),
             "n_states": int(lengths[i]), "prefix_key": ""} for i in range(n)]
    acts = storage.join(str(root), "activations")
    check_manifest(acts, {"encoder": {"name": "smollm2-135m"}, "hidden_size": D, "token_layers": [1],
                          "token_window": W})
    storage.write_parquet(rows_to_table(rows, ["h1_last"], [1]), shard_path(acts, 0))
    for t, target in enumerate(TARGETS):
        storage.write_parquet(pa.table({"query_id": [r["query_id"] for r in rows], "status": ["ok"] * n,
                                        "correct": correct[:, t].tolist(), "input_tokens": lengths.tolist(),
                                        "output_tokens": [5] * n, "cost": [1e-6 * (t + 1)] * n}),
                              shard_path(storage.join(str(root), "labels", target), 0))
    return {"activations": acts, "labels": storage.join(str(root), "labels"), "targets": TARGETS}


def test_tune_scores_attn_pooling_on_the_same_folds_and_it_wins_where_one_token_decides(tmp_path):
    from training.fit.tune import TuneConfig, run_tune

    synth = write_token_capture(tmp_path)
    cfg = TuneConfig(**synth, out=str(tmp_path / "tune"), folds=3, seeds=1,
                     candidates=[{"blocks": ["h1_last"], "n_components": 8}, {"blocks": ["h1_attn"], "n_components": 8},
                                 {"blocks": ["h1_attn", "h1_last"], "n_components": 8}],
                     trunk={"lr": 3e-3, "hidden": [32], "dropout": [0.1], "patience": 20},
                     pool={"n_components": 8, "n_queries": 2})
    report = run_tune(cfg)
    rows = {r["label"]: r for r in report["candidates"]}
    last, attn = rows["h1_last / 8"], rows["h1_attn / 8"]
    assert attn["mean_auc"] > 0.75 and attn["mean_auc"] > last["mean_auc"] + 0.15, (attn["mean_auc"], last["mean_auc"])
    assert report["best"]["blocks"][0] == "h1_attn" and rows["h1_attn+h1_last / 8"]["mean_auc"] > last["mean_auc"]
    assert report["n_rows"] < 360  # train + val only
    with pytest.raises(BadInput, match="token_layers"):
        run_tune(TuneConfig(**{**cfg.model_dump(), "candidates": [{"blocks": ["h2_attn"], "n_components": 8}]}))


def test_fit_features_leaves_attn_blocks_to_the_attn_fit(tmp_path):
    from training.fit.run import FitConfig, fit_features

    cfg = FitConfig(activations="a", labels="l", targets=["t"], blocks=["h12_attn", "h12_last"])
    with pytest.raises(BadInput, match=r"h12_attn.*training.fit.attn"):
        fit_features(cfg)


def test_probe_says_why_attn_blocks_have_no_fisher_numbers(tmp_path):
    from training.fit.probe import ATTN_NOTE, ProbeConfig, run_probe

    synth = write_token_capture(tmp_path, n=120)
    report = run_probe(ProbeConfig(**synth, out=str(tmp_path / "probe")))
    assert report["attn_blocks"] == {"h1_attn": ATTN_NOTE} and list(report["blocks"]) == ["h1_last"]
