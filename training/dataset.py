"""The routing dataset: captured activations joined with every target's labels.

Inputs (both written by resumable Ray Data jobs, see ``training/shards.py``):

- activations ``<act>/shard-*.parquet``: one row per query with ``query_id``, ``split``,
  ``n_tokens`` and one fixed-shape tensor column per (layer, pooling), named
  ``h{layer}_{pooling}`` (layer = hidden_states index, 0 = embeddings);
- labels ``<labels>/<target>/shard-*.parquet``: one row per query with ``query_id``,
  ``status`` (``ok``/``failed``), ``correct`` (score in [0, 1]), ``input_tokens``,
  ``output_tokens``, ``cost``.

Rows whose label is missing or failed are NaN in ``Y`` (masked), never 0.

Labels imported from the Serve app's decision log (``data import format=decision-log``) also
carry ``<labels>/<target>/propensity.parquet`` (``training.labels.PROPENSITY_SCHEMA``):
per labelled cell the propensity P(target | decision) and the number of decisions merged into it.
:func:`load_propensity` aligns them as ``RoutingData.propensity`` / ``decisions`` (None for labels
without the files), for inverse-propensity weighting (fit, tune) and off-policy evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from shared import storage
from shared.config import StrictConfig
from shared.errors import BadInput
from shared.features import block_columns


class RoutingDataConfig(StrictConfig):
    """Base of the configs of the stages that read a routing dataset (probe, tune, fit): where it lies."""

    activations: str = Field(description="Activation dataset written by `prefill-router capture`.")
    labels: str = Field(description="Labels dataset written by `prefill-router label`.")


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-shape tensor (or list) column as a ``(n, d)`` float32 array."""
    col = table.column(name).combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        arr = col.to_numpy_ndarray()
    else:
        arr = np.stack(col.to_numpy(zero_copy_only=False))
    return np.asarray(arr, dtype=np.float32).reshape(len(table), -1)


@dataclass
class RoutingData:
    """Aligned arrays over ``n`` queries and ``T`` targets."""

    query_ids: np.ndarray                       # (n,) str
    split: np.ndarray                           # (n,) str: train / val / test
    blocks: dict[str, np.ndarray]               # name -> (n, d) float32
    targets: list[str]                          # T names, label column order
    Y: np.ndarray                               # (n, T) correctness in [0, 1], NaN = missing
    cost: np.ndarray                            # (n, T) USD, NaN = missing
    input_tokens: np.ndarray                    # (n, T) prompt tokens per target
    output_tokens: np.ndarray                   # (n, T) answer tokens per target
    n_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) encoder prompt tokens
    propensity: np.ndarray | None = None        # (n, T) P(target | decision) of logged cells, NaN = none
    decisions: np.ndarray | None = None         # (n, T) logged decisions merged into each cell, 0 = none

    @property
    def logged(self) -> bool:
        """The labels came from a decision log with propensities (``propensity`` is set)."""
        return self.propensity is not None

    def subset(self, mask: np.ndarray) -> "RoutingData":
        return replace(self, query_ids=self.query_ids[mask], split=self.split[mask],
                       blocks={k: v[mask] for k, v in self.blocks.items()}, Y=self.Y[mask], cost=self.cost[mask],
                       input_tokens=self.input_tokens[mask], output_tokens=self.output_tokens[mask],
                       n_tokens=self.n_tokens[mask] if len(self.n_tokens) else self.n_tokens,
                       propensity=None if self.propensity is None else self.propensity[mask],
                       decisions=None if self.decisions is None else self.decisions[mask])

    def where(self, *splits: str) -> "RoutingData":
        return self.subset(np.isin(self.split, splits))


def read_dataset(uri: str) -> pa.Table:
    """All finished shards of a sharded job output."""
    from training.shards import read_shards

    return read_shards(uri)


def load_labels(labels_uri: str, targets: Sequence[str], query_ids: np.ndarray) -> dict[str, np.ndarray]:
    """``{'Y','cost','input_tokens','output_tokens'}`` arrays ``(n, T)`` aligned to ``query_ids``."""
    index = {q: i for i, q in enumerate(query_ids)}
    shape = (len(query_ids), len(targets))
    out = {k: np.full(shape, np.nan) for k in ("Y", "cost", "input_tokens", "output_tokens")}
    for t, target in enumerate(targets):
        table = read_dataset(storage.join(labels_uri, target))
        rows = table.select([c for c in ("query_id", "status", "correct", "cost", "input_tokens", "output_tokens")
                             if c in table.column_names]).to_pylist()
        for row in rows:
            i = index.get(row["query_id"])
            if i is None or row.get("status", "ok") != "ok" or row.get("correct") is None:
                continue
            out["Y"][i, t] = float(row["correct"])
            out["cost"][i, t] = float(row.get("cost") or 0.0)
            out["input_tokens"][i, t] = float(row.get("input_tokens") or 0)
            out["output_tokens"][i, t] = float(row.get("output_tokens") or 0)
    return out


def load_propensity(labels_uri: str, targets: Sequence[str],
                    query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(propensity, decisions)``, each ``(n, T)`` aligned to ``query_ids``, from the targets'
    ``propensity.parquet`` (a decision-log import): a labelled cell's mean propensity (NaN where its
    decisions had none: pinned or degraded requests; NaN for unlabelled cells) and its decision count
    (0 for unlabelled cells). None when no target has the file (labels from ``label run`` or a benchmark)."""
    from training.labels import PROPENSITY_FILE

    uris = [storage.join(labels_uri, t, PROPENSITY_FILE) for t in targets]
    if not any(storage.exists(u) for u in uris):
        return None
    index = {q: i for i, q in enumerate(query_ids)}
    prop, count = np.full((len(query_ids), len(targets)), np.nan), np.zeros((len(query_ids), len(targets)))
    for t, uri in enumerate(uris):
        if not storage.exists(uri):
            continue
        table = storage.read_parquet(uri, columns=["query_id", "propensity", "decisions"])
        for qid, p, d in zip(*(table.column(c).to_pylist() for c in ("query_id", "propensity", "decisions"))):
            i = index.get(qid)
            if i is not None:
                prop[i, t] = np.nan if p is None else float(p)
                count[i, t] = float(d or 1)
    return prop, count


def load_routing_data(activations_uri: str, labels_uri: str, targets: Sequence[str],
                      blocks: Sequence[str] | None = None) -> RoutingData:
    """Join activations and labels on ``query_id``; ``blocks`` picks activation columns (default all)."""
    table = read_dataset(activations_uri)
    names = list(blocks) if blocks else block_columns(table.schema.names)
    missing = [b for b in names if b not in table.column_names]
    if missing:
        raise BadInput(f"activation columns {missing} not in {activations_uri}; "
                       f"it has {block_columns(table.schema.names)}")
    query_ids = np.asarray(table.column("query_id").to_pylist())
    labels = load_labels(labels_uri, targets, query_ids)
    logged = load_propensity(labels_uri, targets, query_ids)
    n_tokens = np.asarray(table.column("n_tokens").to_pylist()) if "n_tokens" in table.column_names else np.zeros(0)
    return RoutingData(query_ids=query_ids, split=np.asarray(table.column("split").to_pylist()),
                       blocks={b: tensor_column(table, b) for b in names}, targets=list(targets), Y=labels["Y"],
                       cost=labels["cost"], input_tokens=labels["input_tokens"],
                       output_tokens=labels["output_tokens"], n_tokens=n_tokens,
                       **({} if logged is None else dict(zip(("propensity", "decisions"), logged))))
