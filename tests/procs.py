"""Process helpers for the tests: free loopback ports, a job killed half way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_while_a_shard_is_held(module_args: list[str], gate, timeout_s: float = 240) -> list[str]:
    """Run ``python -m <module_args>`` against S3 through ``gate`` (a :class:`tests.s3_gate.GatedS3`),
    SIGKILL its process group while the gate holds its second shard upload, then refuse that upload.

    The kill lands at a known point every time: one shard finished, the next one in flight. Returns the
    shard uploads the job made (paths).
    """
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": gate.url}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=ROOT, start_new_session=True, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        gate.gate.wait_holding(timeout_s, alive=lambda: proc.poll() is None)
        failure = None
    except AssertionError as exc:
        failure = exc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the driver this helper started
    proc.wait(timeout=30)
    gate.gate.set_mode("refuse")
    with log:
        if failure:
            log.seek(0)
            raise AssertionError(f"{failure}; the job said: {log.read().decode(errors='replace')[-3000:]}")
    return list(gate.gate.writes)
