import pytest
from pydantic import ValidationError

from shared.registry import ModelRegistry, ModelSpec

BASE = dict(name="m", role="target", source="gguf-file", path="/x.gguf", sha256="0" * 64)


def test_shipped_registry_has_default_encoder_and_targets(registry):
    assert {m.name for m in registry.targets()} >= {"smollm2-135m", "gemma3-270m"}
    assert "smollm2-135m" in {m.name for m in registry.encoders()}
    assert all(not m.opt_in for m in registry.targets())
    assert len(registry.targets(include_opt_in=True)) > len(registry.targets())


def test_lookup_error_lists_known_models(registry):
    with pytest.raises(KeyError, match="smollm2-135m"):
        registry.get("nope")


def test_cost_uses_per_million_prices():
    spec = ModelSpec(**BASE, price_input_per_m=2.0, price_output_per_m=10.0)
    assert spec.cost(1000, 100) == pytest.approx((1000 * 2 + 100 * 10) / 1e6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sha256": None}, "needs sha256"),
        ({"source": "pypi-gguf", "package": None}, "needs package"),
        ({"source": "openai", "backend": "openai", "base_url": "http://x", "role": "encoder"}, "only be a target"),
        ({"source": "openai", "base_url": "http://x"}, "go together"),
        ({"chat_template": "no-such-template"}, "no chat template"),
        ({"price_input_per_m": -1}, "greater than or equal"),
        ({"colour": "red"}, "Extra inputs"),
        ({"engine_args": {"max_model_len": 2048}}, "takes no engine_args"),  # transformers has no engine
    ],
)
def test_bad_specs_are_rejected(change, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**{**BASE, **change})


def test_engine_args_belong_to_a_backend_with_an_engine():
    spec = ModelSpec(**{**BASE, "backend": "vllm", "engine_args": {"max_model_len": 2048, "enforce_eager": True}})
    assert spec.engine_args == {"max_model_len": 2048, "enforce_eager": True}


def test_duplicate_names_rejected():
    with pytest.raises(ValidationError, match="duplicate"):
        ModelRegistry(models=[ModelSpec(**BASE), ModelSpec(**BASE)])


def test_a_null_registry_is_the_working_directorys_then_the_packages(tmp_path, monkeypatch, caplog):
    """``registry: null`` reads ``./configs/models.yaml`` when the working directory has one (a
    checkout's edited registry), else the installed package's; either way the file is logged,
    and ``models list`` names it."""
    import logging
    import os
    import subprocess
    import sys

    import yaml

    from shared.registry import DEFAULT_REGISTRY, load_registry, registry_path
    from tests.procs import ROOT

    bare, checkout = tmp_path / "bare", tmp_path / "checkout"
    (checkout / "configs").mkdir(parents=True)
    bare.mkdir()
    local = checkout / "configs" / "models.yaml"
    local.write_text(yaml.safe_dump({"models": [{**BASE, "name": "only-here"}]}))
    monkeypatch.chdir(checkout)
    with caplog.at_level(logging.INFO, logger="shared.registry"):
        assert [m.name for m in load_registry().models] == ["only-here"]
    assert registry_path() == local and f"model registry: {local.resolve()}" in caplog.text
    assert registry_path(DEFAULT_REGISTRY) == DEFAULT_REGISTRY  # a path given is the path read
    monkeypatch.chdir(bare)
    assert registry_path() == DEFAULT_REGISTRY and "only-here" not in {m.name for m in load_registry().models}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "models", "list"], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "only-here" in out and f"registry read from {local.resolve()}" in out
