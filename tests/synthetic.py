"""Synthetic activations and labels in the on-disk formats of `capture` and `label`.

For tests of the stages downstream of them (probe, fit, evaluate) that should not
depend on running real models; the real capture and label jobs have their own tests.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from shared import storage
from training.shards import check_manifest, shard_path

TARGETS = ["smollm2-135m", "gemma3-270m"]


def write_synthetic(root: str, n: int = 360, d: int = 24, layers=(0, 1, 2), seed: int = 0) -> dict:
    """Write ``<root>/activations`` and ``<root>/labels/<target>``; layer 2 carries the signal."""
    rng = np.random.default_rng(seed)
    qids = [f"q{i:04d}" for i in range(n)]
    split = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    signal = rng.normal(size=(n, 2))
    cols = {"query_id": qids, "split": split.tolist(), "n_tokens": rng.integers(20, 80, size=n).tolist()}
    for layer in layers:
        for pooling in ("last", "mean"):
            x = rng.normal(size=(n, d)).astype(np.float32)
            if layer == 2:
                x[:, :2] += 2.0 * signal
            cols[f"h{layer}_{pooling}"] = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    acts = storage.join(root, "activations")
    check_manifest(acts, {"encoder": {"name": "smollm2-135m", "sha256": None}, "synthetic": True})
    half = n // 2
    table = pa.table(cols)
    for shard, sl in enumerate((slice(0, half), slice(half, n))):
        storage.write_parquet(table.slice(sl.start, sl.stop - sl.start), shard_path(acts, shard))
    p = 1 / (1 + np.exp(-np.stack([2 * signal[:, 0], 2 * signal[:, 1] - 0.5], axis=1)))
    correct = (rng.random(p.shape) < p).astype(float)
    for t, target in enumerate(TARGETS):
        out = storage.join(root, "labels", target)
        status = np.where(rng.random(n) < 0.05, "failed", "ok")  # some failed rows: must be masked
        storage.write_parquet(pa.table({
            "query_id": qids, "status": status.tolist(), "correct": correct[:, t].tolist(),
            "input_tokens": cols["n_tokens"], "output_tokens": rng.integers(1, 10 * (t + 1), size=n).tolist(),
            "cost": (np.asarray(cols["n_tokens"]) * (t + 1) * 1e-8).tolist(),
        }), shard_path(out, 0))
    return {"activations": acts, "labels": storage.join(root, "labels"), "targets": TARGETS, "correct": correct}
