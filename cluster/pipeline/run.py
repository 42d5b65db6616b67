"""``prefill-router pipeline run``: retraining end to end, resumable, one stage after another.

Stages: **judge** (only with a ``judge`` section: logged answers without feedback get a judge's verdict) ->
**data** (build the query table, import one with its labels, or use an existing one) -> **label** ->
**capture** -> **probe** -> **tune** (only when the config has a ``tune`` section: the
blocks and PCA size are then chosen by cross-validation, and fit uses that choice) ->
**fit** -> **adapt** (only with an ``adapt`` section: an adapted encoder cross-validated on tune's folds; when
it beats tune's choice its artifact replaces fit's in evaluate and publish) -> **evaluate** -> **publish**
(``cluster/pipeline/publish.py``).
Each stage is the module's own ``run_*`` function, one row of the stage table :data:`STAGES`
(its work, key and output); :class:`PipelineConfig` holds their
configs and wires every path between them under ``work_dir`` (a local directory):

    work_dir/queries.parquet   data (when ``data`` or ``data_import`` is given; else ``queries`` is read)
    work_dir/labels/           label       work_dir/activations/  capture
                               (``labels:`` names existing labels to reuse instead;
                               ``data_import`` writes them: nothing is labelled)
    work_dir/probe/            probe       work_dir/tune/         tune
    work_dir/router/           fit (the artifact)
    work_dir/adapt/            adapt (adapt.json)  work_dir/router-adapted/  its artifact, when chosen
    work_dir/eval/             evaluate    work_dir/stages/       what each stage did

A wired key (e.g. ``label.out``) may not be set to anything else. Re-running the same
command resumes: label and capture skip their finished shards; data, probe, tune, fit and
evaluate are skipped when ``stages/<stage>.json`` records the same inputs (a hash of
the stage's config and of what the stages before it wrote). Fit names its Ray Train run
after a hash of its features and settings, so a checkpoint is reused only for identical inputs.

``prefill-router submit run <this config>`` runs the same command as a Ray job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared import storage
from shared.cli_utils import ConfigOption, Overrides, console
from shared.ray_boot import ensure_ray
from cluster.pipeline.config import PipelineConfig
from cluster.pipeline.state import Stage, check_pipeline, outputs_fingerprint, run_stage, stage_key

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- stages
# Each stage's work: ``(cfg, results of the stages before) -> result``; STAGES (below) adds its key and output.
def stage_data(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    """Import a table with its labels, build one, or use the existing ``queries``."""
    if cfg.data_import is not None:
        from training.data.importer import run_import

        report = run_import(cfg.data_import)
        return {"queries": cfg.data_import.output, "labels": cfg.data_import.labels, "rows": report["rows"],
                "imported": True}
    if cfg.data is None:
        return {"queries": cfg.queries, "built": False}
    from training.data.build import run_build

    table, report = run_build(cfg.data)
    return {"queries": cfg.data.output, "rows": table.num_rows, "built": True,
            "skipped_records": sum(report.skipped.values())}


def stage_judge(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    """Judge the logged answers without a verdict of this judge (resumes by its own parts)."""
    from training.label.judge_run import run_judge

    summary = run_judge(cfg.judge)
    return {k: summary[k] for k in ("judged", "unparsable", "cost_usd")}


def log_fingerprint(cfg: PipelineConfig) -> str | None:
    """A decision log's parts (names): a log that has grown since is a new input, never stale labels."""
    from shared.decision_log import DECISIONS, FEEDBACK, list_parts

    if cfg.data_import is None or cfg.data_import.format != "decision-log":
        return None
    return stage_key([list_parts(uri, kind) for uri in cfg.data_import.inputs for kind in (DECISIONS, FEEDBACK)])


def data_key(cfg: PipelineConfig, keys: dict[str, str]) -> str:
    if cfg.data_import is not None:
        return stage_key(cfg.data_import.model_dump(mode="json"), log_fingerprint(cfg))
    return stage_key(cfg.queries if cfg.data is None else cfg.data.model_dump(mode="json"))


def data_output(cfg: PipelineConfig) -> str | None:
    """What a finished data stage leaves (None: an existing table, nothing to record)."""
    if cfg.data_import is not None:
        return storage.join(cfg.data_import.labels, "import-manifest.json")
    return None if cfg.data is None else cfg.data.output


def stage_label(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from training.label.run import run_label

    if cfg.labels or cfg.data_import is not None:
        return reuse_labels(cfg, cfg.labels or cfg.data_import.labels)
    summary = run_label(cfg.label)
    stats = {t: {k: s[k] for k in ("rows", "failed", "missing", "accuracy")} for t, s in summary["targets"].items()}
    unfinished = {t: s["failed"] + s["missing"] for t, s in stats.items() if s["failed"] + s["missing"]}
    if unfinished:
        raise RuntimeError(f"labelling left rows unfinished {unfinished}; re-run the pipeline to retry them")
    return {"targets": stats, "queries": summary["fully_labelled_queries"]}


def reuse_labels(cfg: PipelineConfig, labels: str | None = None) -> dict[str, Any]:
    """Check that ``labels`` (default ``cfg.labels``) cover every target and the query table; nothing is relabelled."""
    from training.dataset import load_labels

    labels = labels or cfg.labels

    missing = [t for t in cfg.targets if not storage.exists(storage.join(labels, t, "manifest.json"))]
    if missing:
        raise RuntimeError(f"labels {labels} have no {missing}; label them or drop them from targets")
    ids = np.asarray(storage.read_parquet(cfg.label.queries).column("query_id").to_pylist())
    y = load_labels(labels, cfg.targets, ids)["Y"]
    unlabelled = [t for i, t in enumerate(cfg.targets) if np.isnan(y[:, i]).all()]
    if unlabelled:  # a decision log labels one target per query: no query need have them all
        raise RuntimeError(f"labels {labels} label none of the {len(ids)} queries in {cfg.label.queries} for "
                           f"{unlabelled}; label them or drop them from targets")
    acc = {t: round(float(np.nanmean(y[:, i])), 4) for i, t in enumerate(cfg.targets)}
    return {"reused": labels, "queries": int((~np.isnan(y).any(axis=1)).sum()),
            "partly_labelled": int((~np.isnan(y).all(axis=1)).sum()), "accuracy": acc, "skipped": True}


def stage_capture(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from training.capture.run import run_capture

    summary = run_capture(cfg.capture)
    return {k: summary[k] for k in ("rows", "shards_skipped", "shards_written", "device")}


def stage_probe(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from training.fit.probe import run_probe

    report = run_probe(cfg.probe)
    return {"blocks": report["selected"]["blocks"], "rows": report["n_rows"]}


def stage_tune(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from training.fit.tune import run_tune

    best = run_tune(cfg.tune)["best"]
    return {k: best[k] for k in ("blocks", "n_components", "mean_auc")}


def stage_fit(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from training.fit.run import run_fit

    meta = run_fit(cfg.fit)  # its Ray Train run is named after a hash of its inputs (fit.run_name)
    metrics = meta["training_metrics"]
    return {"artifact": cfg.fit.out, "blocks": list(meta["pooling"]), "val_mean_auc": metrics["val_mean_auc"],
            "n_train": metrics["n_train"]}


def stage_adapt(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    """The adapted encoder against tune's choice on tune's folds; its artifact only when it wins."""
    from training.adapt.run import run_adapt

    out = run_adapt(cfg.adapt)
    choice = out["choice"]
    return {"chosen": choice["chosen"], "reason": choice["reason"], "artifact": cfg.adapt.out if out["chosen"] else None,
            choice["choose_by"]: choice["adapted"][choice["choose_by"]]}


def chosen_artifact(cfg: PipelineConfig, results: dict) -> str:
    """The router the pipeline evaluates and publishes: the adapted one when the adapt stage chose it, else fit's."""
    return (results.get("adapt") or {}).get("artifact") or cfg.fit.out


def stage_evaluate(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from training.evaluate.run import run_evaluation
    from cluster.pipeline.publish import artifact_test_metrics

    report = run_evaluation(cfg.evaluate.model_copy(update={"artifact": chosen_artifact(cfg, results)}))
    return {"metrics": artifact_test_metrics(report), "n": report.n.model_dump()}


def stage_publish(cfg: PipelineConfig, results: dict) -> dict[str, Any]:
    from cluster.pipeline.publish import publish

    result = publish(cfg.publish, chosen_artifact(cfg, results), results["evaluate"]["metrics"], cfg.evaluate,
                     cfg.work_dir)
    if result["published"]:
        console.print(f"[green]published[/] {result['artifact']} ({result['reason']})")
    else:
        console.print(f"[yellow]not published:[/] {result['reason']}")
    return result


def _fit_output(cfg: PipelineConfig) -> str:
    from shared.artifact import meta_path

    return meta_path(cfg.fit.out)


# The pipeline, in order: each stage, its work, its key (a hash of its config and of the keys or outputs of the
# stages it reads) and the output that shows it finished. Label and capture resume by their finished shards.
STAGES = (
    Stage("judge", stage_judge, when=lambda cfg: cfg.judge is not None),
    Stage("data", stage_data, key=data_key, output=data_output),
    Stage("label", stage_label),
    Stage("capture", stage_capture),
    Stage("probe", stage_probe,
          key=lambda cfg, keys: stage_key(cfg.probe.model_dump(mode="json"), keys["data"],
                                          outputs_fingerprint(cfg.label.out, cfg.capture.out)),
          output=lambda cfg: storage.join(cfg.probe.out, "probe.json")),
    Stage("tune", stage_tune, key=lambda cfg, keys: stage_key(cfg.tune.model_dump(mode="json"), keys["probe"]),
          output=lambda cfg: storage.join(cfg.tune.out, "tune.json"), when=lambda cfg: cfg.tune is not None),
    Stage("fit", stage_fit, key=lambda cfg, keys: stage_key(cfg.fit.model_dump(mode="json"),
                                                          keys.get("tune", keys["probe"])),
          output=_fit_output),
    Stage("adapt", stage_adapt, key=lambda cfg, keys: stage_key(cfg.adapt.model_dump(mode="json"), keys["tune"]),
          output=lambda cfg: storage.join(cfg.adapt.cv_out, "adapt.json"), when=lambda cfg: cfg.adapt is not None),
    Stage("evaluate", stage_evaluate,
          key=lambda cfg, keys: stage_key(cfg.evaluate.model_dump(mode="json"), keys["fit"],
                                          *([keys["adapt"]] if "adapt" in keys else [])),
          output=lambda cfg: storage.join(cfg.evaluate.out, "report.json")),
    Stage("publish", stage_publish),
)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) every stage in order; returns and writes ``work_dir/pipeline-summary.json``."""
    import ray

    check_pipeline(cfg)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    results: dict[str, Any] = {}
    started = False
    t_all = time.perf_counter()
    stages = [s for s in STAGES if s.when(cfg)]
    try:
        for i, stage in enumerate(stages, 1):
            name = stage.name
            console.rule(f"[bold cyan]pipeline {i}/{len(stages)}: {name}")
            if name == "label":
                started = ensure_ray(cfg.ray_address, log_to_driver=False) or started
            t0 = time.perf_counter()
            results[name] = run_stage(stage, cfg, keys, results)
            seconds = time.perf_counter() - t0
            state = "skipped (up to date)" if results[name].get("skipped") else "done"
            console.print(f"[green]{name} {state}[/] in {seconds:.1f}s", highlight=False)
            log.info("pipeline stage %s %s in %.1fs", name, state, seconds)
    finally:
        if started:
            ray.shutdown()
    summary = {"work_dir": str(Path(cfg.work_dir).resolve()), "seconds": round(time.perf_counter() - t_all, 1),
               "stages": results, "config": cfg.model_dump(mode="json")}
    storage.write_json(str(Path(cfg.work_dir) / "pipeline-summary.json"), summary)
    return summary


# --------------------------------------------------------------------------- CLI
def _load(config: str | None, overrides: list[str] | None) -> PipelineConfig:
    from shared.config import load_config

    return load_config(PipelineConfig, config, overrides or [])


def _run_command(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Run the retraining pipeline; re-run the same command to resume where it stopped."""
    import typer
    from rich.markup import escape

    from shared.cli_utils import err_console
    from shared.errors import UserError

    try:
        summary = run_pipeline(_load(config, overrides))
    except UserError:
        raise  # one line and exit 2 at the command's boundary
    except RuntimeError as exc:
        err_console.print(f"[bold red]pipeline failed:[/] {escape(str(exc))}")
        raise typer.Exit(code=1) from exc
    pub = summary["stages"]["publish"]
    console.print(f"pipeline finished in {summary['seconds']:.0f}s; "
                  + (f"artifact published to {pub['artifact']}" if pub["published"] else "nothing published"))
    code = summary["config"]["publish"]["refused_exit_code"]
    if summary["config"]["publish"]["uri"] and not pub["published"] and code:
        err_console.print(f"[bold yellow]publish refused[/] ({pub['reason']}): exit {code}")
        raise typer.Exit(code=code)


def _check_command(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Validate a pipeline config (keys, paths, targets) without running anything."""
    cfg = _load(config, overrides)
    check_pipeline(cfg)
    console.print(f"[green]ok[/]: targets {cfg.targets}, work_dir {cfg.work_dir}, publish {cfg.publish.uri}")


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_cli

    return run_cli("prefill-router pipeline", argv, {"run": _run_command, "check": _check_command},
                   "The retraining pipeline.")


if __name__ == "__main__":
    raise SystemExit(main())
