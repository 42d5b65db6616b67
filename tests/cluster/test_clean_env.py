"""The real CLI and the demo's first stage from a clean shell: only PATH and HOME, no RAY_* variables.

A regression test for the demo that hung forever: Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported, so a driver that set it after
``import ray`` rewrote the head's 127.0.0.1 to the machine's address and retried "Failed to
connect to GCS" without end. Every step runs in a subprocess of this repository's code
(``python -m cluster.cli``, cwd = the repository root) with a timeout, and whatever it
started is stopped by ``cluster stop`` (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.system]

START_S, DRIVER_S, STOP_S, DEMO_STAGE_S = 150, 90, 60, 120
DRIVER = """
import json, sys
import ray  # imported first, as the CLI does
from shared.ray_boot import ensure_ray
ensure_ray(sys.argv[1], log_to_driver=False)
print(json.dumps({"cpus": ray.cluster_resources().get("CPU", 0), "node_ip": ray.util.get_node_ip_address(),
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]}))
"""
DEMO_STAGE = """
import json, sys
from pathlib import Path
import ray
from cluster.demo import start_cluster, stop_cluster
cfg, state = start_cluster(Path(sys.argv[1]))
found = {"gcs": state["gcs_address"], "cpus": ray.cluster_resources().get("CPU", 0),
         "node_ip": ray.util.get_node_ip_address()}
stop_cluster(cfg)
print(json.dumps(found))
"""


def clean_env(home: Path) -> dict[str, str]:
    """What ``env -i PATH=... HOME=...`` leaves: the venv's bin first, nothing of Ray."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home)}


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python <args>`` in the repository root; on timeout its whole process group is killed
    (SIGTERM does not end a driver stuck in Ray's C++ retry loop) and the test fails."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the process this helper started
        out, err = proc.communicate()
        pytest.fail(f"`python {' '.join(args[:3])} ...` hung: no result within {timeout:.0f} s\n"
                    f"{(out or '')[-1500:]}\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``prefill-router <args>`` of this checkout (``python -m cluster.cli``), bounded like :func:`run`."""
    return run(["-m", "cluster.cli", *args], env, timeout)


def stop(state_file: Path, env: dict[str, str]) -> None:
    """Stop what ``cluster start`` recorded in ``state_file`` (if it is still there)."""
    if state_file.exists():
        cli(["cluster", "stop", f"state_file={state_file}"], env, STOP_S)


def last_json(out: str) -> dict:
    """The JSON object a driver script printed last."""
    return json.loads(out.strip().splitlines()[-1])


def test_cluster_start_driver_connect_and_stop_from_a_clean_shell(tmp_path):
    env = clean_env(tmp_path / "home")
    state_file = tmp_path / "cluster" / "local.json"
    try:
        started = cli(["cluster", "start", f"state_file={state_file}", "port=0", "dashboard_port=0"], env, START_S)
        assert started.returncode == 0, started.stdout + started.stderr
        gcs = json.loads(state_file.read_text())["gcs_address"]
        assert gcs.startswith("127.0.0.1:")
        driver = run(["-c", DRIVER, gcs], env, DRIVER_S)
        assert driver.returncode == 0, driver.stderr[-3000:]
        found = last_json(driver.stdout)
        assert found["cpus"] > 0
        assert found["node_ip"] == "127.0.0.1" and found["nodes"] == ["127.0.0.1"]
    finally:
        stop(state_file, env)
    assert not state_file.exists()


def test_demo_first_stage_from_a_clean_shell(tmp_path):
    env = clean_env(tmp_path / "home")
    workdir = tmp_path / "demo"
    try:
        stage = run(["-c", DEMO_STAGE, str(workdir)], env, DEMO_STAGE_S)
        assert stage.returncode == 0, stage.stderr[-3000:]
        found = last_json(stage.stdout)
        assert found["gcs"].startswith("127.0.0.1:") and found["node_ip"] == "127.0.0.1" and found["cpus"] > 0
    finally:
        stop(workdir / "cluster.json", env)  # what a hung stage left running
    assert not (workdir / "cluster.json").exists()


def test_a_driver_with_nothing_listening_gets_a_clear_error_not_a_hang(tmp_path):
    env = clean_env(tmp_path / "home")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    served = cli(["serve", "run", "-c", "configs/serve-local.yaml", "--address", address], env, DRIVER_S)
    assert served.returncode == 2, served.stdout + served.stderr[-3000:]
    assert f"no Ray cluster answers at {address}" in served.stderr
    assert "prefill-router cluster start" in served.stderr
    assert time.monotonic() - t0 < 60


def test_a_port_that_is_not_a_ray_gcs_ends_the_driver_within_the_bound(tmp_path):
    """Something accepts TCP but never speaks GCS: Ray would retry forever; the watchdog exits 2."""
    env = clean_env(tmp_path / "home")
    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        script = ("import ray, sys\nfrom shared.ray_boot import ensure_ray\n"
                  "ensure_ray(sys.argv[1], connect_timeout_s=4)\nprint('connected?!')")
        t0 = time.monotonic()
        driver = run(["-c", script, f"127.0.0.1:{port}"], env, DRIVER_S)
        seconds = time.monotonic() - t0
    finally:
        http.kill()
        http.wait(timeout=10)
    assert driver.returncode == 2, driver.stdout + driver.stderr[-3000:]
    assert "within 4 s" in driver.stderr and "prefill-router cluster start" in driver.stderr
    assert "connected?!" not in driver.stdout
    assert seconds < 45
