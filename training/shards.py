"""Resumable, idempotent sharded output for long Ray Data jobs (labelling, capture).

A job's input table is cut into fixed shards of ``shard_size`` consecutive rows. A shard
is written as one Parquet file, ``<out>/shard-00012.parquet``, atomically and only once
every one of its rows has come back, so a killed job leaves only whole shards behind.
Re-running with the same arguments skips the finished shards, redoes the partial ones,
and ends with exactly one row per input row. ``<out>/manifest.json`` records what the
shards were made from; a re-run with different settings is refused rather than mixed in.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from shared import storage
from shared.errors import BadInput, MissingInput

SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")
MANIFEST = "manifest.json"


class ManifestMismatch(BadInput):
    """The output directory holds shards made with other settings."""


def shard_ids(n_rows: int, shard_size: int) -> np.ndarray:
    """Shard of each row: ``row_index // shard_size`` (shape ``(n_rows,)``)."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    return np.arange(n_rows) // shard_size


def shard_path(out: str, shard: int) -> str:
    return storage.join(out, f"shard-{shard:05d}.parquet")


def finished_shards(out: str) -> set[int]:
    """Shards already written under ``out`` (partial writes never have the final name)."""
    fs, path = storage.filesystem(out)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return {int(m.group(1)) for info in infos if (m := SHARD_RE.match(info.base_name))}


def check_manifest(out: str, identity: dict[str, Any]) -> None:
    """Write ``identity`` as the manifest, or refuse if an existing one differs from it."""
    uri = storage.join(out, MANIFEST)
    if storage.exists(uri):
        old = storage.read_json(uri).get("identity")
        if old != identity:
            changed = sorted(k for k in set(old or {}) | set(identity) if (old or {}).get(k) != identity.get(k))
            raise ManifestMismatch(
                f"{out} holds shards made with different settings (changed: {changed}); "
                "use a new output path or delete the old one"
            )
    else:
        storage.write_json(uri, {"identity": identity})


def update_manifest(out: str, **fields: Any) -> dict[str, Any]:
    """Add fields (summary, versions) to the manifest next to its identity."""
    uri = storage.join(out, MANIFEST)
    manifest = storage.read_json(uri) if storage.exists(uri) else {}
    manifest.update(fields)
    storage.write_json(uri, manifest)
    return manifest


def pending_rows(n_rows: int, shard_size: int, done: set[int]) -> np.ndarray:
    """Indices of the rows whose shard is not finished yet."""
    ids = shard_ids(n_rows, shard_size)
    return np.flatnonzero(~np.isin(ids, list(done)))


class ShardWriter:
    """Collects result rows by shard and writes each shard once it is complete.

    ``expected`` maps shard id -> number of rows it must hold. Rows must carry an
    integer ``_shard`` column (dropped before writing) and ``key`` (unique per row within
    a shard; duplicates from a retried task are dropped).
    """

    def __init__(self, out: str, expected: dict[int, int], key: str = "query_id"):
        self.out, self.expected, self.key = out, dict(expected), key
        self.buffers: dict[int, dict[Any, dict]] = defaultdict(dict)
        self.written: list[int] = []

    def add(self, batch: pa.Table | dict[str, Any]) -> list[int]:
        """Add result rows; returns the shards this call completed and wrote."""
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        done = []
        for row in table.to_pylist():
            shard = int(row.pop("_shard"))
            self.buffers[shard][row[self.key]] = row
            if len(self.buffers[shard]) == self.expected.get(shard, -1):
                self._write(shard)
                done.append(shard)
        return done

    def _write(self, shard: int) -> None:
        rows = sorted(self.buffers.pop(shard).values(), key=lambda r: str(r[self.key]))
        storage.write_parquet(pa.Table.from_pylist(rows), shard_path(self.out, shard))
        self.written.append(shard)

    @property
    def incomplete(self) -> dict[int, int]:
        """Shards still missing rows: ``{shard: rows received}``."""
        return {s: len(b) for s, b in self.buffers.items()}


def read_shards(out: str) -> pa.Table:
    """All finished shards of a job, concatenated in shard order."""
    shards = sorted(finished_shards(out))
    if not shards:
        raise MissingInput(f"no finished shards under {out}")
    return pa.concat_tables([storage.read_parquet(shard_path(out, s)) for s in shards], promote_options="default")
