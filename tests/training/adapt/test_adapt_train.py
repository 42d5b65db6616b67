"""The adapt stage's training (training/adapt/train.py) on a tiny Llama built from a config (no weights to
load): the label sits in which of two token patterns is in the window, so the frozen blocks' pooled states
carry it weakly and training the blocks end to end beats the warm-started frozen trunk; early stopping keeps
the best evaluation's weights; the contrastive objective trains; the progress goes to the log as lines."""

import logging

import numpy as np
import pytest
import torch

from shared.adapter import AdapterSpec
from training.adapt.model import AdaptInputs, predict_proba
from training.adapt.train import AdaptTrainConfig, fit_adapted
from training.objectives import ObjectiveConfig


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def windows(n=240, w=12, d=32, seed=0):
    """Rows whose label is 1 when token a comes before token b in the window (an order, which mean pooling
    cannot see), with one of two targets right; random lengths and padding."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=d), rng.normal(size=d)
    states = rng.normal(scale=0.5, size=(n, w, d)).astype(np.float32)
    t = rng.integers(6, w + 1, size=n)
    y = rng.integers(0, 2, size=n)
    mask = np.arange(w)[None, :] < t[:, None]
    for i in range(n):
        first, second = sorted(rng.choice(t[i], size=2, replace=False))
        states[i, first], states[i, second] = (a, b) if y[i] else (b, a)
        states[i, t[i]:] = 0
    Y = np.stack([y, 1 - y], axis=1).astype(np.float32)
    return AdaptInputs(states.astype(np.float16), mask, t + rng.integers(0, 50, size=n), np.zeros((n, 0)), Y)


def auc(y, p):
    from training.metrics import masked_auc

    return float(np.nanmean(masked_auc(y, p)))


def test_end_to_end_beats_the_warm_started_frozen_trunk_and_keeps_the_best(tiny_lm, caplog):
    rows = windows()
    fit_rows, stop_rows, held = np.arange(0, 160), np.arange(160, 200), np.arange(200, 240)
    spec = AdapterSpec(from_layer=1, n_blocks=1, window=12, poolings=["last", "mean"])
    cfg = AdaptTrainConfig(hidden=[32], dropout=[0.0], batch_size=16, max_epochs=12, evals_per_epoch=1, patience=12,
                           lr=3e-3, block_lr=3e-3, warm_epochs=60, log_every_s=0.01, min_delta=0.0)
    before = tiny_lm.model.layers[1].mlp.down_proj.weight.clone()
    with caplog.at_level(logging.INFO, logger="training.adapt.train"):
        fit = fit_adapted(tiny_lm, spec, rows, {}, fit_rows, stop_rows, n_components=8, cfg=cfg, label="toy")
    r = fit.result
    assert torch.equal(tiny_lm.model.layers[1].mlp.down_proj.weight, before)  # the encoder itself is not touched
    assert len(r.history) == 12 and r.val_loss == min([r.start_val_loss] + [h["val_loss"] for h in r.history])
    assert r.val_loss < 0.8 * r.start_val_loss  # the adapted block learned the order the frozen features lack
    P = predict_proba(fit.adapter, fit.transform, fit.trunk, rows.take(held), {})
    assert auc(rows.Y[held], P) > 0.8
    lines = [m for m in caplog.messages if m.startswith("toy: epoch")]
    assert lines and all("\r" not in m for m in lines) and any("(best)" in m for m in lines)


def test_early_stopping_returns_the_start_when_nothing_improves_and_the_contrastive_term_trains(tiny_lm):
    rows = windows(n=120, seed=1)
    spec = AdapterSpec(from_layer=2, n_blocks=1, window=12, poolings=["last"])  # 2 + 1 = 3: the final norm too
    frozen = AdaptTrainConfig(hidden=[16], dropout=[0.0], batch_size=16, max_epochs=2, lr=1e-9, block_lr=1e-9,
                              min_delta=1.0, warm_epochs=5)
    fit = fit_adapted(tiny_lm, spec, rows, {}, np.arange(80), np.arange(80, 120), n_components=4, cfg=frozen)
    assert fit.result.val_loss == fit.result.start_val_loss and len(fit.result.history) == 2  # patience 2: stop
    pretrained = dict(tiny_lm.model.named_parameters())
    state = fit.adapter.state_dict()
    assert set(state) == {"norm.weight"} | {k.replace("layers.2.", "blocks.0.") for k in pretrained if ".2." in k}
    for key, value in state.items():  # the start's weights came back: the pretrained block and norm
        torch.testing.assert_close(value, pretrained["norm.weight" if key == "norm.weight" else
                                                    key.replace("blocks.0.", "layers.2.")], rtol=0, atol=0)
    contrastive = frozen.model_copy(update={"lr": 3e-3, "block_lr": 3e-3, "min_delta": 0.0, "objective":
                                           ObjectiveConfig(kind="sample_llm", weight=1.0, top_k=1, bottom_k=1)})
    fit = fit_adapted(tiny_lm, spec, rows, {}, np.arange(80), np.arange(80, 120), n_components=4, cfg=contrastive)
    assert fit.result.val_loss < fit.result.start_val_loss and len(fit.result.history) == 4
