"""A Ray cluster of several nodes on this machine (issue 35, part 1), as Ray's own fault-tolerance tests
build one: a head that runs nothing (``num_cpus=0``) and two worker nodes, each its own raylet, object
store and temp dir, with a moto S3 server as the only storage they share by design.

Node ``warm`` reads the user's model cache; node ``cold`` has an empty one of its own
(``PREFILL_ROUTER_CACHE`` set per raylet), as a fresh KubeRay pod has. :func:`own_disk_node` adds a
node that sees an empty tmpfs where the driver sees a directory (a mount namespace: ``unshare -m``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.procs import ROOT

WORKER_CPUS = 2.0
ONE_PER_NODE = 1.5  # CPUs an actor or Train worker asks for, so that two of them land on two nodes


def alive(ray) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def wait_nodes(ray, n: int, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(ray) != n:
        assert time.monotonic() < deadline, f"{alive(ray)} alive nodes after {timeout_s:.0f} s, expected {n}"
        assert proc is None or proc.poll() is None, f"the node's process exited ({proc.returncode})"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def nodes(moto_s3) -> Iterator[dict]:
    """Head (no CPUs) + ``warm`` + ``cold`` worker nodes; the driver connected through ``ensure_ray``."""
    import ray
    from ray.cluster_utils import Cluster

    from shared.models import cache_root
    from shared.ray_boot import _single_machine_mode, ensure_ray

    root = Path(tempfile.mkdtemp(prefix="pr-mn-", dir="/tmp"))  # short: Unix socket paths are limited
    Path(os.environ["RAY_TMPDIR"], "ray").mkdir(parents=True, exist_ok=True)  # Cluster notes its address there
    _single_machine_mode(True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": str(root / "head"),
                                                            "include_dashboard": False})
    caches = {"warm": cache_root(), "cold": root / "cold-cache"}
    state = {"address": cluster.address, "caches": caches, "root": root, "cluster": cluster, "node": {}}
    for name in caches:
        add_worker(state, name)
    ensure_ray(cluster.address, log_to_driver=False)
    wait_nodes(ray, 3)
    yield state
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def add_worker(state: dict, name: str) -> None:
    """Start worker node ``name`` (custom resource ``name``, its model cache, a temp dir of its own)."""
    state["node"][name] = state["cluster"].add_node(
        num_cpus=WORKER_CPUS, resources={name: 1}, temp_dir=str(state["root"] / name),
        env_vars={"PREFILL_ROUTER_CACHE": str(state["caches"][name])})


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def own_disk_node(address: str, hidden: Path, temp_dir: Path, cpus: float = WORKER_CPUS) -> Iterator[None]:
    """A worker node that sees an empty tmpfs at ``hidden`` (the driver sees the real directory)."""
    import ray

    if not can_unshare():
        pytest.skip("needs mount namespaces (unshare -m, as root) to give one node a disk of its own")
    before = alive(ray)
    cmd = (f"mount -t tmpfs tmpfs {hidden} && exec {sys.executable} -m tests.multinode.own_disk_node "
           f"--gcs-address={address} --temp-dir={temp_dir} --num-cpus={cpus}")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_nodes(ray, before + 1, proc=proc)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        wait_nodes(ray, before)
