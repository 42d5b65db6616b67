"""The query table's format, owned here for every stage that reads or writes it.

Columns (:data:`QUERY_SCHEMA`): ``query_id`` (stable content hash), ``source``, ``task``,
``messages`` (chat messages), ``reference`` (answer), ``answer_type`` (``multiple_choice`` |
``exact`` | ``numeric`` | ``code``), ``choices`` (option labels for multiple choice),
``group_id`` and ``split``. ``meta`` holds what a scorer needs (JSON).

Splits are assigned per *group* (a normalised question text) by a seeded hash
(:func:`assign_split`), so the same task instance never lands in two splits.
:func:`table_hash` identifies a table's rows for the stages that resume from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)


ANSWER_TYPES = ("multiple_choice", "exact", "numeric", "code")


MC_LABELS = ("A", "B", "C", "D")


QUERY_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("reference", pa.string()),
        ("answer_type", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("group_id", pa.string()),
        ("split", pa.string()),
        ("meta", pa.string()),
    ]
)


@dataclass
class BuildReport:
    """What the builder kept and skipped, per source."""

    kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, source: str, reason: str, detail: str) -> None:
        self.skipped[f"{source}: {reason}"] += 1
        detail = " ".join(detail.split())[:160]
        if len(self.examples) < 20:
            self.examples.append(f"{source}: {reason}: {detail}")
        # Duplicates are expected from small procedural generators; the summary counts them.
        level = logging.DEBUG if reason == "duplicate query" else logging.WARNING
        log.log(level, "skipping %s record (%s): %s", source, reason, detail)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": dict(self.kept), "skipped": dict(self.skipped), "examples": self.examples}


class BadRecord(ValueError):
    """A source record that cannot become a query; the message is the reason."""


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Hex digest of the JSON encoding of ``parts`` (order- and process-independent)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def assign_split(group_id: str, seed: int, fractions: dict[str, float]) -> str:
    """Map a group to train/val/test: ``u = hash(seed, group) / 2**64`` against cumulative fractions."""
    u = int(stable_hash(seed, group_id, n=16), 16) / float(1 << 64)
    acc = 0.0
    for name in ("train", "val", "test"):
        acc += fractions[name]
        if u < acc:
            return name
    return "test"


def make_query(source: str, task: str, messages: list[dict[str, str]], reference: str, answer_type: str,
               group_text: str, choices: list[str] | None = None, meta: Any = None) -> dict[str, Any]:
    """One query row (without split); raises :class:`BadRecord` for empty content."""
    if not reference or not str(reference).strip():
        raise BadRecord("empty reference answer")
    if not messages or not all(m.get("content", "").strip() for m in messages):
        raise BadRecord("empty prompt")
    if answer_type not in ANSWER_TYPES:
        raise BadRecord(f"unknown answer type {answer_type!r}")
    return {
        "query_id": stable_hash(source, task, messages, reference),
        "source": source,
        "task": task,
        "messages": messages,
        "reference": str(reference),
        "answer_type": answer_type,
        "choices": list(choices or []),
        "group_id": stable_hash(source, normalise(group_text)),
        "meta": json.dumps(meta, sort_keys=True, default=list) if meta is not None else "{}",
    }


def is_number(text: str) -> bool:
    """Whether ``text`` parses as a number (thousands commas allowed)."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def table_hash(table: pa.Table) -> str:
    """Content hash of a query table: its query ids and splits, in order."""
    ids = table.column("query_id").to_pylist()
    return stable_hash(ids, table.column("split").to_pylist())


def split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """``{family: {split: count}}``; a family is the source, or ``source/task`` for procedural tasks."""
    out: dict[str, dict[str, int]] = {}
    cols = [table.column(c).to_pylist() for c in ("source", "task", "split")]
    for src, task, split in zip(*cols):
        family = src if src == "mmlu" else f"{src}/{task}"
        out.setdefault(family, {}).setdefault(split, 0)
        out[family][split] += 1
    return out
