"""The prefill-only encoder on the real SmolLM2-135M: truncation, pooling, padding, bucketing."""

import numpy as np
import pytest
import torch

from shared.config import ConfigError, load_config
from training.capture.run import CaptureConfig, main
from shared.batching import length_buckets, padding_waste
from shared.encoder import Encoder, resolve_layers
from shared.features import pool

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a large animal that lives in the sea, and explain in two sentences why "
                                 "it needs to come up for air."}],
    [{"role": "user", "content": "Spell 'cat' backwards."}],
]


def full_hidden_states(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[0, 5, 12], [7, 30]])
def test_truncated_encoder_matches_full_model(smollm, layers):
    enc = Encoder(smollm, layers, ("last", "mean"), batch_size=3)
    calls = []
    beyond = smollm.model.model.layers[max(layers)] if max(layers) < 30 else None
    handle = beyond.register_forward_hook(lambda *a: calls.append(1)) if beyond is not None else None
    try:
        got = enc.encode(CONVERSATIONS)
    finally:
        if handle is not None:
            handle.remove()
    assert calls == [], "a block deeper than the deepest requested layer was computed"
    assert len(enc.base.layers) == max(layers)
    assert len(smollm.model.model.layers) == 30 and not isinstance(smollm.model.model.norm, torch.nn.Identity)
    ids, _ = enc.tokenize(CONVERSATIONS)
    for row, x in enumerate(ids):
        hs = full_hidden_states(smollm, x)
        assert len(hs) == 31
        for layer in layers:
            h = hs[layer][0].numpy()
            scale = np.abs(h).max()
            np.testing.assert_allclose(got.features[f"h{layer}_last"][row], h[-1], atol=1e-5 * scale, rtol=1e-4)
            np.testing.assert_allclose(got.features[f"h{layer}_mean"][row], h.mean(0), atol=1e-5 * scale, rtol=1e-4)
    assert got.n_tokens.tolist() == [len(x) for x in ids] and not got.truncated.any()


def test_last_layer_has_final_norm_and_middle_layers_do_not(smollm):
    ids, _ = Encoder(smollm, [1]).tokenize(CONVERSATIONS[:1])
    hs = full_hidden_states(smollm, ids[0])
    enc = Encoder(smollm, [29, 30], ("last",))
    feats = enc.encode(CONVERSATIONS[:1]).features
    normed = smollm.model.model.norm(hs[29][0, -1:]).detach().numpy()[0]
    assert not np.allclose(feats["h29_last"][0], normed, atol=1e-3)
    np.testing.assert_allclose(feats["h30_last"][0], hs[30][0, -1].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_ignores_padding_even_if_nan(side):
    torch.manual_seed(0)
    lengths = [5, 2, 3]
    hidden = torch.full((3, 5, 4), float("nan"))
    mask = torch.zeros(3, 5, dtype=torch.long)
    real = [torch.randn(n, 4) for n in lengths]
    for i, (n, h) in enumerate(zip(lengths, real)):
        sl = slice(5 - n, 5) if side == "left" else slice(0, n)
        hidden[i, sl], mask[i, sl] = h, 1
    last, mean = pool(hidden, mask, "last"), pool(hidden, mask, "mean")
    for i, h in enumerate(real):
        torch.testing.assert_close(last[i], h[-1])
        torch.testing.assert_close(mean[i], h.mean(0))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")


@pytest.mark.slow
def test_padded_batches_match_unpadded_for_both_sides(smollm):
    single = Encoder(smollm, [10], ("last", "mean"), batch_size=1).encode(CONVERSATIONS)
    for side in ("left", "right"):
        batched = Encoder(smollm, [10], ("last", "mean"), batch_size=3, padding_side=side).encode(CONVERSATIONS)
        assert batched.stats["forward_passes"] == 1 and batched.stats["padding_waste"] > 0.2
        for col in ("h10_last", "h10_mean"):
            scale = np.abs(single.features[col]).max()
            np.testing.assert_allclose(batched.features[col], single.features[col], atol=1e-5 * scale, rtol=1e-4)


def test_length_buckets_cover_every_row_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=200).tolist()
    buckets = length_buckets(lengths, batch_size=8, max_batch_tokens=1200)
    flat = sorted(i for b in buckets for i in b)
    assert flat == list(range(200))
    assert all(len(b) <= 8 for b in buckets)
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1200 for b in buckets)
    unsorted = [list(range(i, min(i + 8, 200))) for i in range(0, 200, 8)]
    assert padding_waste(lengths, buckets) < 0.1 < padding_waste(lengths, unsorted)
    assert length_buckets([900, 3], batch_size=8, max_batch_tokens=100) == [[1], [0]]  # too long: alone
    with pytest.raises(ValueError):
        length_buckets([1], batch_size=0)


def test_resolve_layers():
    assert resolve_layers("all", 30) == list(range(31))
    assert resolve_layers([12, 3, 12], 30) == [3, 12]
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \[31\].*0 \(embedding output\) to 30"):
        resolve_layers([4, 31], 30, "smollm2-135m")
    with pytest.raises(ValueError):
        resolve_layers([-1], 30)


def test_long_prompts_keep_their_last_tokens(smollm):
    enc = Encoder(smollm, [2], max_tokens=8)
    full_ids = smollm.tokenizer(enc.render(CONVERSATIONS[1]), add_special_tokens=False)["input_ids"]
    ids, truncated = enc.tokenize([CONVERSATIONS[1]])
    assert truncated.tolist() == [True] and ids[0] == full_ids[-8:]
    got = enc.encode([CONVERSATIONS[1]])
    assert got.n_tokens.tolist() == [8] and got.truncated.tolist() == [True]


def test_capture_config_is_strict():
    with pytest.raises(ConfigError, match="typo"):
        load_config(CaptureConfig, None, ["typo=1"])
    with pytest.raises(ConfigError, match="max_actors"):
        load_config(CaptureConfig, None, ["min_actors=3", "max_actors=2"])
    with pytest.raises(ConfigError):
        load_config(CaptureConfig, None, ["poolings=[max]"])
    for name, field in CaptureConfig.model_fields.items():
        assert field.description, f"{name} has no description"


def said(capsys) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


def test_cli_reports_bad_inputs_clearly(tmp_path, capsys):
    missing = tmp_path / "nope.parquet"
    assert main([f"queries={missing}", f"out={tmp_path / 'o'}"]) == 2
    assert "not found" in said(capsys)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.queries import QUERY_SCHEMA

    queries = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=QUERY_SCHEMA), queries)
    assert main([f"queries={queries}", f"out={tmp_path / 'o'}", "encoder=no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in said(capsys)
    assert main([f"queries={queries}", f"out={tmp_path / 'o'}", "layers=[31]"]) == 2
    assert "unknown layer(s) [31]" in said(capsys)
    assert main([f"queries={queries}", f"out={tmp_path / 'o'}", "layers=[12]", "poolings=[last,next]"]) == 2
    assert "pooling 'next' reads the last layer: add 30" in said(capsys)
    assert not (tmp_path / "o").exists(), "nothing is written before the inputs are checked"
