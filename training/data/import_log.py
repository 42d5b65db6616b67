"""``format=decision-log``: the Serve app's decision log and its feedback as a query table and labels.

``inputs`` names one log or several (``shared.decision_log``: ``<uri>/decisions/`` and
``<uri>/feedback/`` Parquet parts, local or ``s3://``), read with
:func:`shared.decision_log.read_log` and joined together (feedback in one log may score a
decision of another).

- Decisions: those logged at ``since <= time < until`` (config; unset: the whole log), at most
  ``limit`` per log. A ``chat`` request answered with status 200 by a target, or a ``route``
  decision (a decision service: the client called the target it named, and its feedback scores
  that target's answer), whose ``messages`` the log kept, is a query: its messages as logged, the
  task ``default_task``, and its ``meta.source_ids`` the request ids. The same messages twice are
  one query (counted in ``merged``, as the other formats merge repeated prompts). Other decisions
  are skipped and counted by reason: ``status not 200``, ``no target``, ``no prompt kept``,
  an unreadable ``messages``, ``target not in targets`` (where ``targets`` is set) and a
  ``duplicate request id`` (the first is kept).
- Labels: feedback logged from ``since`` on (a score comes after its answer, so none before can
  match; one after ``until`` still counts) is joined to the decisions by ``request_id``. A
  decision's label is the mean score of the first entry of ``label_sources`` that scored it: by
  default ``[user, judge]``, the users' scores (``POST /v1/feedback``) and, only where there are
  none, the judges' (``judge``: every source but ``user``; a judge's own name picks that judge).
  A labelled decision is one observed (query, target) cell; the cells of one (query, target) are
  averaged. A decision without a label gives no cell: the target's row for that query stays
  ``missing`` (masked downstream), never a 0.
- Cost: the decision's ``expected_cost`` of the target that answered (the router's estimate when
  it decided; where the row has none, e.g. a pinned request, the registry's prices of the logged
  token counts). Tokens: the logged ``prompt_tokens``/``completion_tokens`` (estimated from the
  text where absent); answer: the logged ``response``.
- Propensity: P(target | decision) of each labelled cell (the mean over its decisions; null for
  pinned or degraded ones) goes to ``<labels>/<target>/propensity.parquet``
  (``importer.PROPENSITY_SCHEMA``, one row per labelled cell), for inverse-propensity weighting:
  the label shards' schema (``training.labels.LABEL_SCHEMA``) has no column for it.
- Counts, in the report's and the import manifest's ``decision_log``: decisions read, labelled,
  unlabelled (masked) and skipped (per reason); feedback rows, used, unmatched (no decision of
  that request id in the window: the API accepts any id when the score is posted), on skipped
  decisions, passed over by ``label_sources``, with a bad score; labelled cells per target.

The import manifest's files are the logs, each with a sha256 of the records read from it, so an
existing label folder refuses a log that has grown since (use a new ``labels`` folder).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared import storage
from shared.decision_log import DECISIONS, FEEDBACK, per_target, read_log
from shared.errors import MissingInput
from training.data.import_formats import ImportFormat
from training.data.import_sources import blank, messages_of, number
from training.queries import BadRecord


@dataclass
class Join:
    """The feedback of the decisions read (request id -> [(source, score)]) and what joining them counted."""

    scored: dict[str, list[tuple[str, float]]]
    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)


def read_one(uri: str, cfg: Any) -> tuple[pa.Table, pa.Table]:
    """One log's decisions in the window (the first ``limit``) and its feedback from ``since`` on."""
    if not storage.exists(storage.join(uri, DECISIONS)):
        raise MissingInput(f"{uri}: no decision log here (no {DECISIONS}/ folder)")
    decisions = read_log(uri, DECISIONS, cfg.since, cfg.until)
    return decisions.slice(0, cfg.limit) if cfg.limit else decisions, read_log(uri, FEEDBACK, cfg.since)


def digest(*tables: pa.Table) -> str:
    """sha256 of the tables' records (Arrow IPC of each, one chunk): what the import manifest keeps per log."""
    h = hashlib.sha256()
    for table in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        h.update(sink.getvalue())
    return h.hexdigest()


def join_feedback(feedback: pa.Table, decisions: pa.Table) -> Join:
    """Feedback scores per request id of a decision read; counts the unmatched rows and the bad scores."""
    known = set(decisions.column("request_id").to_pylist())
    join = Join(scored={})
    cols = (feedback.column(c).to_pylist() for c in ("request_id", "score", "source"))
    for rid, score, source in zip(*cols):
        if rid not in known:
            join.counts["feedback unmatched"] += 1
            continue
        try:
            value = number(score, "score", 1.0)
        except BadRecord:
            value = None
        if value is None:
            join.counts["feedback with a bad score (ignored)"] += 1
            continue
        join.scored.setdefault(rid, []).append((source or "user", value))
    return join


def label_of(scores: list[tuple[str, float]], order: list[str]) -> tuple[float | None, int]:
    """The mean score of the first ``order`` entry (``user``, ``judge`` or a source's name) among ``scores``,
    and how many scores it took; ``(None, 0)`` when no entry scored."""
    for entry in order:
        picked = [v for source, v in scores if source == entry or (entry == "judge" and source != "user")]
        if picked:
            return sum(picked) / len(picked), len(picked)
    return None, 0


def prompt_of(rec: dict[str, Any], targets: list[str] | None, repeat: bool) -> list[dict[str, str]]:
    """The messages of a decision that makes a query; :class:`BadRecord` with the reason it does not."""
    if repeat:
        raise BadRecord("duplicate request id (first kept)")
    if rec["endpoint"] not in ("chat", "route"):
        raise BadRecord(f"{rec['endpoint']} endpoint")
    if rec["status"] != 200:
        raise BadRecord("status not 200")
    if blank(rec["target"]):
        raise BadRecord("no target")
    if targets is not None and rec["target"] not in targets:
        raise BadRecord("target not in targets")
    if blank(rec["messages"]):
        raise BadRecord("no prompt kept")
    return messages_of(rec["messages"])


def read_decisions(uri: str, decisions: pa.Table, join: Join, col: Any) -> None:
    """Add one log's decisions to the importer's Collector: a query each, a cell each labelled one."""
    cfg, counts = col.cfg, join.counts
    for rec in (r for batch in decisions.to_batches() for r in batch.to_pylist()):
        rid = rec["request_id"]
        scores = join.scored.pop(rid, [])  # a repeated request id: its feedback went to the first
        repeat = rid in join.seen
        join.seen.add(rid)
        try:
            messages = prompt_of(rec, cfg.targets, repeat)
        except BadRecord as exc:
            join.skipped[str(exc)] += 1
            counts["feedback on skipped decisions"] += len(scores)
            col.skip(Path(uri), str(exc), f"request {rid}", quiet=True)  # a log may keep no prompt at all
            continue
        target = col.target(rec["target"])
        before = len(col.queries)
        q = col.query(messages, cfg.default_task, rid)
        col.merged["duplicate prompts merged"] += len(col.queries) == before
        label, used = label_of(scores, cfg.label_sources)
        counts["feedback used"] += used
        counts["feedback passed over (label_sources)"] += len(scores) - used
        if label is None:
            counts["decisions unlabelled (masked)"] += 1
            continue
        counts["decisions labelled"] += 1
        tokens = (rec["prompt_tokens"], rec["completion_tokens"])
        col.observe(q, target, label, per_target(rec["expected_cost"]).get(rec["target"]), rec["response"],
                    None if None in tokens else tokens, rec["propensity"])


class DecisionLog(ImportFormat):
    """The Serve app's decision log with its feedback and judge scores (see the module's docstring)."""

    name = "decision-log"
    extensions = ()  # inputs are logs (folders or prefixes), not files
    source = "decision-log"
    keeps_propensity = True

    @classmethod
    def collect(cls, col: Any) -> list[dict[str, Any]]:
        logs = {uri: read_one(uri, col.cfg) for uri in dict.fromkeys(col.cfg.inputs)}
        decisions = pa.concat_tables([d for d, _ in logs.values()])
        feedback = pa.concat_tables([f for _, f in logs.values()])
        join = join_feedback(feedback, decisions)
        for uri, (part, _) in logs.items():
            read_decisions(uri, part, join, col)
        col.counts.update({
            "decisions read": decisions.num_rows, "feedback rows": feedback.num_rows,
            **{k: join.counts[k] for k in ("decisions labelled", "decisions unlabelled (masked)", "feedback used",
                                           "feedback unmatched", "feedback on skipped decisions",
                                           "feedback passed over (label_sources)")},
            **dict(join.counts), "decisions skipped": dict(join.skipped),
            "labelled cells": {t: sum(bool(q.obs.get(t)) for q in col.queries.values()) for t in col.specs}})
        return [{"path": uri, "sha256": digest(d, f), "rows_read": d.num_rows, "feedback_rows": f.num_rows}
                for uri, (d, f) in logs.items()]
