"""Reusing earlier captures: a prompt already encoded the same way is copied, not encoded again.

Retraining on a growing decision log imports a new query table each time, mostly of prompts an
earlier run has captured; ``capture.reuse`` names those earlier outputs (local or ``s3://``). A
source is used only when its manifest says it was made the same way: the same encoder weights,
chat template, layer convention, dtype, hidden size and ``max_tokens`` (:data:`SAME`), and it holds
every feature column this capture writes; otherwise it is skipped with a warning naming the
difference. A pending row is matched to a source row by its prompt, the sha256 of its messages as
JSON (the source's query table, named in its manifest, gives its rows' messages), never by id.
Matched rows go to the shard writer as if encoded; the rest are encoded as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

# identity keys that must agree for a source's vectors to equal this capture's
SAME = ("encoder", "chat_template_sha256", "layer_convention", "embedding_layer_index", "last_layer_final_norm",
        "num_layers", "dtype", "hidden_size", "max_tokens", "truncation")


def prompt_key(messages_json: str) -> str:
    return hashlib.sha256(messages_json.encode("utf-8", "surrogatepass")).hexdigest()


def usable_sources(sources: list[str], identity: dict[str, Any], columns: list[str]) -> list[dict[str, Any]]:
    """The manifests of the ``sources`` made like this capture (``identity``) with all of ``columns``."""
    from shared import storage
    from training.shards import MANIFEST

    usable = []
    for src in sources:
        uri = storage.join(src, MANIFEST)
        if not storage.exists(uri):
            log.warning("capture.reuse: %s has no %s (not a capture output); not reused", src, MANIFEST)
            continue
        manifest = storage.read_json(uri)
        theirs = manifest.get("identity", {})
        differ = [k for k in SAME if theirs.get(k) != identity.get(k)]
        lacking = sorted(set(columns) - set(manifest.get("columns", [])))
        queries = (manifest.get("config") or {}).get("queries")
        if differ or lacking or not queries or not storage.exists(queries):
            why = (f"captured with another {', '.join(differ)}" if differ else
                   f"has no {lacking}" if lacking else f"its query table {queries!r} is gone")
            log.warning("capture.reuse: %s %s; not reused", src, why)
            continue
        usable.append({"out": src, "queries": queries})
    return usable


def _source_keys(queries: str) -> dict[str, str]:
    """query_id -> prompt key of a source's query table."""
    from shared import storage

    table = storage.read_parquet(queries, columns=["query_id", "messages"])
    return {qid: prompt_key(json.dumps(m, ensure_ascii=False))
            for qid, m in zip(table.column("query_id").to_pylist(), table.column("messages").to_pylist())}


def _found_rows(want: dict[str, list[int]], sources: list[dict[str, Any]], columns: list[str]) -> dict[int, dict]:
    """pending row index -> the matching source row (``n_tokens``, ``truncated``, the vectors)."""
    from shared import storage
    from training.shards import finished_shards, shard_path

    found: dict[int, dict] = {}
    for src in sources:
        keys = _source_keys(src["queries"])
        for shard in sorted(finished_shards(src["out"])):
            table = storage.read_parquet(shard_path(src["out"], shard),
                                         columns=["query_id", "n_tokens", "truncated", *columns])
            vectors = {c: table.column(c).combine_chunks().to_numpy_ndarray() for c in columns}
            for i, qid in enumerate(table.column("query_id").to_pylist()):
                for row in want.get(keys.get(qid, ""), []):
                    if row not in found:
                        found[row] = {"n_tokens": table.column("n_tokens")[i].as_py(),
                                      "truncated": table.column("truncated")[i].as_py(),
                                      **{c: vectors[c][i] for c in columns}}
        if len(found) == sum(map(len, want.values())):
            break
    return found


def reuse_rows(pending: pa.Table, sources: list[dict[str, Any]],
               columns: list[str]) -> tuple[dict[str, np.ndarray] | None, pa.Table]:
    """``(batch for the shard writer of the rows found in sources, the pending rows still to encode)``.

    ``pending``: :func:`training.capture.run.pending_table` (``query_id``, ``split``,
    ``messages_json``, ``_shard``, ``_row``); the batch has its rows' ids, splits, shard and row
    indices, with ``n_tokens``, ``truncated`` and the vectors of the source rows.
    """
    want: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(pending.column("messages_json").to_pylist()):
        want[prompt_key(text)].append(i)
    found = _found_rows(want, sources, columns) if sources and pending.num_rows else {}
    if not found:
        return None, pending
    rows = np.array(sorted(found), dtype=np.int64)
    taken = pending.take(pa.array(rows))
    batch = {name: np.asarray(taken.column(name).to_pylist(), dtype=object if name in ("query_id", "split")
                              else np.int64) for name in ("query_id", "split", "_shard", "_row")}
    batch["n_tokens"] = np.array([found[r]["n_tokens"] for r in rows], dtype=np.int64)
    batch["truncated"] = np.array([found[r]["truncated"] for r in rows], dtype=bool)
    for c in columns:
        batch[c] = np.stack([found[r][c] for r in rows])
    keep = np.ones(pending.num_rows, dtype=bool)
    keep[rows] = False
    return batch, pending.filter(pa.array(keep))
