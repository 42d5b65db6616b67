"""The retraining pipeline end to end on three Ray nodes (issue 35, part 1), against the same pipeline
on one node: ``prefill-router pipeline run`` with ``configs/pipeline-small.yaml`` on 40 imported
queries (``data_import``, long format) through capture (one actor per worker node, one of them with an
empty model cache), probe, tune, fit (one Ray Train worker per worker node) and evaluate. The
single-node run is a separate process with a local Ray of its own. Both write the same features and
the same evaluation, to float noise."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.multinode.conftest import ONE_PER_NODE
from tests.procs import ROOT
from tests.traffic import logged_traffic

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
SMALL = str(ROOT / "configs" / "pipeline-small.yaml")
UNCOMPARED = {"config", "artifact", "work_dir", "seconds"}  # paths and times, which differ by design


def overrides(work: Path, traffic: Path, cpus: float) -> list[str]:
    return [f"work_dir={work}", "data=null", f"data_import={{format: long, inputs: [{traffic}]}}",
            f"capture.num_cpus={cpus}", "capture.min_actors=1", "capture.max_actors=2",
            "fit.train.num_workers=2", f"fit.train.cpus_per_worker={cpus}", f"publish.uri={work}/published"]


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON values differ: numbers beyond float noise (1e-4 relative), anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys if k not in UNCOMPARED for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        same = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
        return [] if same else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.timeout(1500)  # two pipeline runs, the single-node one first
def test_the_pipeline_on_three_nodes_equals_the_single_node_run(nodes, tmp_path):
    import ray

    from cluster.cli import main
    from shared import storage
    from training.capture.run import read_features

    traffic = logged_traffic(tmp_path / "traffic.parquet")
    alone = tmp_path / "single-node"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    single = subprocess.run([sys.executable, "-m", "cluster.cli", "pipeline", "run", "--config", SMALL,
                             *overrides(alone, traffic, 1)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    spread = tmp_path / "three-nodes"
    assert main(["pipeline", "run", "--config", SMALL, *overrides(spread, traffic, ONE_PER_NODE),
                 f"ray_address={nodes['address']}"]) == 0
    assert ray.is_initialized(), "the pipeline disconnected the test's driver"
    summary = storage.read_json(str(spread / "pipeline-summary.json"))
    assert summary["stages"]["data"]["rows"] == 40 and summary["stages"]["publish"]["published"]
    for block in (f"h{layer}_{pooling}" for layer in (8, 16, 24) for pooling in ("last", "mean")):
        ids_a, x_a = read_features(str(alone / "activations"), block)
        ids_b, x_b = read_features(str(spread / "activations"), block)
        assert ids_a == ids_b and np.allclose(x_a, x_b, rtol=1e-4, atol=1e-5), block
    report = {name: storage.read_json(str(work / "eval" / "report.json")) for name, work in
              (("single", alone), ("spread", spread))}
    assert report["spread"]["subsets"]["test"]["routers"]["prefill-router"], "no router was evaluated"
    assert differences(report["single"], report["spread"]) == []
