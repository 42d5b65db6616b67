"""Models are converted up front, with progress: ``models prepare`` and the demo's first stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.models import ModelLoadError, converted_dir, missing_weights, prepare_models, unconverted
from shared.registry import ModelSpec, load_registry


def mark_converted(spec: ModelSpec, cache: Path) -> None:
    dest = converted_dir(spec, cache)
    dest.mkdir(parents=True)
    (dest / "SOURCE_SHA256").write_text(spec.sha256 + "\n")


def test_unconverted_lists_gguf_models_without_a_cached_copy(tmp_path):
    reg = load_registry()
    smollm, gemma = reg.get("smollm2-135m"), reg.get("gemma3-270m")
    specs = [smollm, gemma, reg.get("qwen2.5-coder-1.5b"), reg.get("gpt-4o-mini"), gemma]
    assert [s.name for s in unconverted(specs, tmp_path)] == ["smollm2-135m", "gemma3-270m"]  # once each
    mark_converted(smollm, tmp_path)
    assert [s.name for s in unconverted(specs, tmp_path)] == ["gemma3-270m"]
    mark_converted(gemma, tmp_path)
    assert unconverted(specs, tmp_path) == []


def test_nothing_to_convert_starts_no_process(tmp_path, monkeypatch):
    import multiprocessing

    reg = load_registry()
    specs = [reg.get(n) for n in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b", "gpt-4o-mini")]
    for spec in specs[:2]:
        mark_converted(spec, tmp_path)
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: pytest.fail("started a process"))
    calls = []
    assert prepare_models(specs, lambda *a: calls.append(a), tmp_path) == {}
    assert calls == []


def test_conversion_runs_in_a_child_and_its_error_reaches_the_caller(tmp_path):
    gone = ModelSpec(name="gone", role="target", source="gguf-file", path=str(tmp_path / "x.gguf"), sha256="0" * 64)
    calls = []
    with pytest.raises(ModelLoadError, match="not found"):
        prepare_models([gone], lambda *a: calls.append(a), tmp_path)
    assert calls == [("gone", None)]
    assert not converted_dir(gone, tmp_path).exists()


def test_demo_converts_exactly_its_unconverted_models(tmp_path, monkeypatch):
    """The encoder and every target it will serve (weights here) whose bf16 copy is missing."""
    from cluster.demo import REFERENCE, demo_models, pipeline_config

    if not (REFERENCE["labels"] / "summary.json").is_file():
        pytest.skip("reference labels not committed")
    monkeypatch.setenv("PREFILL_ROUTER_CACHE", str(tmp_path / "cache"))
    cfg = pipeline_config(tmp_path / "work", quick=True, reference_labels=REFERENCE["labels"])
    reg = load_registry()
    servable = [t for t in cfg.targets if missing_weights(reg.get(t)) is None]
    names = [s.name for s in demo_models(cfg)]
    assert names == [cfg.capture.encoder, *servable]
    mark_converted(reg.get("smollm2-135m"), tmp_path / "cache")
    todo = [s.name for s in unconverted(demo_models(cfg))]
    assert todo == [t for t in servable if t != "smollm2-135m" and reg.get(t).source not in ("hf", "openai")]
    assert "gemma3-270m" in todo


def test_demo_step_with_every_cache_in_place_is_cheap_and_silent(tmp_path, monkeypatch, capsys):
    import multiprocessing

    from cluster.demo import REFERENCE, demo_models, pipeline_config, prepare_demo_models

    if not (REFERENCE["labels"] / "summary.json").is_file():
        pytest.skip("reference labels not committed")
    monkeypatch.setenv("PREFILL_ROUTER_CACHE", str(tmp_path / "cache"))
    cfg = pipeline_config(tmp_path / "work", quick=True, reference_labels=REFERENCE["labels"])
    for spec in unconverted(demo_models(cfg)):
        mark_converted(spec, tmp_path / "cache")
    capsys.readouterr()
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: pytest.fail("started a process"))
    assert prepare_demo_models(cfg) < 1.0
    assert capsys.readouterr().out == ""


def test_a_conversion_that_loses_the_race_keeps_the_winners_copy(tmp_path):
    """Two processes converting the same model at once (two capture actors, parallel tests):
    the one that finishes second finds the copy in place, keeps it and leaves no temp dir."""
    from shared.models import _install_converted

    spec = load_registry().get("smollm2-135m")
    dest = converted_dir(spec, tmp_path)
    mark_converted(spec, tmp_path)  # the other process's finished copy
    (dest / "marker").write_text("winner")
    late = dest.parent / f".{dest.name}.late"
    late.mkdir()
    (late / "SOURCE_SHA256").write_text(spec.sha256 + "\n")
    _install_converted(late, dest, spec, tmp_path)
    assert (dest / "marker").read_text() == "winner"
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    first, fresh = tmp_path / "first", converted_dir(spec, tmp_path / "fresh")  # no race: moved in
    first.mkdir()
    (first / "SOURCE_SHA256").write_text(spec.sha256 + "\n")
    fresh.parent.mkdir(parents=True)
    _install_converted(first, fresh, spec, tmp_path / "fresh")
    assert (fresh / "SOURCE_SHA256").is_file() and not first.exists()
