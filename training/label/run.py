"""``prefill-router label``: which target answers each query correctly (Ray Data).

The query table (from ``prefill-router data build``) is cut into shards of
``shard_size`` consecutive rows (after the ``splits`` filter and ``limit``). Every target
gets its own Ray Data actor pool (``map_batches`` with ``ActorPoolStrategy``) wrapping a
scorer from :mod:`training.label.backends`; the per-target branches are unioned into one
streaming pipeline, and the driver writes ``<out>/<target>/shard-XXXXX.parquet`` once all
rows of a shard have come back (:mod:`training.shards`).

Failures (an endpoint that is down, a batch that raised) give rows with
``status="failed"`` and ``correct=null``; they are never written as wrong answers. A
shard holding any failed row is **not** written under its final name: its rows go to
``<out>/<target>/failed/shard-XXXXX.parquet`` instead, so the shard counts as unfinished.
A re-run with the same arguments skips finished shards, reuses the ``ok`` rows of the
failed files, asks again only for the failed and missing rows, and removes a failed
file once its shard is written. The job exits with code 1 while failures remain.

Each target directory has a ``manifest.json`` (identity: model fingerprint, query table
hash, shard size, scoring options, scorer versions); a re-run with different settings is
refused. ``<out>/summary.json`` holds the final summary. ``out`` may be ``s3://``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from shared import storage
from shared.backends import is_remote
from shared.cli_utils import ConfigOption, Overrides
from shared.config import StrictConfig
from shared.errors import BadInput, MissingInput
from shared.ray_boot import ensure_ray
from shared.registry import ModelSpec
from training import shards as sh
from training.label.backends import OpenAIOptions, ScoringOptions
from training.label.pool import PoolConfig
from training.labels import FAILED_DIR, LABEL_SCHEMA, read_target

log = logging.getLogger(__name__)
UDF_SCHEMA = LABEL_SCHEMA.append(pa.field("_shard", pa.int64()))
INPUT_COLUMNS = ["query_id", "split", "messages", "answer_type", "reference", "choices", "meta"]


class LabelConfig(StrictConfig):
    """Config of ``prefill-router label``."""

    queries: str = Field("runs/queries.parquet", description="Query table from `data build` (local or s3://).")
    out: str = Field("runs/labels", description="Output directory; one sub-directory per target (local or s3://).")
    registry: str | None = Field(None, description="Model registry YAML (None: configs/models.yaml).")
    targets: list[str] | None = Field(None, description="Targets to label (None: the registry's default targets).")
    splits: list[str] = Field(["train", "val", "test"], description="Splits of the query table to label.")
    limit: int | None = Field(None, gt=0, description="Label only the first N selected queries (smoke runs).")
    shard_size: int = Field(256, gt=0, description="Queries per output shard (the unit of resume).")
    batch_size: int = Field(8, gt=0, description="Queries per actor call (one Ray Data block each).")
    scoring: ScoringOptions = Field(default_factory=ScoringOptions, description="Generation and scoring settings.")
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions, description="HTTP settings of openai targets.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Actor pool of every local-model target.")
    openai_pool: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.25, max_actors=2),
        description="Actor pool of every openai target (HTTP-bound: a fraction of a CPU).")
    target_pools: dict[str, PoolConfig] = Field(default_factory=dict, description="Per-target pool overrides.")
    use_gpu: bool | None = Field(None, description="Run local models on GPUs; None: when the cluster has any.")
    ray_address: str | None = Field(None, description="Ray cluster address (None: start or reuse a local one).")
    progress: bool = Field(True, description="Show a progress bar.")

    def pool_for(self, spec: ModelSpec) -> PoolConfig:
        if spec.name in self.target_pools:
            return self.target_pools[spec.name]
        return self.openai_pool if is_remote(spec.backend) else self.pool


# --------------------------------------------------------------------------- pure helpers
def select_queries(table: pa.Table, splits: list[str], limit: int | None) -> pa.Table:
    """Rows of the chosen splits, in table order, at most ``limit``."""
    unknown = set(splits) - set(table.column("split").to_pylist())
    if unknown:
        log.warning("no queries in split(s) %s", sorted(unknown))
    chosen = table.filter(pc.is_in(table.column("split"), pa.array(splits)))
    chosen = chosen.slice(0, limit) if limit else chosen
    if chosen.num_rows == 0:
        raise BadInput(f"no queries to label in splits {splits} of a {table.num_rows}-row table")
    return chosen


def label_identity(spec: ModelSpec, qhash: str, cfg: LabelConfig) -> dict[str, Any]:
    """What a target's shards depend on; a re-run must match it."""
    from shared.models import model_fingerprint
    from training.label.scoring import scorer_versions

    return {"target": model_fingerprint(spec), "backend": spec.backend, "queries_hash": qhash,
            "shard_size": cfg.shard_size, "scoring": cfg.scoring.model_dump(mode="json"),
            "scorers": scorer_versions(), "format": 1}


def label_rows(spec: ModelSpec, scorer: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run a scorer on query rows; adds target, cost, split, query id and shard to each result."""
    out = []
    for row, res in zip(rows, scorer.label(rows)):
        cost = spec.cost(res["input_tokens"], res["output_tokens"]) if res["status"] == "ok" else None
        out.append({"query_id": row["query_id"], "split": row["split"], "target": spec.name, **res, "cost": cost,
                    "_shard": row["_shard"]})
    return out


class LabelShardWriter(sh.ShardWriter):
    """A :class:`ShardWriter` that keeps shards with failed rows out of the finished set."""

    def __init__(self, out: str, expected: dict[int, int]):
        super().__init__(out, expected, key="query_id")
        self.failed: list[int] = []

    def _write(self, shard: int) -> None:
        rows = sorted(self.buffers.pop(shard).values(), key=lambda r: str(r[self.key]))
        table = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
        failed_uri = sh.shard_path(storage.join(self.out, FAILED_DIR), shard)
        if any(r["status"] != "ok" for r in rows):
            storage.write_parquet(table, failed_uri)
            self.failed.append(shard)
            return
        storage.write_parquet(table, sh.shard_path(self.out, shard))
        storage.delete(failed_uri)
        self.written.append(shard)


def carried_rows(out: str, shards: list[int]) -> pa.Table | None:
    """The ``ok`` rows of earlier failed files of still unfinished ``shards`` (with ``_shard``)."""
    parts = []
    for shard in shards:
        uri = sh.shard_path(storage.join(out, FAILED_DIR), shard)
        if storage.exists(uri):
            table = storage.read_parquet(uri).cast(LABEL_SCHEMA)
            table = table.filter(pc.equal(table.column("status"), "ok"))
            parts.append(table.append_column("_shard", pa.array([shard] * table.num_rows, pa.int64())))
    return pa.concat_tables(parts) if parts else None


# --------------------------------------------------------------------------- Ray wiring
class LabelUDF:
    """The Ray Data actor: a thin shell around one scorer."""

    def __init__(self, spec: dict, scoring: dict, http: dict, torch_threads: int | None, device: str | None):
        from training.label.backends import make_scorer

        self.spec = ModelSpec.model_validate(spec)
        self.scorer = make_scorer(self.spec, ScoringOptions.model_validate(scoring),
                                  OpenAIOptions.model_validate(http), torch_threads=torch_threads, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(label_rows(self.spec, self.scorer, batch.to_pylist()), schema=UDF_SCHEMA)


def build_pipeline(jobs: dict[str, tuple[ModelSpec, pa.Table]], cfg: LabelConfig, use_gpu: bool) -> Any:
    """One Ray Data branch (blocks of ``batch_size`` rows -> actor pool) per target, unioned."""
    import ray

    branches = []
    for spec, pending in jobs.values():
        pool = cfg.pool_for(spec)
        gpu = use_gpu and not is_remote(spec.backend)
        resources = {"num_gpus": pool.num_gpus} if gpu else {"num_cpus": pool.num_cpus}
        threads = None if gpu else (pool.torch_threads or max(1, int(pool.num_cpus)))
        blocks = [pending.slice(i, cfg.batch_size) for i in range(0, pending.num_rows, cfg.batch_size)]
        ds = ray.data.from_arrow(blocks).map_batches(
            LabelUDF,
            fn_constructor_kwargs={"spec": spec.model_dump(mode="json"), "scoring": cfg.scoring.model_dump(),
                                   "http": cfg.openai.model_dump(), "torch_threads": threads,
                                   "device": "cuda" if gpu else "cpu"},
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=max(pool.min_actors,
                                                                                      pool.max_actors)),
            batch_size=cfg.batch_size, batch_format="pyarrow", **resources)
        branches.append(ds)
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]


# --------------------------------------------------------------------------- driver
def resolve_targets(cfg: LabelConfig) -> list[ModelSpec]:
    """Registry entries of the targets to label (clear errors for unknown or encoder-only names)."""
    from shared.registry import load_registry

    registry = load_registry(cfg.registry)
    specs = [registry.target(n) for n in cfg.targets] if cfg.targets is not None else registry.targets()
    if not specs:
        raise BadInput("no targets to label: name some with targets=[...]")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BadInput(f"targets listed twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return specs


def check_paths(cfg: LabelConfig) -> None:
    from pathlib import Path

    if not storage.is_s3(cfg.out) and Path(cfg.out).expanduser().is_file():
        raise BadInput(f"out={cfg.out} is a file; it must be a directory (or a new path)")
    if not storage.exists(cfg.queries):
        raise MissingInput(f"query table {cfg.queries} not found; build it with `prefill-router data build`")


def plan_target(spec: ModelSpec, table: pa.Table, qhash: str, cfg: LabelConfig) -> tuple[pa.Table, LabelShardWriter]:
    """The rows still to label for one target, and a writer primed with reusable ``ok`` rows."""
    import numpy as np

    tdir = storage.join(cfg.out, spec.name)
    sh.check_manifest(tdir, label_identity(spec, qhash, cfg))
    done = sh.finished_shards(tdir)
    ids = sh.shard_ids(table.num_rows, cfg.shard_size)
    counts = Counter(ids.tolist())
    todo = sorted(set(counts) - done)
    writer = LabelShardWriter(tdir, {s: counts[s] for s in todo})
    idx = sh.pending_rows(table.num_rows, cfg.shard_size, done)
    pending = table.select(INPUT_COLUMNS).take(pa.array(idx, pa.int64()))
    pending = pending.append_column("_shard", pa.array(ids[idx], pa.int64()))
    carried = carried_rows(tdir, todo)
    if carried is not None and carried.num_rows:
        writer.add(carried)
        again = np.isin(pending.column("query_id").to_numpy(zero_copy_only=False),
                        carried.column("query_id").to_numpy(zero_copy_only=False))
        pending = pending.filter(pa.array(~again))
    return by_length_within_shard(pending), writer


def by_length_within_shard(pending: pa.Table) -> pa.Table:
    """Rows ordered by (shard, answer type, prompt length): batches of similar prompts pad less.

    Shards stay contiguous, so each one still completes (and is written) early.
    """
    import numpy as np

    if pending.num_rows == 0:
        return pending
    lengths = [sum(len(m["content"]) for m in msgs) for msgs in pending.column("messages").to_pylist()]
    kinds = pending.column("answer_type").to_pylist()
    order = np.lexsort((np.array(lengths), np.array(kinds), pending.column("_shard").to_numpy()))
    return pending.take(pa.array(order, pa.int64()))


def stream_labels(jobs: dict[str, tuple[ModelSpec, pa.Table]], writers: dict[str, LabelShardWriter],
                  cfg: LabelConfig) -> None:
    """Run the pipeline and hand every result batch to its target's shard writer."""
    import ray

    from shared.progress import Progress
    from shared.ray_boot import cluster_gpus

    ray.data.DataContext.get_current().enable_progress_bars = False
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() > 0
    ds = build_pipeline(jobs, cfg, use_gpu)
    total = sum(pending.num_rows for _, pending in jobs.values())
    failed = 0
    with Progress(total, "labelling", "labels", bar=cfg.progress) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for target in sorted(set(batch.column("target").to_pylist())):
                part = batch.filter(pc.equal(batch.column("target"), target))
                writers[target].add(part)
                failed += part.num_rows - pc.sum(pc.equal(part.column("status"), "ok")).as_py()
                progress.update(part.num_rows, f"{failed} failed")


def finish(cfg: LabelConfig, specs: list[ModelSpec], table: pa.Table, qhash: str) -> dict[str, Any]:
    """Summarise what is on disk, record it in the manifests and ``<out>/summary.json``, print it."""
    from shared.cli_utils import console
    from training.labels import summarise, summary_view
    from training.label.scoring import scorer_versions

    labels = {s.name: read_target(storage.join(cfg.out, s.name)) for s in specs}
    summary = summarise(labels, table.num_rows)
    summary.update({"queries": cfg.queries, "queries_hash": qhash, "query_rows": table.num_rows,
                    "fully_labelled_queries": summary.pop("queries"), "scorers": scorer_versions(),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for spec in specs:
        sh.update_manifest(storage.join(cfg.out, spec.name), summary=summary["targets"][spec.name],
                           scorers=summary["scorers"])
    storage.write_json(storage.join(cfg.out, "summary.json"), summary)
    console.print(summary_view({**summary, "queries": summary["fully_labelled_queries"]},
                               f"labels {cfg.out} ({table.num_rows} queries, table {qhash})"))
    return summary


def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Label every pending (query, target); returns the summary of everything on disk."""
    from shared.models import ensure_local
    from training.queries import table_hash

    check_paths(cfg)
    specs = resolve_targets(cfg)
    table = select_queries(storage.read_parquet(cfg.queries), cfg.splits, cfg.limit)
    unscorable = sum(1 for r in table.column("reference").to_pylist() if not r)
    if unscorable:
        raise BadInput(f"{unscorable} of {table.num_rows} queries in {cfg.queries} have no reference answer, so no "
                         "answer can be scored: an imported table (`data import`) comes with its labels; use them "
                         "(the pipeline's data_import stage, or `labels:`) instead of labelling")
    qhash = table_hash(table)
    for spec in specs:  # missing weights fail here, once, with the loader's message
        if not is_remote(spec.backend):
            ensure_local(spec)
    plans = {s.name: (s, *plan_target(s, table, qhash, cfg)) for s in specs}
    jobs = {name: (spec, pending) for name, (spec, pending, _) in plans.items() if pending.num_rows}
    writers = {name: writer for name, (_, _, writer) in plans.items()}
    log.info("to label: %s", {name: pending.num_rows for name, (_, pending) in jobs.items()} or "nothing")
    if jobs:
        started = ensure_ray(cfg.ray_address, log_to_driver=False)
        try:
            stream_labels(jobs, writers, cfg)
        finally:
            if started:
                import ray

                ray.shutdown()
    lost = {name: w.incomplete for name, w in writers.items() if w.incomplete}
    if lost:
        log.warning("shards missing rows after the run (they will be redone): %s", lost)
    return finish(cfg, specs, table, qhash)


# --------------------------------------------------------------------------- CLI
def _run_command(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Label every target's correctness per query; re-run to resume or retry failures."""
    import typer

    from shared.cli_utils import err_console
    from shared.config import load_config

    summary = run_label(load_config(LabelConfig, config, overrides or []))
    failed = {t: s["failed"] + s["missing"] for t, s in summary["targets"].items() if s["failed"] + s["missing"]}
    if failed:
        err_console.print(f"[yellow]unfinished rows per target: {failed}; re-run the same command to retry them[/]")
        raise typer.Exit(code=1)


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_cli
    from training.label.judge_run import judge_command

    return run_cli("prefill-router label", argv, {"run": _run_command, "judge": judge_command},
                   "Correctness labels per (query, target); an LLM judge's scores of logged answers.")


if __name__ == "__main__":
    raise SystemExit(main())
