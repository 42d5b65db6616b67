"""The capture plan (training.capture.plan): the encoder resolved on the driver, and the identity
the manifest records, with the real SmolLM2-135M config and tokenizer (no forward pass)."""

from __future__ import annotations

import hashlib

from shared.features import encoder_columns
from training.capture.plan import LAYER_CONVENTION, EncoderPlan, encoder_plan
from training.capture.run import CaptureConfig


def test_encoder_plan_resolves_the_encoder_and_its_identity():
    cfg = CaptureConfig(encoder="smollm2-135m", layers=[0, 30], poolings=["last", "mean", "next"], shard_size=64)
    plan = encoder_plan(cfg)
    assert isinstance(plan, EncoderPlan) and plan.spec.name == "smollm2-135m"
    assert (plan.num_layers, plan.hidden_size, plan.layers) == (30, 576, [0, 30])
    assert plan.columns == encoder_columns([0, 30], ["last", "mean", "next"], 30) and "h30_next" in plan.columns
    assert plan.chat_template and plan.chat_template_sha256 == hashlib.sha256(plan.chat_template.encode()).hexdigest()
    identity = plan.identity(cfg, "tablehash", 7)
    assert list(identity) == ["encoder", "chat_template_sha256", "layers", "layer_convention", "embedding_layer_index",
                              "last_layer_final_norm", "num_layers", "poolings", "dtype", "hidden_size",
                              "query_table_hash", "n_rows", "shard_size", "max_tokens", "truncation"]
    assert identity["encoder"] == plan.fingerprint and identity["encoder"]["name"] == "smollm2-135m"
    assert identity["layer_convention"] == LAYER_CONVENTION and identity["layers"] == [0, 30]
    assert (identity["query_table_hash"], identity["n_rows"], identity["shard_size"]) == ("tablehash", 7, 64)
    assert identity["poolings"] == ["last", "mean", "next"] and identity["dtype"] == "float16"
    assert encoder_plan(cfg.model_copy(update={"layers": "all"})).layers == list(range(31))
