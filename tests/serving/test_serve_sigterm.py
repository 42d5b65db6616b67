"""``prefill-router serve run`` ended by SIGTERM (as a pod or a supervisor ends it) loses no logged request:
Serve stops the replicas gracefully and the ingress writes the records it still buffered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest

from shared.decision_log import read_log
from tests.procs import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.system]
MSG = [{"role": "user", "content": "What is 7 + 5?"}]


def test_sigterm_of_serve_run_writes_every_answered_request(tmp_path):
    from cluster.demo_chat import wait_ready

    port, log = free_port(), tmp_path / "log"
    args = [sys.executable, "-m", "cluster.cli", "serve", "run", "-c", "configs/serve-local.yaml", f"http_port={port}",
            f"decision_log.uri={log}", "decision_log.part_s=3600", "default_max_tokens=4"]
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                            start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            ids = [client.post("/v1/chat/completions", json={"model": model, "messages": MSG}).json()["id"]
                   for model in ("router", "smollm2-135m", "router")]
        assert read_log(str(log), "decisions").num_rows == 0  # held in the buffer (part_s: an hour)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        out.seek(0)
        said = out.read().decode(errors="replace")[-4000:]
        out.close()
    assert sorted(read_log(str(log), "decisions").column("request_id").to_pylist()) == sorted(ids), said
    assert code == 128 + signal.SIGTERM, said
