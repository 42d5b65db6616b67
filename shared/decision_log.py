"""The decision log's format: what the Serve app writes, what training reads back (one owner).

A log lives under one URI (local or ``s3://``)::

    <uri>/decisions/<YYYY-MM-DD>/part-<YYYYMMDDTHHMMSS>-<writer>-<seq>.parquet   # one row per answered request
    <uri>/feedback/<YYYY-MM-DD>/part-<...>.parquet                              # one row per feedback POST

Each part is written whole (atomic on local disk and S3), so a reader never sees half a part.
A decision row is a :class:`DecisionRecord`; a feedback row a :class:`FeedbackRecord`; the
Arrow schemas below are the files' schemas, and :func:`read_log` reads every part of a kind (a
column added since an older part was written reads as nulls there).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from datetime import date, datetime, timezone
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from shared import storage

DECISIONS, FEEDBACK = "decisions", "feedback"
PER_TARGET = pa.map_(pa.string(), pa.float64())


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """sha256 (hex) of the chat messages as canonical JSON: the prompt's key when the text is not kept."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class LogRecord(BaseModel):
    """A row of the log; ``SCHEMA`` is its Arrow schema, field for field."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA: ClassVar[pa.Schema]
    KIND: ClassVar[str]

    @classmethod
    def table(cls, records: list["LogRecord"]) -> pa.Table:
        rows = [r.model_dump() for r in records]
        for row in rows:
            for name, value in row.items():
                if isinstance(cls.SCHEMA.field(name).type, pa.MapType) and value is not None:
                    row[name] = list(value.items())
        return pa.Table.from_pylist(rows, schema=cls.SCHEMA)


class DecisionRecord(LogRecord):
    """One answered request: what was asked, what the router predicted and chose, what came back."""

    KIND: ClassVar[str] = DECISIONS
    SCHEMA: ClassVar[pa.Schema] = pa.schema([
        ("request_id", pa.string()), ("time", pa.float64()), ("endpoint", pa.string()), ("model", pa.string()),
        ("policy", pa.string()), ("policy_param", pa.float64()), ("probabilities", PER_TARGET),
        ("expected_cost", PER_TARGET), ("chosen", pa.string()), ("target", pa.string()),
        ("explored", pa.bool_()), ("propensity", pa.float64()), ("fallback_from", pa.list_(pa.string())),
        ("degraded", pa.string()), ("status", pa.int32()), ("error", pa.string()), ("stream", pa.bool_()),
        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("finish_reason", pa.string()),
        ("latency_s", pa.float64()), ("response", pa.string()), ("prompt_hash", pa.string()),
        ("messages", pa.string()), ("artifact", pa.string()),
    ])

    request_id: str = Field(description="The id returned in the response (`id`) and its `x-prefill-router-request-id` header.")
    time: float = Field(default_factory=time.time, description="Unix time the request was received.")
    endpoint: str = Field(description="`chat` or `route`.")
    model: str = Field(description="The `model` the client asked for (`router`, `router:<tol>` or a target).")
    policy: str | None = Field(None, description="The routing policy used (none for a pinned request).")
    policy_param: float | None = Field(None, description="The policy's parameter (a tolerance, a value in USD).")
    probabilities: dict[str, float] | None = Field(None, description="Predicted P(correct) per target.")
    expected_cost: dict[str, float] | None = Field(None, description="Expected USD cost per target.")
    chosen: str | None = Field(None, description="The target the policy chose (before exploration and fallback).")
    target: str | None = Field(None, description="The target that answered (or, for /v1/route, was named).")
    explored: bool = Field(False, description="Exploration replaced the policy's choice.")
    propensity: float | None = Field(None, description="Probability that this request went to `target` given the "
                                     "decision (1 without exploration); none for pinned or degraded requests.")
    fallback_from: list[str] = Field(default_factory=list, description="Targets that failed before `target`.")
    degraded: str | None = Field(None, description="Why the router was bypassed for `fallback_target`, if it was.")
    status: int = Field(200, description="HTTP status of the answer.")
    error: str | None = Field(None, description="The error's reason when status is not 200.")
    stream: bool = Field(False, description="A streamed answer.")
    prompt_tokens: int | None = Field(None, description="Prompt tokens as the target counted them.")
    completion_tokens: int | None = Field(None, description="Completion tokens of the answer.")
    finish_reason: str | None = Field(None, description="`stop`, `length`, or none for an incomplete stream.")
    latency_s: float | None = Field(None, description="Seconds from receipt to the answer's last byte.")
    response: str | None = Field(None, description="The answer's text.")
    prompt_hash: str = Field(description="sha256 of the messages (shared.decision_log.prompt_hash).")
    messages: str | None = Field(None, description="The chat messages as JSON, only when the log keeps prompts.")
    artifact: str | None = Field(None, description="The router artifact that decided.")


class FeedbackRecord(LogRecord):
    """A client's score of one answer (``POST /v1/feedback``)."""

    KIND: ClassVar[str] = FEEDBACK
    SCHEMA: ClassVar[pa.Schema] = pa.schema([
        ("request_id", pa.string()), ("time", pa.float64()), ("score", pa.float64()), ("source", pa.string()),
        ("comment", pa.string()), ("cost", pa.float64()),
    ])

    request_id: str = Field(description="The answer's `id`.")
    time: float = Field(default_factory=time.time, description="Unix time the feedback arrived.")
    score: float = Field(ge=0, le=1, description="1 right or helpful, 0 wrong; soft values allowed.")
    source: str = Field("user", description="Who scored: `user` (the API) or a judge's name.")
    comment: str | None = Field(None, description="Free text, kept as sent.")
    cost: float | None = Field(None, ge=0, description="USD the score cost: a judge's call at the registry's prices "
                               "(none for a user's score).")


RECORDS: dict[str, type[LogRecord]] = {DECISIONS: DecisionRecord, FEEDBACK: FeedbackRecord}


def part_uri(uri: str, kind: str, when: float, writer: str, seq: int) -> str:
    """Where one part of ``kind`` goes (its day's folder; names sort by time)."""
    day, stamp = time.strftime("%Y-%m-%d", time.gmtime(when)), time.strftime("%Y%m%dT%H%M%S", time.gmtime(when))
    return storage.join(uri, kind, day, f"part-{stamp}-{writer}-{seq:06d}.parquet")


def list_parts(uri: str, kind: str) -> list[str]:
    """Every part of ``kind`` under the log ``uri``, oldest first (none: an empty list)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage.join(uri, kind))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and i.base_name.startswith("part-"))
    return [f"s3://{n}" if storage.is_s3(uri) else n for n in sorted(names, key=lambda n: n.rsplit("/", 1)[-1])]


def conform(part: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part as ``schema``: a column added since the part was written (older parts) reads as nulls."""
    for name in schema.names:
        if name not in part.column_names:
            part = part.append_column(name, pa.nulls(part.num_rows, schema.field(name).type))
    return part.select(schema.names).cast(schema)


def read_log(uri: str, kind: str, since: float | None = None, until: float | None = None) -> pa.Table:
    """Every record of ``kind`` (``decisions`` or ``feedback``) under ``uri``, with ``since <= time < until``."""
    import pyarrow.compute as pc

    schema = RECORDS[kind].SCHEMA
    parts = [conform(storage.read_parquet(p), schema) for p in list_parts(uri, kind)]
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    if since is not None:
        table = table.filter(pc.greater_equal(table["time"], since))
    if until is not None:
        table = table.filter(pc.less(table["time"], until))
    return table


def per_target(cell: Any) -> dict[str, float]:
    """A map cell read back by pyarrow (a list of (key, value) pairs) as a dict."""
    return dict(cell) if cell else {}


def unix_time(value: Any) -> Any:
    """A config time as unix seconds: a number, a numeric string, or an ISO 8601 date or date/time
    (``2025-06-01``, ``2025-06-01T12:00:00+02:00``; without a zone: UTC). Other values are left to pydantic."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValueError(f"{value!r} is neither unix seconds nor an ISO 8601 date or date/time") from None
    if isinstance(value, datetime):
        value = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(value, date):
        value = datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    if isinstance(value, bool) or (isinstance(value, (int, float)) and not math.isfinite(value)):
        raise ValueError(f"{value!r} is not a time")
    return float(value) if isinstance(value, (int, float)) else value


def logged_messages(value: Any) -> list[dict[str, str]]:
    """Chat messages from a record's ``messages`` (its JSON text, or the list itself); ValueError when
    unreadable or empty."""
    if isinstance(value, str) or value is None:
        try:
            value = json.loads(value or "")
        except json.JSONDecodeError:
            raise ValueError("messages is not JSON") from None
    value = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value):
        raise ValueError("messages is not a non-empty list of {role, content}")
    if not any(m["content"].strip() for m in value):
        raise ValueError("empty messages")
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]
