"""Capture output: the shard writer for vector batches and the reader of its feature columns.

Each shard is a Parquet file with ``query_id``, ``split``, ``n_tokens``, ``truncated`` and
one fixed-shape tensor column per (layer, pooling) (Arrow's native
``arrow.fixed_shape_tensor``, shape ``[hidden_size]``), rows in query-table order
(:mod:`training.shards` for the sharding and resume rules).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from training.shards import ShardWriter


class TensorShardWriter(ShardWriter):
    """ShardWriter for numpy batches with vector columns, written as fixed-shape tensor columns.

    Rows of a shard are written in query-table order (``_row``); ``_``-prefixed columns
    are dropped. Duplicates of a query (a retried task) replace the earlier row.
    """

    def __init__(self, out: str, expected: dict[int, int], tensor_columns: list[str], token_layers=()):
        super().__init__(out, expected, key="query_id")
        self.tensor_columns, self.token_layers = tensor_columns, list(token_layers)

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:  # type: ignore[override]
        done = []
        names = list(batch)
        for i in range(len(batch["query_id"])):
            row = {name: batch[name][i] for name in names}
            shard = int(row["_shard"])
            self.buffers[shard][str(row["query_id"])] = row
            if len(self.buffers[shard]) == self.expected.get(shard, -1):
                self._write(shard)
                done.append(shard)
        return done

    def _write(self, shard: int) -> None:
        from shared import storage
        from training.shards import shard_path

        rows = sorted(self.buffers.pop(shard).values(), key=lambda r: int(r["_row"]))
        storage.write_parquet(rows_to_table(rows, self.tensor_columns, self.token_layers), shard_path(self.out, shard))
        self.written.append(shard)


def rows_to_table(rows: list[dict[str, Any]], tensor_columns: list[str], token_layers=()) -> pa.Table:
    """Output table: scalar columns, then one ``pa.FixedShapeTensorArray`` per vector column, then the token
    states' columns of ``token_layers`` (:mod:`training.capture.tokens`)."""
    cols: dict[str, pa.Array] = {
        "query_id": pa.array([str(r["query_id"]) for r in rows], pa.string()),
        "split": pa.array([str(r["split"]) for r in rows], pa.string()),
        "n_tokens": pa.array([int(r["n_tokens"]) for r in rows], pa.int32()),
        "truncated": pa.array([bool(r["truncated"]) for r in rows], pa.bool_()),
    }
    for col in tensor_columns:
        stacked = np.ascontiguousarray(np.stack([np.asarray(r[col]) for r in rows]))
        cols[col] = pa.FixedShapeTensorArray.from_numpy_ndarray(stacked)
    if token_layers:
        from training.capture.tokens import token_table_columns

        cols.update(token_table_columns(rows, list(token_layers)))
    return pa.table(cols)


def read_features(out: str, column: str) -> tuple[list[str], np.ndarray]:
    """``(query ids, (n, hidden) array)`` of one feature column over all finished shards."""
    from training.shards import read_shards

    table = read_shards(out)
    return table.column("query_id").to_pylist(), table.column(column).combine_chunks().to_numpy_ndarray()
