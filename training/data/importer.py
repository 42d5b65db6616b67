"""``prefill-router data import``: a query table and label folders from published benchmark data.

Writes what ``data build`` and ``label run`` write, so capture, probe, tune, fit, evaluate
and pipeline run on it unchanged: the query table (:data:`QUERY_SCHEMA`; ``source`` =
``routerbench`` or ``import``, ``task`` = the task family, one group per normalised prompt,
``split`` by :func:`assign_split`) and its ``.report.json``; per target
``<labels>/<target>/shard-XXXXX.parquet`` (``LABEL_SCHEMA``, ``shard_size`` table rows each)
and ``manifest.json`` (identity and ``summary``); ``<labels>/summary.json``; and
``<labels>/import-manifest.json`` (every source file with its sha256, and the counts).

Formats (one class each in :mod:`training.data.import_formats`): the RouterBench column
scheme (CSV, or the published pickled DataFrame, read only with ``trust_pickle: true`` since
unpickling runs code from the file), a long format (Parquet, CSV or JSONL; one row per
prompt x model), RouterDC's JSON lists and the Serve app's decision log (whose label folders
also get ``<target>/propensity.parquet``: :data:`PROPENSITY_SCHEMA`). :class:`Collector` merges
their rows into queries. Queries are keyed on the prompt text;
duplicates are merged (mean correctness, cost and tokens) and counted. An empty
correctness cell is a ``status="missing"`` row (NaN downstream), never a wrong answer. The
sources hold no reference answers, so ``label run`` cannot score these queries; token
counts a source lacks are estimated from the text (``chars_per_token``).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared import storage
from shared.errors import BadInput
from training.data.import_config import ImportConfig
from training.data.import_formats import get_format
from training.data.import_sources import number
from training.labels import PROPENSITY_FILE, PROPENSITY_SCHEMA
from training.queries import (QUERY_SCHEMA, BadRecord, BuildReport, assign_split, normalise, split_counts, stable_hash,
                              table_hash)
from training.semantic_text import prompt_text


# --------------------------------------------------------------------------- collecting
@dataclass
class Obs:
    """One observation of a (query, target): a RouterBench cell or a long-format row."""

    correct: float | None
    cost: float
    input_tokens: int
    output_tokens: int
    answer: str | None
    propensity: float | None = None  # decision-log: P(this target | the router's decision)


@dataclass
class Query:
    """A query being built: its row (without split and meta), source ids, observations per target."""

    row: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    obs: dict[str, list[Obs]] = field(default_factory=dict)


class Collector:
    """Merges source rows into queries keyed on the prompt text; counts what it merged or skipped."""

    def __init__(self, cfg: ImportConfig, registry: Any):
        self.cfg, self.registry, self.source = cfg, registry, get_format(cfg.format).source
        self.queries: dict[str, Query] = {}
        self.specs: dict[str, Any] = {}          # registry name -> ModelSpec
        self.labels: dict[str, Counter] = {}     # registry name -> cell counts
        self.merged: Counter = Counter()
        self.counts: dict[str, Any] = {}         # a format's own counts: the report's entry named by the format
        self.report = BuildReport()

    def target(self, model: str) -> str:
        """The registry name of a source model; an unknown name is an error saying how to fix it."""
        name = self.cfg.names.get(model, model)
        if name not in self.specs:
            try:
                self.specs[name] = self.registry.get(name)
            except KeyError as exc:
                raise BadInput(f"model {model!r} (registry name {name!r}) is not in the registry: add it there "
                                 f"or map it with model_names ({exc.args[0]})") from None
            self.labels[name] = Counter()
        return name

    def query(self, messages: list[dict[str, str]], task: str, source_id: str | None) -> Query:
        """The query of these messages, created on first sight (a repeat keeps the first task)."""
        qid = stable_hash(self.source, messages)
        q = self.queries.get(qid)
        if q is None:
            text = prompt_text(messages)
            q = self.queries[qid] = Query(row={
                "query_id": qid, "source": self.source, "task": task, "messages": messages, "reference": "",
                "answer_type": self.cfg.answer_types.get(task, "exact"), "choices": [],
                "group_id": stable_hash(self.source, normalise(text))})
        elif q.row["task"] != task:
            self.merged["task conflicts (first task kept)"] += 1
        if source_id is not None and source_id not in q.ids:
            q.ids.append(source_id)
        return q

    def observe(self, q: Query, target: str, correct: Any, cost: Any, answer: str | None,
                tokens: tuple[float, float] | None = None, propensity: float | None = None) -> None:
        """Record one (query, target) cell; never raises: bad cells are counted and kept as missing."""
        counts = self.labels[target]
        try:
            value = number(correct, "correctness", 1.0)
            counts["empty correctness cells" if value is None else "labelled cells"] += 1
        except BadRecord as exc:
            value = None
            counts[f"bad correctness cells, kept as missing ({exc})"] += 1
        per_char = 1.0 / self.cfg.chars_per_token
        prompt = sum(len(m["content"]) for m in q.row["messages"])
        n_in, n_out = tokens or (math.ceil(prompt * per_char), math.ceil(len(answer or "") * per_char))
        try:
            usd = number(cost, "cost")
        except BadRecord as exc:
            usd = None
            counts[f"bad cost cells ({exc})"] += 1
        if usd is None:
            usd = self.specs[target].cost(n_in, n_out)
            counts["costs from registry prices"] += 1
        if q.obs.get(target):
            self.merged[f"duplicate labels of {target}"] += 1
        q.obs.setdefault(target, []).append(Obs(value, usd, int(n_in), int(n_out), answer, propensity))

    def skip(self, path: Path, reason: str, detail: Any, quiet: bool = False) -> None:
        """Count a skipped row; ``quiet``: after the first of its reason, only counted (no log line, no example)."""
        key = f"{self.source}: {reason}"
        if quiet and self.report.skipped[key]:
            self.report.skipped[key] += 1
            return
        self.report.skip(self.source, reason, f"{path.name}: {str(detail)[:200]}")



# --------------------------------------------------------------------------- tables


def query_table(col: Collector) -> pa.Table:
    """The query table: queries in first-seen order, each split by a seeded hash of its group."""
    rows = [{**q.row, "split": assign_split(q.row["group_id"], col.cfg.seed, col.cfg.splits),
             "meta": json.dumps({"source_ids": q.ids}, sort_keys=True)} for q in col.queries.values()]
    if not rows:
        raise BadInput("no query could be imported (see the skipped rows)")
    return pa.Table.from_pylist(rows, schema=QUERY_SCHEMA)


def merge(obs: list[Obs]) -> dict[str, Any]:
    """One label row's fields from a (query, target)'s observations: means over the labelled ones."""
    if not obs:
        return {"status": "missing", "error": "no row for this prompt and model in the source"}
    known = [o for o in obs if o.correct is not None] or obs
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    kept = [o.propensity for o in known if o.propensity is not None]
    out = {"answer": next((o.answer for o in known if o.answer), None), "cost": mean([o.cost for o in known]),
           "input_tokens": round(mean([o.input_tokens for o in known])),
           "output_tokens": round(mean([o.output_tokens for o in known])),
           "propensity": mean(kept) if kept else None, "observations": len(known)}
    if known[0].correct is None:
        return {**out, "status": "missing", "error": "empty correctness cell in the source"}
    return {**out, "status": "ok", "error": None, "correct": mean([o.correct for o in known])}


def label_rows(col: Collector, table: pa.Table, target: str) -> list[dict[str, Any]]:
    """One target's label rows: one per query, in query-table order (``LABEL_SCHEMA``'s fields, and
    ``propensity`` and ``observations`` for :func:`propensity_table`)."""
    rows = []
    for qid, split in zip(table.column("query_id").to_pylist(), table.column("split").to_pylist()):
        obs = col.queries[qid].obs.get(target, [])
        col.labels[target]["conflicting duplicate labels (averaged)"] += len({o.correct for o in obs} - {None}) > 1
        rows.append({"query_id": qid, "split": split, "target": target, "latency_s": None, **merge(obs)})
    return rows


def propensity_table(rows: list[dict[str, Any]]) -> pa.Table:
    """:data:`PROPENSITY_SCHEMA` rows of a target's labelled cells (``status == "ok"``), from :func:`label_rows`."""
    return pa.Table.from_pylist([{**r, "decisions": r["observations"]} for r in rows if r["status"] == "ok"],
                                schema=PROPENSITY_SCHEMA)


def write_target(cfg: ImportConfig, target: str, labels: pa.Table) -> None:
    """``<labels>/<target>/shard-XXXXX.parquet``: ``shard_size`` table rows each, sorted by query id (as label run)."""
    from training.shards import shard_path

    for shard, start in enumerate(range(0, labels.num_rows, cfg.shard_size)):
        part = labels.slice(start, cfg.shard_size)
        order = sorted(range(part.num_rows), key=part.column("query_id").to_pylist().__getitem__)
        storage.write_parquet(part.take(pa.array(order, pa.int64())), shard_path(storage.join(cfg.labels, target),
                                                                                   shard))


def summarise_labels(labels: dict[str, pa.Table], rows: int) -> dict[str, Any]:
    """label run's summary, plus mean input tokens; rows the source left unlabelled count as missing."""
    import pyarrow.compute as pc

    from training.labels import summarise

    summary = summarise(labels, rows)
    for target, table in labels.items():
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        gone = table.num_rows - ok.num_rows
        stats = summary["targets"][target]
        stats.update(failed=stats["failed"] - gone, missing=stats["missing"] + gone,
                     mean_input_tokens=pc.mean(ok.column("input_tokens")).as_py(),
                     mean_latency_s=None)  # the sources record no latency (None: JSON has no NaN)
    return summary


def merge_effect(col: Collector) -> dict[str, Any]:
    """Per task with repeated prompts: how merging them moves each target's mean score.

    A source may list one prompt several times (RouterDC counts each row); the query table keeps
    one query with the mean of its rows' labels. Per task and target: ``rows`` mean = the mean over
    every labelled row, ``merged`` mean = the mean over queries of their rows' mean; reported is
    the largest ``|rows - merged|`` over targets, with both row and query counts.
    """
    out: dict[str, Any] = {}
    for task in sorted({q.row["task"] for q in col.queries.values()}):
        qs = [q for q in col.queries.values() if q.row["task"] == task]
        rows = sum(max((len(o) for o in q.obs.values()), default=1) for q in qs)
        if rows == len(qs):
            continue
        shift, worst = 0.0, None
        for target in col.specs:
            cells = [[o.correct for o in q.obs.get(target, []) if o.correct is not None] for q in qs]
            cells = [c for c in cells if c]
            if not cells:
                continue
            by_row = sum(map(sum, cells)) / sum(map(len, cells))
            by_query = sum(sum(c) / len(c) for c in cells) / len(cells)
            if abs(by_row - by_query) >= shift:
                shift, worst = abs(by_row - by_query), target
        out[task] = {"rows": rows, "queries": len(qs), "merged_rows": rows - len(qs),
                     "largest_mean_shift": shift, "target": worst}
    return out


# --------------------------------------------------------------------------- driver
def collect(cfg: ImportConfig) -> tuple[Collector, list[dict[str, Any]]]:
    """Read every input into a :class:`Collector`; returns it and each source's path, sha256 and rows read."""
    from shared.registry import load_registry

    col = Collector(cfg, load_registry(cfg.registry))
    sources = get_format(cfg.format).collect(col)
    absent = [t for t in cfg.targets or [] if cfg.names.get(t, t) not in col.specs]
    if absent:
        raise BadInput(f"targets {absent} have no rows in {[s['path'] for s in sources]}")
    return col, sources


def run_import(cfg: ImportConfig) -> dict[str, Any]:
    """Import; write the table, its report, the label folders and the import manifest; print a summary."""
    from shared.models import model_fingerprint
    from training import shards as sh
    from training.labels import LABEL_SCHEMA

    col, sources = collect(cfg)
    table = query_table(col)
    qhash = table_hash(table)
    rows = {t: label_rows(col, table, t) for t in col.specs}
    labels = {t: pa.Table.from_pylist(r, schema=LABEL_SCHEMA) for t, r in rows.items()}
    imported = {"format": cfg.format, "files": [s["sha256"] for s in sources]}
    for t, spec in col.specs.items():  # a label folder made from other inputs is refused before any write
        sh.check_manifest(storage.join(cfg.labels, t), {
            "target": model_fingerprint(spec), "backend": spec.backend, "queries_hash": qhash,
            "shard_size": cfg.shard_size, "imported": imported, "format": 1})
    summary = summarise_labels(labels, table.num_rows)
    storage.write_parquet(table, cfg.output)
    for t, part in labels.items():
        write_target(cfg, t, part)
        if get_format(cfg.format).keeps_propensity:
            storage.write_parquet(propensity_table(rows[t]), storage.join(cfg.labels, t, PROPENSITY_FILE))
        sh.update_manifest(storage.join(cfg.labels, t), summary=summary["targets"][t], scorers={"imported": cfg.format})
    counts = {"rows_read": sum(s["rows_read"] for s in sources), "rows": table.num_rows, "merged": dict(col.merged),
              "merge_effect": merge_effect(col),
              "skipped": dict(col.report.skipped), "cells": {t: dict(c) for t, c in col.labels.items()},
              **({cfg.format.replace("-", "_"): col.counts} if col.counts else {})}
    summary.update({"queries": cfg.output, "queries_hash": qhash, "query_rows": table.num_rows,
                    "fully_labelled_queries": summary.pop("queries"), "scorers": {"imported": cfg.format},
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    storage.write_json(storage.join(cfg.labels, "summary.json"), summary)
    storage.write_json(storage.join(cfg.labels, "import-manifest.json"), {
        **imported, "files": sources, "counts": counts, "queries": cfg.output, "queries_hash": qhash,
        "targets": {t: {"source_name": next((m for m, n in cfg.names.items() if n == t), t), **s}
                    for t, s in summary["targets"].items()}})
    report = {"output": cfg.output, "labels": cfg.labels, "table_hash": qhash, "splits": split_counts(table),
              "config": cfg.model_dump(mode="json"), "sources": sources, **counts,
              "kept": {col.source: table.num_rows}, "examples": col.report.examples}
    storage.write_json(cfg.output.removesuffix(".parquet") + ".report.json", report)
    print_summary(report, summary)
    return {**report, "summary": summary}


def print_summary(report: dict[str, Any], summary: dict[str, Any]) -> None:
    """Rich tables: queries per task and split, then label run's per-target table (accuracy, mean cost)."""
    from rich.table import Table

    from shared.cli_utils import console
    from training.labels import summary_view

    view = Table(title=f"query table {report['output']}: {report['rows']} queries from {report['rows_read']} "
                       f"rows (hash {report['table_hash']})")
    for col in ("family", "train", "val", "test"):
        view.add_column(col, justify="left" if col == "family" else "right")
    for family, counts in report["splits"].items():
        view.add_row(family, *(str(counts.get(s, 0)) for s in ("train", "val", "test")))
    console.print(view)
    console.print(summary_view({**summary, "queries": summary["fully_labelled_queries"]},
                               f"labels {report['labels']} (imported: no latency)"))
    console.print(f"duplicates merged: {report['merged'] or 'none'}", highlight=False)
    for task, e in report["merge_effect"].items():
        console.print(f"  {task}: {e['rows']} rows kept as {e['queries']} queries ({e['merged_rows']} repeated prompts "
                      f"merged, their labels averaged); a target's mean score on the task moves by at most "
                      f"{e['largest_mean_shift']:.4f} ({e['target']}) against counting every row", highlight=False)
    own = report.get(report["config"]["format"].replace("-", "_"))  # a format's own counts
    if own:
        console.print(f"{report['config']['format']}: {own}", highlight=False)
    console.print(f"skipped: {report['skipped'] or 'none'}" + "".join(f"\n  {e}" for e in report["examples"][:5]),
                  highlight=False)

