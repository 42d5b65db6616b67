"""``prefill-router cluster start|stop|status``: a private local Ray head on this machine.

``start`` runs ``ray start --head`` in a **new process session** with a **private temp
dir**, then records what it started in a state file (GCS address, dashboard URL, temp
and session dir, the process group id and the pids with their start times) plus a
marker file with the same random ``cluster_id`` inside the temp dir.

Safe stop. ``stop`` never calls the machine-global ``ray stop``; it stops only the
processes of the recorded session, after checking that the state file is ours: the
rules live with the state file handling in :mod:`cluster.local_state`.

Addresses. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` puts Ray in single-machine mode:
the node address is 127.0.0.1 and the GCS, raylet, dashboard and its agents listen on
loopback only. A driver must be in the same mode, otherwise Ray rewrites ``127.0.0.1`` to
the machine's address and retries connecting forever; ``shared.ray_boot.ensure_ray``
(every entry point's Ray bootstrap) does that for any loopback address, even after
``import ray``. Use ``auth_mode: token`` on a shared machine (any local user can reach
loopback ports).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import Field

from cluster.local_state import (MARKER, OWNER, ClusterError, auth_headers, kill_processes, read_state, session_processes,
                                 verify_marker, write_json)
from shared.cli_utils import ConfigOption, Overrides
from shared.config import StrictConfig

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class LocalClusterConfig(StrictConfig):
    """Config of ``prefill-router cluster``: one private Ray head on this machine."""

    state_file: str = Field("runs/cluster/local.json", description="Where start records what it started.")
    temp_dir: str | None = Field(None, description="Ray's root temp dir (must be new or empty); None: a fresh "
                                                   "private dir under /tmp (short: Unix socket paths are limited).")
    port: int = Field(6379, ge=0, le=65535, description="GCS port; 0 picks a free port.")
    dashboard_port: int = Field(8265, ge=0, le=65535, description="Dashboard/jobs API port (127.0.0.1); 0: free.")
    client_server_port: int = Field(0, ge=0, le=65535, description="Ray Client server port; 0 picks a free port.")
    dashboard_agent_port: int = Field(0, ge=0, le=65535, description="Dashboard agent HTTP port; 0: free port.")
    num_cpus: int | None = Field(None, ge=0, description="CPUs Ray may schedule on; None: all detected.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs Ray may schedule on; None: all detected.")
    object_store_memory: int | None = Field(None, gt=0, description="Object store size in bytes; None: Ray's default.")
    auth_mode: Literal["disabled", "token"] = Field("disabled", description="Ray token authentication (RAY_AUTH_MODE).")
    auth_token_path: str | None = Field(None, description="Token file for token mode; None: a new token next to "
                                                          "the state file.")
    start_timeout_s: float = Field(120, gt=0, description="Max seconds for ray start and the dashboard to come up.")
    stop_grace_s: float = Field(10, gt=0, description="Seconds between SIGTERM and SIGKILL on stop.")
    health_timeout_s: float = Field(5, gt=0, description="Timeout of each health probe.")
    keep_temp_dir: bool = Field(False, description="Keep the temp dir (logs) after stop; a dir start created "
                                                   "is otherwise removed.")


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (another process could still take it)."""
    return free_ports(1)[0]


def free_ports(n: int, avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct TCP ports free right now on 127.0.0.1, none in ``avoid``: the sockets are held
    open together, so the OS cannot hand the same port out twice (one at a time it can, and Ray
    then refuses two components on one port)."""
    with contextlib.ExitStack() as stack:
        found: list[int] = []
        while len(found) < n:
            s = stack.enter_context(socket.socket())
            s.bind((LOOPBACK, 0))
            if s.getsockname()[1] not in avoid:
                found.append(s.getsockname()[1])
        return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def ray_env(cfg: LocalClusterConfig, token_path: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE=cfg.auth_mode)
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    return env


def connect_env(state: dict[str, Any]) -> dict[str, str]:
    """Environment variables a driver (``ray.init(address=state['gcs_address'])``) or a jobs client needs."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": state["auth_mode"], "RAY_ADDRESS": state["gcs_address"],
           "RAY_API_SERVER_ADDRESS": state["dashboard_url"]}
    if state.get("auth_token_path"):
        env["RAY_AUTH_TOKEN_PATH"] = state["auth_token_path"]
    return env


def _token(cfg: LocalClusterConfig, state_file: Path) -> str | None:
    if cfg.auth_mode != "token":
        return None
    path = Path(cfg.auth_token_path or state_file.with_suffix(".token"))
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex + secrets.token_hex(16))
        path.chmod(0o600)
    return str(path.resolve())


def http_get(url: str, token_path: str | None, timeout: float) -> Any:
    req = urllib.request.Request(url, headers=auth_headers(token_path))
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own loopback dashboard
        return json.loads(resp.read().decode() or "null")


# --------------------------------------------------------------------------- start / stop / health
def _ports(cfg: LocalClusterConfig) -> dict[str, int]:
    """The head's ports: each configured one (refused if taken) or a free one for 0/None."""
    names = ("port", "dashboard_port", "client_server_port", "dashboard_agent_port")
    given = {name: getattr(cfg, name) for name in names if getattr(cfg, name)}
    if len(set(given.values())) < len(given):
        raise ClusterError(f"two of the head's ports are the same ({given}); give each its own, or 0 for a free one")
    for name, port in given.items():
        if not port_free(port):
            raise ClusterError(f"{name} {port} is already in use; choose another ({name}=0 picks a free one)")
    picked = iter(free_ports(len(names) - len(given), avoid=set(given.values())))
    return {name: given.get(name) or next(picked) for name in names}


def _temp_dir(cfg: LocalClusterConfig) -> tuple[Path, bool]:
    """The cluster's private temp dir (must be empty if given) and whether this call created it."""
    if not cfg.temp_dir:
        return Path(tempfile.mkdtemp(prefix="pr-ray-", dir="/tmp")), True
    temp_dir, created = Path(cfg.temp_dir).resolve(), not Path(cfg.temp_dir).exists()
    temp_dir.mkdir(parents=True, exist_ok=True)
    if any(p.name != MARKER for p in temp_dir.iterdir()):
        raise ClusterError(f"temp_dir {temp_dir} is not empty: it may belong to another Ray cluster")
    return temp_dir, created


def _ray_start_cmd(cfg: LocalClusterConfig, ports: dict[str, int], temp_dir: Path) -> list[str]:
    """`ray start --head` bound to loopback on the given ports, usage stats off."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--node-ip-address={LOOPBACK}",
           f"--port={ports['port']}", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={ports['dashboard_port']}",
           f"--ray-client-server-port={ports['client_server_port']}",
           f"--dashboard-agent-listen-port={ports['dashboard_agent_port']}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    for flag, value in (("--num-cpus", cfg.num_cpus), ("--num-gpus", cfg.num_gpus),
                        ("--object-store-memory", cfg.object_store_memory)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    return cmd


def _wait_for_dashboard(cfg: LocalClusterConfig, state: dict[str, Any]) -> str | None:
    """Poll the dashboard until it answers (``start_timeout_s``); returns the Ray version it reports."""
    deadline = time.monotonic() + cfg.start_timeout_s
    while True:
        try:
            return http_get(state["dashboard_url"] + "/api/version", state["auth_token_path"],
                            cfg.health_timeout_s).get("ray_version")
        except (OSError, ValueError) as exc:
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster started but its dashboard never answered ({exc}); "
                                   f"`prefill-router cluster stop` cleans it up") from exc
            time.sleep(0.5)


def start_head(cfg: LocalClusterConfig) -> dict[str, Any]:
    """Start a private Ray head; returns (and records) the state."""
    state_file = Path(cfg.state_file)
    if state_file.exists():
        old = read_state(state_file)
        if Path(old.get("temp_dir", "")).is_dir() and session_processes(old):
            raise ClusterError(f"a cluster recorded in {state_file} is still running "
                               f"({old['gcs_address']}); stop it first")
        log.warning("replacing stale state file %s (its cluster is gone)", state_file)
    ports = _ports(cfg)
    temp_dir, created = _temp_dir(cfg)
    cluster_id = uuid.uuid4().hex
    write_json(temp_dir / MARKER, {"cluster_id": cluster_id, "owner": OWNER})
    token_path = _token(cfg, state_file)
    cmd = _ray_start_cmd(cfg, ports, temp_dir)
    log.info("starting: %s", " ".join(cmd))
    # A new session: the ray start process leads a fresh process group every Ray daemon inherits.
    proc = subprocess.Popen(cmd, env=ray_env(cfg, token_path), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state: dict[str, Any] = {
        "owner": OWNER, "cluster_id": cluster_id, "started_at": time.time(), "pgid": proc.pid,
        "temp_dir": str(temp_dir), "temp_dir_created": created, "session_dir": str(temp_dir / "session_"),
        "auth_mode": cfg.auth_mode, "auth_token_path": token_path, "ports": ports,
        "dashboard_url": f"http://{LOOPBACK}:{ports['dashboard_port']}",
        "gcs_address": f"{LOOPBACK}:{ports['port']}",
    }
    try:
        out, _ = proc.communicate(timeout=cfg.start_timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    session = temp_dir / "session_latest"
    if session.exists():
        state["session_dir"] = str(session.resolve())
    if proc.returncode != 0:
        left = kill_processes(session_processes(state), cfg.stop_grace_s)
        tail = "\n".join((out or "").strip().splitlines()[-15:])
        raise ClusterError(f"ray start failed (exit {proc.returncode}); {left} process(es) left.\n{tail}")
    current = temp_dir / "ray_current_cluster"
    if current.is_file():  # what Ray advertises (the machine's address, not loopback)
        state["gcs_address"] = current.read_text().strip()
    state["pids"] = [{"pid": p.pid, "create_time": p.create_time(), "name": p.name()}
                     for p in session_processes(state)]
    write_json(state_file, state)
    state["ray_version"] = _wait_for_dashboard(cfg, state)
    write_json(state_file, state)
    return state


def stop_head(cfg: LocalClusterConfig) -> int:
    """Stop the cluster recorded in the state file (refuses anything it did not start); returns #killed."""
    state_file = Path(cfg.state_file)
    state = read_state(state_file)
    verify_marker(state)
    procs = session_processes(state)
    left = kill_processes(procs, cfg.stop_grace_s)
    if left:
        raise ClusterError(f"{left} process(es) of {state['session_dir']} survived SIGKILL; state kept")
    state_file.unlink()
    if state.get("temp_dir_created") and not cfg.keep_temp_dir:
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return len(procs)


def health(cfg: LocalClusterConfig) -> list[tuple[str, bool, str]]:
    """``(check, ok, detail)`` rows for the recorded cluster: processes, GCS, dashboard, jobs and state APIs."""
    state = read_state(cfg.state_file)
    token, timeout = state.get("auth_token_path"), cfg.health_timeout_s
    rows: list[tuple[str, bool, str]] = []
    procs = session_processes(state) if Path(state["temp_dir"]).is_dir() else []
    names = sorted({p.name() for p in procs if p.is_running()})
    rows.append(("processes", any("gcs_server" in n for n in names) and any("raylet" in n for n in names),
                 f"{len(procs)} live in group {state['pgid']}: {', '.join(names[:6]) or 'none'}"))
    host, _, port = state["gcs_address"].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        rows.append(("gcs tcp", True, state["gcs_address"]))
    except OSError as exc:
        rows.append(("gcs tcp", False, f"{state['gcs_address']}: {exc}"))
    url = state["dashboard_url"]
    for check, path, show in (("dashboard", "/api/version", lambda r: f"ray {r.get('ray_version')}"),
                              ("jobs api", "/api/jobs/", lambda r: f"{len(r)} job(s)")):
        try:
            rows.append((check, True, f"{url}{path}: {show(http_get(url + path, token, timeout))}"))
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            rows.append((check, False, f"{url}{path}: {exc}"))
    rows.append(state_api_check(url, token, timeout))
    return rows


def state_api_check(url: str, token_path: str | None, timeout: float) -> tuple[str, bool, str]:
    """Nodes as the GCS reports them, through ``ray.util.state`` (via the dashboard)."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var):  # ray.util.state lets these override the address it is given
            return "state api", False, f"not checked: {var}={os.environ[var]} would redirect ray.util.state"
    try:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        headers = {"Content-Type": "application/json", **auth_headers(token_path)}
        nodes = StateApiClient(address=url, headers=headers).list(
            StateResource.NODES, options=ListApiOptions(timeout=int(max(1, timeout))), raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the answer
        return "state api", False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    alive = [n for n in nodes if getattr(n, "state", None) == "ALIVE"]
    return "state api", bool(alive), f"{len(alive)}/{len(nodes)} node(s) ALIVE"


# --------------------------------------------------------------------------- CLI
def _load(config: str | None, overrides: list[str] | None) -> LocalClusterConfig:
    from shared.config import load_config

    return load_config(LocalClusterConfig, config, overrides or [])


def _start(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Start a private local Ray head and record it."""
    from shared.cli_utils import console

    state = start_head(_load(config, overrides))
    console.print(f"[green]started[/] Ray {state.get('ray_version')}: GCS {state['gcs_address']}, "
                  f"dashboard {state['dashboard_url']}, temp dir {state['temp_dir']}")
    console.print("drivers need its environment: eval \"$(prefill-router cluster env)\"")


def _env(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Print `export` lines for a driver or `ray job` client of the recorded cluster."""
    import shlex

    env = connect_env(read_state(_load(config, overrides).state_file))
    print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))


def _stop(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Stop the local Ray head that `cluster start` recorded (never any other)."""
    from shared.cli_utils import console

    killed = stop_head(_load(config, overrides))
    console.print(f"[green]stopped[/] ({killed} process(es))" if killed else "already stopped; state removed")


def _status(
    config: ConfigOption = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Health of the recorded local cluster; exits 1 when a check fails."""
    from rich.table import Table

    from shared.cli_utils import console

    cfg = _load(config, overrides)
    rows = health(cfg)
    if as_json:
        print(json.dumps([{"check": c, "ok": ok, "detail": d} for c, ok, d in rows]))
    else:
        view = Table(title=f"local Ray cluster ({cfg.state_file})")
        for col in ("check", "ok", "detail"):
            view.add_column(col)
        for check, ok, detail in rows:
            view.add_row(check, "[green]ok[/]" if ok else "[red]FAIL[/]", detail)
        console.print(view)
    if not all(ok for _, ok, _ in rows):
        raise typer.Exit(code=1)


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_cli

    return run_cli("prefill-router cluster", argv, {"start": _start, "stop": _stop, "status": _status, "env": _env},
                   "A private local Ray head on this machine.")
