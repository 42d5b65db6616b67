"""``prefill-router demo``: the whole system end to end on this machine.

1. start a private local Ray head (``cluster/local.py``; 127.0.0.1, usage stats off);
2. run the retraining pipeline (``cluster/pipeline/run.py``) with ``configs/demo.yaml`` (or
   ``demo-quick.yaml``): build a query table, label every target, capture the encoder's
   prefill activations, probe the layers, fit SharedTrunkNet on Ray Train, evaluate it
   against the baselines (report, PNG plots). By default it takes a stable sample of the
   committed reference dataset (``data/``) and reuses its labels of every target (three,
   one of them an opt-in model that takes CPU-hours to label); ``--label`` builds and
   labels a fresh table with the two bundled models instead;
3. deploy the Serve app with the new artifact (the targets whose weights this machine has;
   the router chooses among those) and send real chat requests through it, showing the
   target each went to and why;
4. print a summary (from the report files it wrote), then stop Serve and the cluster.

Everything lands under ``--workdir``; a second run resumes the pipeline and reuses what the
first made. A GPU, when Ray sees one, is used by labelling, capture, training and serving.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from cluster.demo_results import DemoSummary
from shared.cli_utils import console, exit_on_sigterm, run_cli
from shared.errors import MissingInput

if TYPE_CHECKING:
    from training.evaluate.results import EvalReport

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
REFERENCE = {"queries": ROOT / "data" / "queries.parquet", "labels": ROOT / "data" / "labels"}
REFERENCE_SAMPLE = {True: 240, False: 900}  # quick / full: queries sampled from the reference table


def stage(title: str) -> float:
    console.rule(f"[bold cyan]demo: {title}")
    return time.perf_counter()


def reference_sample(queries: str | Path, n: int) -> Any:
    """``n`` rows of a query table, every split in proportion, chosen by a hash of query_id (stable)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(queries)
    ids = table.column("query_id").to_pylist()
    split = np.asarray(table.column("split").to_pylist())
    rank = np.asarray([hashlib.sha256(q.encode()).hexdigest() for q in ids])
    keep = np.zeros(len(ids), bool)
    for s in np.unique(split):
        rows = np.flatnonzero(split == s)
        take = max(1, round(n * len(rows) / len(ids)))
        keep[rows[np.argsort(rank[rows])[:take]]] = True
    return table.filter(keep)


def labelled_targets(labels: Path) -> list[str]:
    """Targets with a finished label manifest under ``labels``, in the registry's order."""
    from shared.registry import load_registry

    found = {p.parent.name for p in labels.glob("*/manifest.json")}
    order = [m.name for m in load_registry().models]
    return sorted(found, key=lambda t: (order.index(t) if t in order else len(order), t))


def pipeline_config(workdir: Path, quick: bool, reference_labels: Path | None,
                    targets: list[str] | None = None) -> Any:
    """The demo's PipelineConfig: demo(-quick).yaml with work_dir set.

    With ``reference_labels`` (the default: the committed ``data/labels``) it runs on a
    stable sample of the committed query table and reuses those labels for every target
    they hold (or ``targets``); without, it builds and labels a fresh table with the
    config's targets (or ``targets``)."""
    import pyarrow.parquet as pq
    import yaml

    from cluster.pipeline.config import PipelineConfig

    raw = yaml.safe_load((CONFIG_DIR / ("demo-quick.yaml" if quick else "demo.yaml")).read_text())
    raw["work_dir"] = str(workdir)
    if targets:
        raw["targets"] = list(targets)
    if reference_labels is not None:
        if not reference_labels.is_dir() or not REFERENCE["queries"].is_file():
            raise MissingInput(f"reference labels {reference_labels} or query table {REFERENCE['queries']} "
                                    "not found (they are committed under data/)")
        sample = workdir / "queries.parquet"
        if not sample.is_file():
            workdir.mkdir(parents=True, exist_ok=True)
            pq.write_table(reference_sample(REFERENCE["queries"], REFERENCE_SAMPLE[quick]), sample)
        raw.pop("data", None)
        raw.update(queries=str(sample), labels=str(reference_labels))
        if not targets:
            raw["targets"] = labelled_targets(reference_labels)
    return PipelineConfig.model_validate(raw)


def demo_models(cfg: Any) -> list[Any]:
    """The models the demo loads: the encoder and every target whose weights this machine has
    (those Serve serves, as ``cluster.demo_chat.servable_targets`` decides; the others it names)."""
    from shared.models import present_models
    from shared.registry import load_registry

    registry = load_registry(cfg.registry)
    return present_models([registry.get(cfg.capture.encoder)] + [registry.get(t) for t in cfg.targets])


def prepare_demo_models(cfg: Any) -> float:
    """Convert, before anything starts, each demo model whose bf16 cache is missing, in a child
    process, with a line as each starts and ends (else a Serve replica would convert it, silently).
    Nothing to convert costs a few ``stat`` calls and prints nothing. The seconds it took."""
    from shared.model_cmd import print_conversion
    from shared.models import prepare_models

    start = time.perf_counter()
    prepare_models(demo_models(cfg), print_conversion)
    return time.perf_counter() - start


def start_cluster(workdir: Path) -> tuple[Any, dict[str, Any]]:
    """A private Ray head for the demo, and this process connected to it."""
    import ray

    from cluster.local import LocalClusterConfig, connect_env, start_head
    from shared.ray_boot import ensure_ray

    cfg = LocalClusterConfig(state_file=str(workdir / "cluster.json"), port=0, dashboard_port=0)
    state = start_head(cfg)
    os.environ.update(connect_env(state))
    ensure_ray(state["gcs_address"], log_to_driver=False)
    resources = ray.cluster_resources()
    console.print(f"Ray {state['ray_version']} at {state['gcs_address']}, dashboard {state['dashboard_url']}, "
                  f"{resources.get('CPU', 0):.0f} CPU, {resources.get('GPU', 0):.0f} GPU")
    return cfg, state


def stop_cluster(cfg: Any) -> None:
    import ray

    from cluster.local import stop_head

    ray.shutdown()
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(key, None)
    stop_head(cfg)
    console.print("stopped the demo's Ray cluster")


def print_chats(chats: list[dict[str, Any]]) -> None:
    """Each chat request: the prompt, where it went and why, the answer and the timings."""
    from cluster.demo_chat import why

    console.print("[bold]chat requests through the router[/] (POST /v1/chat/completions, model=router)")
    for i, c in enumerate(chats, 1):
        prompt = " ".join(c["messages"][-1]["content"].split())
        answer = " ".join(c["answer"].split())
        console.print(f"[bold]{i}.[/] [{c['task']}] {prompt[:100]}{'…' if len(prompt) > 100 else ''}", highlight=False)
        console.print(f"   [green]-> {c['target']}[/]  {why(c)}", highlight=False)
        console.print(f"   answer: {answer[:100]!r}  (router overhead {c['overhead_ms']:.0f} ms, "
                      f"end to end {c['seconds']:.1f} s)", highlight=False)


def summary_table(summary: DemoSummary, report: EvalReport) -> Table:
    """Stage times and the headline numbers, read back from the report the pipeline wrote."""
    from cluster.pipeline.publish import artifact_test_metrics

    view = Table(title="demo summary")
    view.add_column("item")
    view.add_column("value", overflow="fold")
    for name, seconds in summary.seconds.items():
        view.add_row(f"time: {name}", f"{seconds:.0f} s")
    m = artifact_test_metrics(report)
    refs = report.subsets["test"].references
    view.add_row("test queries", str(report.n.test))
    view.add_row("targets", ", ".join(report.targets))
    view.add_row("router accuracy / best single / oracle",
                 f"{m['accuracy']:.1%} / {refs.best_single.accuracy:.1%} ({refs.best_single.target}) / "
                 f"{refs.oracle.accuracy:.1%}")
    view.add_row("gap closed", f"{m['gap_closed']:.1%}" if "gap_closed" in m else "n/a (oracle = best single)")
    view.add_row("cost savings vs most expensive", f"{m['cost_savings']:.1%}")
    view.add_row("mean AUC", f"{m.get('mean_auc', float('nan')):.3f}")
    for name, line in summary.shipped.items():
        view.add_row(f"shipped router, {name}", line)
    for key, path in summary.files.items():
        view.add_row(key, path)
    return view


def run_demo(workdir: Path, quick: bool, reference_labels: Path | None = None, n_chats: int = 4,
             targets: list[str] | None = None) -> DemoSummary:
    """Run every demo step; returns (and writes ``workdir/demo-summary.json``) the summary."""
    from cluster.demo_chat import pick_prompts, serve_and_chat
    from cluster.demo_results import shipped_results
    from shared import storage
    from training.evaluate.report import summary_table as eval_table
    from training.evaluate.results import EvalReport
    from cluster.pipeline.run import run_pipeline
    from cluster.pipeline.state import check_pipeline

    t_all = time.perf_counter()
    cfg = pipeline_config(workdir, quick, reference_labels, targets)
    check_pipeline(cfg)
    console.print(f"targets: {', '.join(cfg.targets)}; labels: "
                  f"{'reused from ' + str(reference_labels) if reference_labels else 'labelled now'}")
    seconds: dict[str, float] = {}
    stage("1/4 models (bf16 caches) and local Ray cluster")
    seconds["models"] = prepare_demo_models(cfg)
    t0 = time.perf_counter()
    cluster_cfg, state = start_cluster(workdir)
    try:
        seconds["cluster start"] = time.perf_counter() - t0
        t0 = stage("2/4 pipeline: data, label, capture, probe, fit (Ray Train), evaluate")
        pipe = run_pipeline(cfg)
        seconds["pipeline"] = time.perf_counter() - t0
        report = EvalReport.read(str(Path(cfg.evaluate.out, "report.json")))
        console.print(eval_table(report.to_json()))
        t0 = stage("3/4 Serve app and chat requests")
        prompts = pick_prompts(storage.read_parquet(cfg.label.queries), n_chats)
        served = serve_and_chat(cfg.fit.out, prompts)
        seconds["serve + chats"] = time.perf_counter() - t0
        for reason in served.not_served.values():
            console.print(f"[yellow]not served here, so the router chooses among the others:[/] {escape(reason)}")
        print_chats(served.chats)
    finally:
        t0 = stage("4/4 shut down")
        stop_cluster(cluster_cfg)
    seconds["total"] = time.perf_counter() - t_all
    files = {"evaluation report": str(Path(cfg.evaluate.out, "report.md")),
             "cost-accuracy plot": str(Path(cfg.evaluate.out, "cost_accuracy.png")),
             "layer probe plots": str(Path(cfg.probe.out)),
             "router artifact": str(Path(cfg.fit.out)),
             "summary": str(workdir / "demo-summary.json")}
    summary = DemoSummary(workdir=str(workdir), quick=quick, reference_labels=str(reference_labels or ""),
                          seconds={k: round(v, 1) for k, v in seconds.items()}, files=files,
                          stages=pipe["stages"], serve=served, test_metrics=pipe["stages"]["evaluate"]["metrics"],
                          shipped=shipped_results(Path(__file__).resolve().parents[1]))
    storage.write_json(str(workdir / "demo-summary.json"), summary.model_dump())
    console.print(summary_table(summary, report))
    return summary


def _demo(
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smaller sample (240 reference queries, 64 with --label) and a small router.")] = False,
    label: Annotated[bool, typer.Option(
        "--label", help="Build and label a fresh query table (configs/demo.yaml's targets: the two bundled "
        "models) instead of reusing the committed reference labels.")] = False,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Reuse these labels instead of data/labels.")
    ] = None,
    targets: Annotated[Optional[str], typer.Option(
        "--targets", help="Comma-separated targets (default: every target the reused labels hold, or the "
        "config's with --label).")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo keeps what it makes.")] = Path("runs/demo"),
) -> None:
    """Run the whole system end to end on this machine: Ray, pipeline, Serve, chat."""
    if label and labels is not None:
        raise typer.BadParameter("--label labels a fresh table; --labels reuses existing labels: pick one")
    ref = None if label else (labels or REFERENCE["labels"])
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    sub = ("quick" if quick else "full") + ("-label" if label else "")
    with exit_on_sigterm():
        run_demo((workdir / sub).resolve(), quick, ref, targets=names)


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router demo", argv, _demo)
