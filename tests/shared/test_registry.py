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
    ],
)
def test_bad_specs_are_rejected(change, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**{**BASE, **change})


def test_duplicate_names_rejected():
    with pytest.raises(ValidationError, match="duplicate"):
        ModelRegistry(models=[ModelSpec(**BASE), ModelSpec(**BASE)])
