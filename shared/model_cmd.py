"""``prefill-router models``: show the registry; convert and time model loads."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from shared.cli_utils import console, run_cli
from shared.registry import ModelRegistry, ModelSpec, load_registry, registry_path

RegistryOption = Annotated[Optional[str], typer.Option(
    "--registry", help="Registry YAML (default: ./configs/models.yaml if present, else the package's).")]


def registry_table(registry: ModelRegistry) -> Table:
    table = Table(title="model registry")
    for col in ("name", "role", "backend", "source", "$/1M in", "$/1M out", "context", "opt-in"):
        table.add_column(col)
    for m in registry.models:
        table.add_row(m.name, m.role, m.backend, m.source, f"{m.price_input_per_m:.2f}",
                      f"{m.price_output_per_m:.2f}", str(m.context_limit), "yes" if m.opt_in else "")
    return table


def print_conversion(name: str, seconds: float | None) -> None:
    """Progress of ``shared.models.prepare_models``: a line as a conversion starts, one when it ends."""
    if seconds is None:
        console.print(f"converting {name} GGUF → bf16 cache (first run only)…", highlight=False)
    else:
        console.print(f"  {name} converted in {seconds:.1f} s", highlight=False)


def timed_load(spec: ModelSpec) -> dict:
    """Load a model (converting on first use) and report timings and shape."""
    from shared.models import load_causal_lm

    start = time.perf_counter()
    loaded = load_causal_lm(spec)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in loaded.model.parameters())
    return {"name": spec.name, "seconds": seconds, "layers": loaded.num_layers,
            "hidden": loaded.hidden_size, "params_m": params / 1e6, "device": loaded.device, "model": loaded}


def load_table(rows: list[dict]) -> Table:
    table = Table(title="model loads")
    for col in ("name", "layers", "hidden", "params (M)", "device", "convert (s)", "load (s)"):
        table.add_column(col)
    for r in rows:
        convert = r.get("convert_s")
        table.add_row(r["name"], str(r["layers"]), str(r["hidden"]), f"{r['params_m']:.0f}", r["device"],
                      "cached" if convert is None else f"{convert:.1f}", f"{r['seconds']:.2f}")
    return table


def _list(registry: RegistryOption = None) -> None:
    """Print the model registry and the file it was read from."""
    path = registry_path(registry).resolve()
    console.print(registry_table(load_registry(path)))
    console.print(f"registry read from {path}", highlight=False, soft_wrap=True)


def _prepare(names: Annotated[Optional[list[str]], typer.Argument(help="Models (default: all non-opt-in).")] = None,
             registry: RegistryOption = None) -> None:
    """Convert GGUF models to the cached bf16 copy, then time a load of each (from the cache)."""
    from shared.models import prepare_models

    reg = load_registry(registry)
    specs = [reg.get(n) for n in names] if names else [m for m in reg.models if not m.opt_in]
    local = [s for s in specs if s.source != "openai"]
    converted = prepare_models(local, print_conversion)
    console.print(load_table([{**timed_load(s), "convert_s": converted.get(s.name)} for s in local]))


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router models", argv, {"list": _list, "prepare": _prepare}, "The model registry.")
