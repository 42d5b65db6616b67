"""``prefill-router label judge``: an LLM judges the decision log's answers (Ray Data).

The window's answered ``chat`` decisions whose prompt and response the log kept are cut into
shards (:func:`training.label.judge.plan_shards`); the judge (a registry target, loaded once
per actor of a Ray Data ``ActorPoolStrategy`` pool, as ``label run`` does) reads each one
through the config's template. The driver writes a shard once all its verdicts are back, as
one whole feedback part of the log (``<log>/feedback/<day>/part-...-judge-<identity>-...``):
a :class:`~shared.decision_log.FeedbackRecord` per parsed verdict, ``source`` =
``judge:<judge>``, the verdict's text as ``comment`` and its USD ``cost``, so ``data import
format=decision-log`` reads them as it reads any judge's scores. A rerun skips the shards
whose part exists; a killed run loses no written shard.

An unparsable verdict gives no row (a missing label, never a 0): it is counted, and kept with
its text in ``<log>/judge/<identity>/unparsable/``. A judge call that failed (an endpoint
down after its retries, a batch that raised) keeps its shard unwritten: the shard's other
results wait in ``<log>/judge/<identity>/failed/`` and a rerun asks again only for the failed
ones. ``<log>/judge/<identity>/`` also holds ``identity.json`` and the last ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shared import storage
from shared.backends import Completion, is_remote
from shared.cli_utils import ConfigOption, Overrides
from shared.decision_log import DECISIONS, FEEDBACK, FeedbackRecord, logged_messages, read_log
from shared.errors import MissingInput
from shared.ray_boot import ensure_ray
from shared.registry import ModelSpec
from training import shards as sh
from training.label.judge import (JudgeConfig, digest, judge_chat, judge_identity, plan_shards, shard_part_uri,
                                  side_dir, verdict_score)

log = logging.getLogger(__name__)
ROW_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("status", pa.string()), ("score", pa.float64()), ("verdict", pa.string()),
    ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("cost", pa.float64()), ("latency_s", pa.float64()),
    ("error", pa.string()),
])
UDF_SCHEMA = ROW_SCHEMA.append(pa.field("_shard", pa.int64()))
SAMPLE = 5  # unparsable verdicts shown in the summary


# --------------------------------------------------------------------------- one batch
def verdict_row(spec: ModelSpec, cfg: JudgeConfig, row: dict[str, Any], answer: Completion,
                per_row: float) -> dict[str, Any]:
    """One decision's result: ``ok`` (a score), ``unparsable`` (no score, never a 0) or ``failed`` (no verdict)."""
    latency = per_row if answer.latency_s is None else answer.latency_s
    out = {"request_id": row["request_id"], "verdict": answer.text, "input_tokens": answer.input_tokens,
           "output_tokens": answer.output_tokens, "latency_s": latency, "error": None, "_shard": row["_shard"]}
    if answer.error is not None:
        return {**out, "status": "failed", "score": None, "cost": None, "error": answer.error[:2000]}
    score = verdict_score(answer.text, cfg)
    cost = spec.cost(answer.input_tokens or 0, answer.output_tokens or 0)
    return {**out, "status": "unparsable" if score is None else "ok", "score": score, "cost": cost}


def judge_rows(spec: ModelSpec, backend: Any, cfg: JudgeConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The judge's verdicts on logged rows (``request_id``, ``messages``, ``response``, ``_shard``)."""
    chats = [judge_chat(cfg, logged_messages(r["messages"]), r["response"]) for r in rows]
    start = time.perf_counter()
    try:
        answers = backend.complete(chats, cfg.max_new_tokens)
    except Exception as exc:  # noqa: BLE001 - a bad batch becomes failed rows, not a dead job
        log.exception("judge %s: batch of %d failed", spec.name, len(rows))
        answers = [Completion(None, None, None, None, f"{type(exc).__name__}: {exc}")] * len(rows)
    per_row = (time.perf_counter() - start) / max(1, len(rows))
    return [verdict_row(spec, cfg, row, answer, per_row) for row, answer in zip(rows, answers)]


class JudgeUDF:
    """The Ray Data actor: the judge loaded once, judging blocks of logged rows."""

    def __init__(self, spec: dict, cfg: dict, torch_threads: int | None, device: str | None):
        from training.label.backends import label_backend

        self.spec, self.cfg = ModelSpec.model_validate(spec), JudgeConfig.model_validate(cfg)
        self.backend = label_backend(self.spec, self.cfg.openai, torch_threads=torch_threads, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(judge_rows(self.spec, self.backend, self.cfg, batch.to_pylist()), schema=UDF_SCHEMA)


# --------------------------------------------------------------------------- shards
class JudgeShardWriter(sh.ShardWriter):
    """Writes a finished shard as one feedback part of the log (a shard with a failed call: to the side folder)."""

    def __init__(self, cfg: JudgeConfig, side: str, parts: dict[int, str]):
        super().__init__(side, {}, key="request_id")
        self.cfg, self.parts = cfg, parts
        self.failed: list[int] = []
        self.counts: Counter = Counter()
        self.sample: list[dict[str, Any]] = []

    def _write(self, shard: int) -> None:
        rows = sorted(self.buffers.pop(shard, {}).values(), key=lambda r: r["request_id"])
        failed_uri = sh.shard_path(storage.join(self.out, "failed"), shard)
        if any(r["status"] == "failed" for r in rows):
            storage.write_parquet(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), failed_uri)
            self.failed.append(shard)
            return
        now, part = time.time(), self.parts[shard]
        verdicts = [FeedbackRecord(request_id=r["request_id"], time=now, score=r["score"], source=self.cfg.source,
                                   comment=r["verdict"], cost=r["cost"]) for r in rows if r["status"] == "ok"]
        unparsable = [r for r in rows if r["status"] == "unparsable"]
        if unparsable:  # before the part: the part marks the shard done
            side = storage.join(self.out, "unparsable", part.rsplit("/", 1)[-1])
            storage.write_parquet(pa.Table.from_pylist(unparsable, schema=ROW_SCHEMA), side)
        storage.write_parquet(FeedbackRecord.table(verdicts), part)
        storage.delete(failed_uri)
        self.written.append(shard)
        self.counts.update(judged=len(verdicts), unparsable=len(unparsable))
        room = max(0, SAMPLE - len(self.sample))
        self.sample += [{"request_id": r["request_id"], "verdict": r["verdict"]} for r in unparsable[:room]]

    def write_empty(self) -> None:
        """Write the shards with nothing left to judge (every decision already scored)."""
        for shard in [s for s, n in self.expected.items() if n == 0]:
            self._write(shard)


def carried_rows(side: str, shard: int, members: set[str]) -> list[dict[str, Any]]:
    """The verdicts (parsed or not) of an earlier try of ``shard`` that had a failed call."""
    uri = sh.shard_path(storage.join(side, "failed"), shard)
    if not storage.exists(uri):
        return []
    rows = storage.read_parquet(uri).cast(ROW_SCHEMA).to_pylist()
    return [{**r, "_shard": shard} for r in rows if r["status"] != "failed" and r["request_id"] in members]


def scored_requests(cfg: JudgeConfig) -> set[str]:
    """Request ids this judge (``skip_scored``; any template) or a user (``skip_user_scored``) already scored."""
    sources = [s for s, skip in ((cfg.source, cfg.skip_scored), ("user", cfg.skip_user_scored)) if skip]
    feedback = read_log(cfg.log, FEEDBACK, cfg.since)
    mine = feedback.filter(pc.is_in(feedback.column("source"), pa.array(sources, pa.string())))
    return set(mine.column("request_id").to_pylist())


def plan_run(cfg: JudgeConfig, shards: list[list[dict[str, Any]]], side: str,
             id_hash: str) -> tuple[pa.Table, JudgeShardWriter, dict[str, int]]:
    """The rows still to judge, a writer primed with the carried verdicts, and the counts of shards and skips."""
    parts = {i: shard_part_uri(cfg.log, id_hash, i, members) for i, members in enumerate(shards)}
    done = {i for i, uri in parts.items() if storage.exists(uri)}
    skip = cfg.skip_scored or cfg.skip_user_scored
    scored = scored_requests(cfg) if skip and len(done) < len(parts) else set()
    writer, pending, already = JudgeShardWriter(cfg, side, parts), [], 0
    for i in sorted(set(parts) - done):
        carried = carried_rows(side, i, {m["request_id"] for m in shards[i]})
        have = {r["request_id"] for r in carried}
        fresh = [m for m in shards[i] if m["request_id"] not in have and m["request_id"] not in scored]
        already += len(shards[i]) - len(have) - len(fresh)
        writer.expected[i] = len(carried) + len(fresh)
        pending += [{"request_id": m["request_id"], "messages": m["messages"], "response": m["response"],
                     "_shard": i} for m in fresh]
        if carried:
            writer.add(pa.Table.from_pylist(carried, schema=UDF_SCHEMA))
    writer.write_empty()
    schema = pa.schema([("request_id", pa.string()), ("messages", pa.string()), ("response", pa.string()),
                        ("_shard", pa.int64())])
    return pa.Table.from_pylist(pending, schema=schema), writer, {"skipped": len(done), "already scored": already}


# --------------------------------------------------------------------------- Ray wiring
def stream_verdicts(spec: ModelSpec, pending: pa.Table, writer: JudgeShardWriter, cfg: JudgeConfig) -> Counter:
    """Judge the pending rows on an actor pool; every result batch goes to the writer. Returns the
    calls made, the failed ones and their cost."""
    import ray

    from shared.progress import Progress
    from shared.ray_boot import cluster_gpus

    ray.data.DataContext.get_current().enable_progress_bars = False
    gpu = not is_remote(spec.backend) and (cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() > 0)
    pool = cfg.pool_for(spec)
    blocks = [pending.slice(i, cfg.batch_size) for i in range(0, pending.num_rows, cfg.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        JudgeUDF, fn_constructor_kwargs={
            "spec": spec.model_dump(mode="json"), "cfg": cfg.model_dump(mode="json"),
            "device": "cuda" if gpu else "cpu",
            "torch_threads": None if gpu else (pool.torch_threads or max(1, int(pool.num_cpus)))},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=max(pool.min_actors, pool.max_actors)),
        batch_size=cfg.batch_size, batch_format="pyarrow",
        **({"num_gpus": pool.num_gpus} if gpu else {"num_cpus": pool.num_cpus}))
    spent: Counter = Counter()
    with Progress(pending.num_rows, "judging", "verdicts", bar=cfg.progress) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
            spent["calls"] += batch.num_rows
            spent["failed"] += pc.sum(pc.equal(batch.column("status"), "failed")).as_py() or 0
            spent["cost_usd"] += pc.sum(batch.column("cost")).as_py() or 0.0
            progress.update(batch.num_rows, f"{spent['failed']} failed")
    return spent


# --------------------------------------------------------------------------- driver
def load_window(cfg: JudgeConfig) -> pa.Table:
    if not storage.exists(storage.join(cfg.log, DECISIONS)):
        raise MissingInput(f"{cfg.log}: no decision log here (no {DECISIONS}/ folder)")
    return read_log(cfg.log, DECISIONS, cfg.since, cfg.until)


def run_judge(cfg: JudgeConfig) -> dict[str, Any]:
    """Judge every pending logged answer of the window; returns (and prints) the run's summary."""
    from shared.models import ensure_local
    from shared.registry import load_registry

    started_at = time.perf_counter()
    spec = load_registry(cfg.registry).target(cfg.judge)
    decisions = load_window(cfg)
    shards, skipped = plan_shards(decisions, cfg.shard_size)
    identity = judge_identity(spec, cfg)
    id_hash = digest(identity)
    side = side_dir(cfg.log, id_hash)
    storage.write_json(storage.join(side, "identity.json"), {"identity": identity, "hash": id_hash})
    pending, writer, planned = plan_run(cfg, shards, side, id_hash)
    spent: Counter = Counter()
    if pending.num_rows:
        if not is_remote(spec.backend):
            ensure_local(spec)  # missing weights fail here, once, with the loader's message
        started = ensure_ray(cfg.ray_address, log_to_driver=False)
        try:
            spent = stream_verdicts(spec, pending, writer, cfg)
        finally:
            if started:
                import ray

                ray.shutdown()
    summary = {
        "log": cfg.log, "judge": cfg.judge, "source": cfg.source, "identity": id_hash, "since": cfg.since,
        "until": cfg.until, "decisions": decisions.num_rows, "eligible": sum(len(s) for s in shards),
        "judged": writer.counts["judged"], "unparsable": writer.counts["unparsable"], "calls": spent["calls"],
        "failed": spent["failed"], "skipped": {**skipped, "already scored": planned["already scored"]},
        "shards": {"total": len(shards), "written": len(writer.written), "skipped": planned["skipped"],
                   "unfinished": len(writer.failed) + len(writer.incomplete)},
        "cost_usd": spent["cost_usd"], "unparsable_sample": writer.sample[:SAMPLE], "side_files": side,
        "seconds": round(time.perf_counter() - started_at, 2)}
    storage.write_json(storage.join(side, "summary.json"), summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from shared.cli_utils import console

    table = Table(title=f"judge {summary['judge']} on {summary['log']} ({summary['identity']})")
    table.add_column("")
    table.add_column("value", overflow="fold")
    for key in ("decisions", "eligible", "judged", "unparsable", "calls", "failed", "skipped", "shards"):
        table.add_row(key, str(summary[key]))
    table.add_row("cost (USD)", f"{summary['cost_usd']:.6f}")
    table.add_row("seconds", str(summary["seconds"]))
    console.print(table)


def judge_command(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Judge the decision log's answers with an LLM; verdicts become feedback rows. Re-run to resume."""
    import typer

    from shared.cli_utils import err_console
    from shared.config import load_config

    summary = run_judge(load_config(JudgeConfig, config, overrides or []))
    if summary["shards"]["unfinished"]:
        err_console.print(f"[yellow]{summary['shards']['unfinished']} shard(s) unfinished ({summary['failed']} failed "
                          "judge calls); re-run the same command to retry them[/]")
        raise typer.Exit(code=1)
