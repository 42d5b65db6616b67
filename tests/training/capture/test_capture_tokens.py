"""Per-token states for ``h{layer}_attn`` blocks on the real SmolLM2-135M: shapes, a shared prefix's states
equal the full forward's, the size limit on the driver, and a Ray capture that shards, dedups prefixes and
resumes."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shared.config import ConfigError, load_config
from shared.encoder import Encoder
from shared.errors import BadInput
from shared.models import load_tokenizer
from shared.pooling import assemble_window
from training.capture.plan import encoder_plan
from training.capture.run import CaptureConfig, run_capture
from training.capture.tokens import plan_tokens
from training.token_states import read_token_windows, token_capture

HEADER = "Answer with one letter. " + "Here is a worked example: the sky is blue, so the answer is B. " * 6
CONVERSATIONS = [[{"role": "user", "content": HEADER + q}] for q in (
    "Which is larger, 7 or 9?", "Name the planet closest to the Sun, and say in one long sentence why it is hot.",
    "Is ice colder than steam?")] + [[{"role": "user", "content": "Spell 'cat' backwards."}]]


def full_states(lm, ids, layer):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].numpy()


@pytest.mark.slow
def test_token_states_are_the_last_window_of_the_full_forward_with_or_without_a_shared_prefix(smollm):
    window = 48
    whole = Encoder(smollm, [6], ("last",), token_layers=[6, 30], token_window=window)
    shared = Encoder(smollm, [6], ("last", "mean"), token_layers=[6, 30], token_window=window, min_shared_prefix=16)
    a, b = whole.encode(CONVERSATIONS), shared.encode(CONVERSATIONS)
    assert b.stats["prefix_groups"] == 1 and b.stats["computed_tokens"] < a.stats["computed_tokens"]
    ids, _ = whole.tokenize(CONVERSATIONS)
    assert a.prefix_keys == [""] * 4 and a.prefixes == {}
    keys = b.prefix_keys
    assert keys[0] and keys[:3] == [keys[0]] * 3 and keys[3] == "" and set(b.prefixes) == {keys[0]}
    for row, x in enumerate(ids):
        for layer in (6, 30):
            ref = full_states(smollm, x, layer)[-window:]
            got = a.tokens[row][layer]
            assert got.dtype == np.float16 and got.shape == (min(len(x), window), 576)
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-3 * scale, rtol=2e-3)
            own = b.tokens[row][layer]
            if keys[row]:  # a prefix-shared row keeps only its suffix's states; the prefix's are stored once
                assert len(own) < len(x) and b.prefixes[keys[row]][layer].shape == (window, 576)
            rebuilt = assemble_window(own, b.prefixes[keys[row]][layer] if keys[row] else None, window)
            np.testing.assert_allclose(rebuilt.astype(np.float32), ref, atol=2e-3 * scale, rtol=2e-3)
        np.testing.assert_allclose(a.tokens[row][6][-1].astype(np.float32), a.features["h6_last"][row],
                                   atol=2e-3 * np.abs(a.features["h6_last"][row]).max())


def test_size_estimate_refuses_a_capture_over_the_limit(capsys):
    table = pa.table({"messages": [c for c in CONVERSATIONS] * 50})
    cfg = CaptureConfig(layers=[6], token_layers=[6, 12], token_window=48)
    plan = encoder_plan(cfg)
    est = plan_tokens(cfg, plan, table)
    tok = load_tokenizer(plan.spec)
    lengths = [len(tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]) for c in CONVERSATIONS]
    assert est["states"] == 50 * sum(min(n, 48) for n in lengths) and min(lengths) < 48 < max(lengths)
    assert est["layers"] == [6, 12] and est["gb"] == pytest.approx(est["states"] * 576 * 2 * 2 / 2**30)
    assert "GiB" in capsys.readouterr().out
    tight = cfg.model_copy(update={"token_limit_gb": est["gb"] / 2})
    with pytest.raises(BadInput, match="token_limit_gb"):
        plan_tokens(tight, plan, table)
    assert plan_tokens(CaptureConfig(layers=[6]), plan, table) == {}
    with pytest.raises(ConfigError, match="token_layers"):
        load_config(CaptureConfig, None, ["token_layers=[3, 6, 9]"])
    with pytest.raises(BadInput, match="unknown layer"):
        bad = cfg.model_copy(update={"token_layers": [31]})
        plan_tokens(bad, plan, table)


@pytest.mark.slow
def test_ray_capture_keeps_token_windows_dedups_prefixes_and_resumes(ray_cluster, tmp_path, smollm):
    queries = tmp_path / "q.parquet"
    rows = CONVERSATIONS * 3
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(len(rows))], "split": ["train"] * len(rows),
                             "messages": rows}), queries)
    out = str(tmp_path / "act")
    args = [f"queries={queries}", f"out={out}", "layers=[6]", "poolings=[last]", "token_layers=[6]",
            "token_window=40", "shard_size=5", "bucket_window=6", "progress=false", "max_actors=1"]
    summary = run_capture(load_config(CaptureConfig, None, args))
    assert summary["shards_written"] == 3 and summary["prefix_files"] >= 1
    assert len(list(Path(out, "prefixes").glob("*.parquet"))) == 1  # one prefix, stored once
    ids, states, mask = read_token_windows(out, 6)
    assert ids == [f"q{i}" for i in range(12)] and states.shape == (12, 40, 576) and states.dtype == np.float16
    direct = Encoder(smollm, [6], ("last",), token_layers=[6], token_window=40).encode(rows)
    for i in range(12):
        assert mask[i].sum() == len(direct.tokens[i][6])
        np.testing.assert_allclose(states[i][mask[i]].astype(np.float32), direct.tokens[i][6].astype(np.float32),
                                   atol=0.05, rtol=5e-3)
    sub_ids, sub, _ = read_token_windows(out, 6, window=8, query_ids=["q5", "q0"])
    assert sub_ids == ["q5", "q0"] and sub.shape == (2, 8, 576)
    np.testing.assert_array_equal(sub[1], states[0][mask[0]][-8:])
    with pytest.raises(BadInput, match="token_layers"):
        read_token_windows(out, 12)
    with pytest.raises(BadInput, match=r"token_window=64"):  # a longer window than the capture kept
        read_token_windows(out, 6, window=64)
    shard = Path(out, "shard-00000.parquet")  # an inf, as float16 overflow wrote before states were clipped
    table = pq.read_table(shard)
    blobs = table.column("t6").to_pylist()
    blobs[1] = np.concatenate([[np.float16(np.inf)], np.frombuffer(blobs[1], dtype=np.float16)[1:]]).tobytes()
    pq.write_table(table.set_column(table.schema.get_field_index("t6"), "t6", pa.array(blobs, pa.binary())), shard)
    with pytest.raises(BadInput, match="of 1 of 12 rows hold inf or NaN .* capture again"):
        read_token_windows(out, 6)
    again = run_capture(load_config(CaptureConfig, None, args))
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0
    with pytest.raises(BadInput, match="token_window"):
        run_capture(load_config(CaptureConfig, None, args + ["token_window=64"]))


def test_capture_artifact_keeps_the_token_states_an_adapter_or_attn_blocks_read():
    """``capture artifact=``: an adapter-only artifact (no captured vector block) still gets one pooled column."""
    from types import SimpleNamespace as NS

    adapter_only = NS(adapter=NS(from_layer=12, window=128), pooled=None)
    assert token_capture(adapter_only, {"layers": [], "poolings": ["last", "mean"]}) == {
        "token_layers": [12], "token_window": 128, "layers": [12], "poolings": ["last"]}
    attn = NS(adapter=None, pooled=NS(layers=[9, 12], window=64))
    assert token_capture(attn, {"layers": [9], "token_layers": [3], "token_window": 256}) == {
        "token_layers": [3, 9, 12], "token_window": 256}
    assert token_capture(NS(adapter=None, pooled=None), {"layers": [9]}) == {}
