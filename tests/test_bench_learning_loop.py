"""bench/learning_loop.py end to end on a few RouterBench rows, and on a few RouterDC rows (its own private
Ray head, the decision service over HTTP, the retraining as Ray jobs): the JSON holds what its bench/README.md
table reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.procs import ROOT
from tests.test_bench_smoke import ROUTERBENCH, bench, read_checked

pytestmark = [pytest.mark.slow, pytest.mark.system]


def test_learning_loop_runs_on_a_few_routerbench_rows(tmp_path):
    if not any(ROUTERBENCH.glob("*.csv")):
        pytest.skip(f"no RouterBench data at {ROUTERBENCH}")
    out = tmp_path / "loop.json"
    cmd = [sys.executable, "bench/learning_loop.py", "--work", str(tmp_path / "work"), "--limit", "40", "--seed-share", "0.5",
           "--replay", "24", "--every", "12", "--epsilon", "0.5", "--json", str(out), "--plot", str(tmp_path / "loop.png")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    module = bench("learning_loop")
    doc = read_checked(module, out)
    assert [p["logged"] for p in doc["points"]] == [0, 12, 24]
    assert all(0 <= p["accuracy"] <= 1 for p in doc["points"]) and (tmp_path / "loop.png").stat().st_size > 0
    assert doc["points"][-1]["explored_share"] > 0  # epsilon 0.5: some requests went elsewhere
    assert "| 0.5 | 24 |" in module.table(doc)


def test_learning_loop_runs_on_a_few_routerdc_rows(tmp_path):
    """Equal prices, soft scores, tolerance 0: the task-averaged accuracy is the headline, no cost columns, and
    exploration still explores (the tolerance band is the choice alone)."""
    routerdc = ROUTERBENCH.parent / "routerdc"
    if not any(routerdc.glob("*.json")):
        pytest.skip(f"no RouterDC data at {routerdc}")
    out = tmp_path / "loop.json"
    cmd = [sys.executable, "bench/learning_loop.py", "--benchmark", "routerdc", "--work", str(tmp_path / "work"),
           "--limit", "10", "--seed-share", "0.5", "--replay", "16", "--every", "16", "--epsilon", "0.5",
           "--json", str(out), "--plot", str(tmp_path / "loop.png")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    module = bench("learning_loop")
    doc = read_checked(module, out)
    assert [p["logged"] for p in doc["points"]] == [0, 16]
    assert all(0 <= p["task_averaged_accuracy"] <= 1 for p in doc["points"])
    assert doc["points"][-1]["explored_share"] > 0
    text = module.table(doc)
    assert "task-averaged accuracy" in text and "cost" not in text
