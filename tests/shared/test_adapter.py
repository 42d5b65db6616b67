"""The adapted encoder top (shared/adapter.py) on the real SmolLM2-135M: untrained, it is the frozen encoder
(positions, causal mask and final norm right); the Encoder runs it with and without prefix sharing; the
artifact carries it (schema 3) and artifacts without one still load."""

import json

import numpy as np
import pytest
import torch

from shared.adapter import AdaptedTop, AdapterSpec, causal_window_mask, window_positions
from shared.artifact import (ADAPTER_FILE, ArtifactError, ArtifactMeta, load_adapter, load_artifact, read_meta,
                             save_artifact)
from shared.encoder import Encoder
from shared.errors import BadInput
from shared.features import adapted_block_name, adapted_from, parse_block
from shared.pooling import pad_windows
from shared.trunk import Ensemble, FeatureTransform, SharedTrunkNet

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer with one letter. " * 8}
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [SYSTEM, {"role": "user", "content": "Which is larger, 7 or 9? Explain briefly."}],
           [SYSTEM, {"role": "user", "content": "Name the planet closest to the Sun."}]]


def full_states(lm, ids, layer):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].numpy()


def spec(L, k, window=512, poolings=("last", "mean")):
    return AdapterSpec(from_layer=L, n_blocks=k, window=window, poolings=list(poolings))


def test_names_and_spec():
    assert adapted_block_name(14, 12, "last") == "h14a12_last" and parse_block("h14a12_mean") == (14, "mean")
    assert adapted_from("h14a12_last") == 12 and adapted_from("h14_last") is None
    assert spec(12, 2).block_names() == ["h14a12_last", "h14a12_mean"]
    for bad in ("h14a12_next", "h14a12_attn"):
        with pytest.raises(BadInput):
            parse_block(bad)
    with pytest.raises(ValueError):
        spec(12, 1, poolings=("last", "last"))


def test_window_positions_and_mask():
    pos = window_positions(torch.tensor([10, 3]), torch.tensor([4, 3]), 5)
    assert pos.tolist() == [[6, 7, 8, 9, 10], [0, 1, 2, 3, 4]]
    m = causal_window_mask(torch.tensor([[True, True, False]]), torch.float32)[0, 0]
    assert (m == 0).tolist() == [[True, False, False], [True, True, False], [True, True, False]]


@pytest.mark.slow
@pytest.mark.parametrize("L,k", [(12, 2), (28, 2)])  # 28 + 2 = 30: the model's last layer, final norm applied
def test_untrained_adapter_is_the_frozen_encoder_when_the_window_covers_the_prompt(smollm, L, k):
    top = AdaptedTop.from_model(smollm.model, spec(L, k))
    enc = Encoder(smollm, [L + k], ("last", "mean"))
    ids, _ = enc.tokenize(PROMPTS)
    frozen = enc.encode(PROMPTS).features
    states, mask = pad_windows([full_states(smollm, x, L) for x in ids], 160, dtype=np.float32)
    assert mask.sum(1).max() < 160  # the window covers every prompt
    got = top.features(states, mask, np.array([len(x) for x in ids]))
    for p in ("last", "mean"):
        ref = frozen[f"h{L + k}_{p}"]
        np.testing.assert_allclose(got[f"h{L + k}a{L}_{p}"], ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    # rotary attention reads relative positions only: a window's absolute offset changes nothing but rounding
    shifted = top.features(states, mask, np.array([len(x) + 300 for x in ids]))
    np.testing.assert_allclose(shifted[f"h{L + k}a{L}_mean"], got[f"h{L + k}a{L}_mean"], atol=1e-3 * np.abs(ref).max())
    # causal: row i of the window sees rows <= i only, so it is the last state of the prompt cut after row i;
    # padded rows (NaN here) are never read
    t = int(mask[1].sum())
    cut, cut_mask = states[1:2].copy(), mask[1:2].copy()
    cut[0, 20:], cut_mask[0, 20:] = np.nan, False
    h = top.hidden(torch.as_tensor(states[1:2]), torch.as_tensor(mask[1:2]), torch.tensor([t]))[0, 19]
    alone = top.features(cut, cut_mask, np.array([t]))[f"h{L + k}a{L}_last"][0]  # positions t-20..t-1: shifted only
    np.testing.assert_allclose(alone, h.detach().numpy(), atol=1e-3 * np.abs(ref).max())


@pytest.mark.slow
def test_encoder_runs_the_adapter_alone_with_frozen_blocks_and_on_a_shared_prefix(smollm):
    top = AdaptedTop.from_model(smollm.model, spec(12, 1, window=32))
    alone = Encoder(smollm, [], ("last",), adapter=top)
    mixed = Encoder(smollm, [12], ("last",), adapter=top, min_shared_prefix=16)
    a, b = alone.encode(PROMPTS), mixed.encode(PROMPTS)
    assert alone.columns == ["h13a12_last", "h13a12_mean"] and mixed.columns == ["h12_last"] + alone.columns
    assert b.stats["prefix_groups"] == 1 and b.stats["computed_tokens"] < a.stats["computed_tokens"]
    assert a.tokens is None and b.tokens is None  # the windows are the adapter's input, not an output
    for col in alone.columns:
        np.testing.assert_allclose(b.features[col], a.features[col], atol=2e-3 * np.abs(a.features[col]).max())
    # the window is the capture's: the fp16 token states of the last 32 tokens, with their positions
    ref = Encoder(smollm, [12], ("last",), token_layers=[12], token_window=32).encode(PROMPTS)
    states, mask = pad_windows([t[12] for t in ref.tokens], 32)
    direct = top.features(states, mask, ref.n_tokens)
    np.testing.assert_allclose(a.features["h13a12_last"], direct["h13a12_last"], rtol=0, atol=1e-5)
    with pytest.raises(BadInput, match="token states"):
        Encoder(smollm, [12], ("last",), adapter=top, token_layers=[6])


def frozen_artifact_parts(n=40, d=576, blocks=("h12_last",), seed=0):
    rng = np.random.default_rng(seed)
    feats = {b: rng.normal(size=(n, d)).astype(np.float32) for b in blocks}
    transform = FeatureTransform.fit(feats, n_components=4)
    torch.manual_seed(seed)
    return transform, Ensemble([SharedTrunkNet(transform.d_out, 2, [8], [0.0]).eval()]), feats


def meta_for(blocks, layers):
    return ArtifactMeta(encoder={"name": "smollm2-135m"}, layers=layers, pooling={b: parse_block(b)[1] for b in blocks},
                        targets=[{"name": t, "price_in": 1.0, "price_out": 1.0, "median_output_tokens": 1.0}
                                 for t in ("smollm2-135m", "gemma3-270m")])


@pytest.mark.slow
def test_artifact_carries_the_adapter_and_old_artifacts_load(smollm, tmp_path):
    top = AdaptedTop.from_model(smollm.model, spec(12, 1, window=32, poolings=("last",)))
    with torch.no_grad():
        top.blocks[0].mlp.down_proj.weight.mul_(1.5)  # "trained": not the pretrained block any more
    transform, ensemble, _ = frozen_artifact_parts(blocks=("h12_last", "h13a12_last"))
    uri = str(tmp_path / "adapted")
    meta = save_artifact(uri, meta_for(transform.names, [12]), transform, ensemble, adapter=top)
    assert meta.schema_version == 3 and meta.adapter == top.spec and ADAPTER_FILE in meta.files
    loaded = load_adapter(uri, smollm.model)
    for key, value in top.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(loaded.blocks[0].mlp.down_proj.weight, smollm.model.model.layers[12].mlp.down_proj.weight)
    assert load_artifact(uri).block_names == ["h12_last", "h13a12_last"]
    with pytest.raises(ValueError, match="adapted block"):  # an adapted block the artifact cannot compute
        save_artifact(str(tmp_path / "bad"), meta_for(transform.names, [12]), transform, ensemble)
    (tmp_path / "adapted" / ADAPTER_FILE).write_bytes(b"x" + (tmp_path / "adapted" / ADAPTER_FILE).read_bytes())
    with pytest.raises(ArtifactError, match="sha256"):
        load_adapter(uri, smollm.model)

    old = str(tmp_path / "old")  # a schema-2 artifact: no adapter in its meta
    transform, ensemble, feats = frozen_artifact_parts()
    save_artifact(old, meta_for(transform.names, [12]), transform, ensemble)
    raw = json.loads((tmp_path / "old" / "meta.json").read_text())
    raw.pop("adapter")
    (tmp_path / "old" / "meta.json").write_text(json.dumps({**raw, "schema_version": 2}))
    assert read_meta(old).adapter is None and load_adapter(old, smollm.model) is None
    router = load_artifact(old)
    np.testing.assert_allclose(router.predict_proba(feats), ensemble.predict_proba(transform.transform(feats)))
