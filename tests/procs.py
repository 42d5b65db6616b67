"""Process helpers for the tests: free loopback ports, a job killed half way, a loopback S3, a local Ray."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_after_first_shard(module_args: list[str], shard_dir: Path, timeout_s: float = 240) -> dict[str, int]:
    """Run ``python -m <module_args>``, SIGKILL its process group once a shard appears in ``shard_dir``.

    Returns ``{shard file name: mtime_ns}`` of the shards written before the kill.
    """
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    try:
        while not list(shard_dir.glob("shard-*.parquet")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the driver this helper started
        proc.wait(timeout=30)
    return {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}


def moto_env():
    """A loopback moto S3 server with its env (``AWS_ENDPOINT_URL`` and credentials) set; the old values
    are restored after. A generator for fixtures of any scope: set it before any Ray starts, so every
    Ray process has it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def local_ray(num_cpus: int = 2):
    """A local Ray for a group of tests (a fixture's body): started unless this process has one, shut
    down after only if started here. Yields the GCS address."""
    import ray

    from shared.ray_boot import ensure_ray

    started = ensure_ray("local", num_cpus=num_cpus, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
