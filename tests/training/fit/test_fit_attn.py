"""fit with an ``h{layer}_attn`` block on a capture-like toy where one marked token of each prompt carries the
labels: the written artifact (schema 4, ``tokens.safetensors``) loads to the trained members' probabilities,
from the reduced windows as serving sends them and as evaluate reads them from the capture."""

import os

import numpy as np
import pytest

from shared.artifact import SCHEMA_VERSION, copy_artifact, load_artifact
from shared.errors import BadInput
from shared.pooled_head import TOKENS_FILE, PooledTransform
from shared.pooling import reduce_window
from tests.training.fit.test_tune_attn import TARGETS, write_token_capture
from training.fit.attn import fit_attn, write_attn
from training.fit.run import FitConfig, chosen_objective, chosen_pool, run_fit
from training.pooled import ensemble_proba

REAL = ["smollm2-135m", "gemma3-270m"]  # registry targets (prices) for the toy's two label columns


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """The members train on Ray Train, as the vector fit's do."""
    import ray

    from shared.ray_boot import ensure_ray

    started = ensure_ray("local", num_cpus=2, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    synth = write_token_capture(root)
    for old, new in zip(TARGETS, REAL):
        os.rename(os.path.join(synth["labels"], old), os.path.join(synth["labels"], new))
    return {**synth, "targets": REAL}


def config(capture, out, **kw) -> FitConfig:
    return FitConfig(**{**capture, "out": str(out), "blocks": ["h1_attn", "h1_last"], "n_components": 4,
                        "pool": {"n_components": 8, "n_queries": 2},
                        "train": {"seeds": 2, "keep": 2, "num_workers": 2, "storage_path": str(out) + "-ray-train",
                                  "trunk": {"lr": 3e-3, "hidden": [32], "dropout": [0.1], "patience": 20,
                                            "max_epochs": 150}}, **kw})


def test_fit_attn_writes_an_artifact_that_loads_to_the_trained_probabilities(capture, tmp_path):
    from training.token_states import attn_blocks

    cfg = config(capture, tmp_path / "router")
    fit = fit_attn(cfg, list(cfg.blocks), cfg.n_components, "config", chosen_objective(cfg), chosen_pool(cfg))
    assert fit.metrics["val_mean_auc"] > 0.75, fit.metrics["val_auc"]  # only the marked token decides
    meta = write_attn(cfg, fit)
    assert meta["schema_version"] == SCHEMA_VERSION == 4 and TOKENS_FILE in meta["files"]
    assert meta["layers"] == [1] and meta["pooling"] == {"h1_last": "last"}
    assert meta["pooled"]["blocks"] == [{"name": "h1_attn", "window": 16, "d_in": 8, "d_out": 8}]
    assert meta["trunk"]["d_in"] == 4 + 2 * 8 and meta["trunk"]["n_members"] == 2

    router = load_artifact(cfg.out, expected_encoder="smollm2-135m")
    assert isinstance(router.transform, PooledTransform) and router.block_names == ["h1_last", "h1_attn"]
    expected = ensemble_proba(fit.kept, fit.inputs)
    states, mask = fit.tokens["h1_attn"]
    got = router.predict_proba({"h1_last": fit.data.blocks["h1_last"],
                                "h1_attn": reduce_window(router.transform.tokens[0], states, mask)})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # evaluate's reading of the capture: the same windows, the artifact's own token transform
    reduced = attn_blocks(capture["activations"], cfg.out, router.meta, list(fit.data.query_ids))
    np.testing.assert_allclose(router.predict_proba({"h1_last": fit.data.blocks["h1_last"], **reduced}), expected,
                               rtol=0, atol=1e-6)

    copied = copy_artifact(cfg.out, str(tmp_path / "copy"))  # every file travels, checksums hold
    assert copied.pooled == router.meta.pooled
    (tmp_path / "router" / TOKENS_FILE).write_bytes(b"tampered")
    with pytest.raises(Exception, match="sha256"):
        load_artifact(cfg.out)


def test_fit_attn_only_and_a_capture_without_the_layer_is_refused_clearly(capture, tmp_path):
    cfg = config(capture, tmp_path / "only", blocks=["h1_attn"], train={"seeds": 1, "keep": 1,
                                                                       "trunk": {"max_epochs": 3}})
    meta = run_fit(cfg)
    assert meta["layers"] == [] and meta["transform"]["blocks"] == [] and meta["trunk"]["d_in"] == 16
    router = load_artifact(cfg.out)
    assert router.block_names == ["h1_attn"]
    with pytest.raises(BadInput, match=r"token_layers=\[2\]"):
        run_fit(config(capture, tmp_path / "no", blocks=["h2_attn", "h1_last"]))
