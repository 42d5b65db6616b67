"""Process helpers for the tests: free loopback ports, a job killed half way."""

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
