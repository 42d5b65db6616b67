"""``prefill-router demo``: the whole system end to end on this machine.

Stages run in order and each reuses what an earlier run left in ``--workdir``. The
stages that exist so far: build the query table, load (and on first use convert) every
default target and encoder, and print what was made.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shared.cli_utils import console, friendly_errors, run_app, setup_logging

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def stage(title: str):
    console.rule(f"[bold cyan]{title}")
    return time.perf_counter()


def run_demo(workdir: Path, quick: bool) -> dict:
    """Run the demo stages; returns the summary it printed."""
    from shared import storage
    from shared.config import load_config
    from shared.model_cmd import load_table, registry_table, timed_load
    from shared.registry import load_registry
    from training.data import DataConfig, run_build

    summary: dict = {"workdir": str(workdir), "quick": quick, "stages": {}}
    t0 = stage("1/2 query table")
    data_cfg = load_config(DataConfig, CONFIG_DIR / ("data-quick.yaml" if quick else "data.yaml"),
                           [f"output={workdir / 'queries.parquet'}"])
    if storage.exists(data_cfg.output):
        console.print(f"reusing {data_cfg.output}")
        table = storage.read_parquet(data_cfg.output)
    else:
        table, _ = run_build(data_cfg)
    summary["stages"]["queries"] = {"rows": table.num_rows, "seconds": time.perf_counter() - t0}

    t0 = stage("2/2 models")
    registry = load_registry()
    console.print(registry_table(registry))
    loads = [timed_load(spec) for spec in registry.models if not spec.opt_in]
    console.print(load_table(loads))
    summary["stages"]["models"] = {r["name"]: {k: v for k, v in r.items() if k != "model"} for r in loads}
    summary["stages"]["models"]["seconds"] = time.perf_counter() - t0

    done = Table(title="demo summary")
    done.add_column("stage")
    done.add_column("result")
    done.add_row("queries", f"{table.num_rows} rows in {data_cfg.output}")
    for r in loads:
        done.add_row(f"model {r['name']}", f"{r['layers']} layers, loaded in {r['seconds']:.1f}s")
    console.print(done)
    storage.write_json(str(workdir / "demo-summary.json"), summary)
    return summary


def _demo(
    quick: Annotated[bool, typer.Option("--quick", help="Small query table and sample sizes (about 5 minutes).")] = False,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo keeps what it makes.")] = Path("runs/demo"),
) -> None:
    """Run the whole system end to end on this machine."""
    friendly_errors(lambda: run_demo(workdir / ("quick" if quick else "full"), quick))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    app = typer.Typer(add_completion=False)
    app.command()(_demo)
    return run_app(app, argv, "prefill-router demo")
