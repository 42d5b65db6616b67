"""The state file of a private local Ray head, and which processes belong to it.

``prefill-router cluster start`` (:mod:`cluster.local`) records what it started in a state
file (GCS address, dashboard URL, temp and session dir, the process group id and the pids
with their start times) plus a marker file with the same random ``cluster_id`` inside the
temp dir. This module reads and writes those files and finds and stops the head's processes.

Safe stop. ``ray stop`` is machine-global: it kills every Ray process of the user by
name, including clusters other tools (or other test runs) started. So ``stop`` never
calls it. It stops only the process group recorded at start, and only after checking
that (1) the state file was written by ``cluster start`` (``owner`` and a ``cluster_id``
that matches the marker inside the recorded temp dir) and (2) a live member of that
group still belongs to the recorded session (its command line names the session dir,
or its pid *and* start time match a recorded one) -- so a reused process-group id can
never make it kill a stranger. Every Ray process of the head (GCS, raylet, dashboard
and its agents, workers) inherits the group of the ``ray start`` process; processes
whose command line names the session dir are included even if they left the group.
They get SIGTERM, then SIGKILL after ``stop_grace_s``.

Ray workers call ``setpgrp`` themselves, so the descendants of the group's members
are stopped too.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from shared.errors import UserError

OWNER = "prefill-router cluster start"
MARKER = "prefill-router-cluster.json"


class ClusterError(UserError, ValueError):
    """A cluster operation refused or failed; the message says why (the CLI exits 2)."""


def read_state(path: str | Path) -> dict[str, Any]:
    """The recorded state; refuses a missing file or one ``cluster start`` did not write."""
    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"no state file at {path}: no cluster started by `prefill-router cluster start` "
                           "is recorded there")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ClusterError(f"{path} is not a cluster state file ({exc}); refusing to act on it") from exc
    if not isinstance(state, dict) or state.get("owner") != OWNER:
        raise ClusterError(f"{path} was not written by `prefill-router cluster start`; refusing to act on it")
    return state


def verify_marker(state: dict[str, Any]) -> None:
    """The recorded temp dir must hold the marker with the same cluster id."""
    marker = Path(state.get("temp_dir", "")) / MARKER
    try:
        found = json.loads(marker.read_text()).get("cluster_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        found = None
    if not state.get("cluster_id") or found != state["cluster_id"]:
        raise ClusterError(f"the state file's cluster {state.get('cluster_id')!r} has no matching marker at "
                           f"{marker}: it does not describe a cluster this tool started; refusing to stop it")


def session_processes(state: dict[str, Any]) -> list:
    """Live processes of the recorded session (see the module docstring for the rule)."""
    import psutil

    pgid, session_dir = state["pgid"], state["session_dir"]
    recorded = {(p["pid"], round(p["create_time"], 2)) for p in state.get("pids", [])}
    members, named, proven = [], [], False
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            in_group = os.getpgid(proc.pid) == pgid
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        ours = session_dir in cmd or (proc.pid, round(proc.info["create_time"] or 0, 2)) in recorded
        if in_group:
            members.append(proc)
            proven = proven or ours
        elif session_dir in cmd:
            named.append(proc)
    found = {p.pid: p for p in (members if proven else []) + named}
    for proc in list(found.values()):  # workers run in their own process group, as children of the raylet
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def kill_processes(procs: list, grace_s: float) -> int:
    """SIGTERM ``procs``, the GCS last; SIGKILL what is left after ``grace_s``; returns how many survived both.

    The GCS goes last: a raylet or autoscaler monitor told to stop while the GCS is stopping
    too waits on it, and the GCS outlived the grace. Stopping a 2-CPU head took 12 s that way
    (SIGKILL after the 10 s grace), about 5 s with the GCS last."""
    import psutil

    def is_gcs(proc) -> bool:
        try:
            return proc.name() == "gcs_server"
        except psutil.Error:
            return False

    gcs = [p for p in procs if is_gcs(p)]
    deadline = time.monotonic() + grace_s
    left: list = []
    for group in ([p for p in procs if p not in gcs], gcs):
        _signal(group, signal.SIGTERM)
        left += psutil.wait_procs(group, timeout=max(0.1, deadline - time.monotonic()))[1]
    _signal(left, signal.SIGKILL)
    return len(psutil.wait_procs(left, timeout=5)[1])


def _signal(procs: list, sig: int) -> None:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            continue


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a temp file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def auth_headers(token_path: str | None) -> dict[str, str]:
    """``Authorization: Bearer <token>`` for a token-auth head (its dashboard, jobs and state APIs); {} without one."""
    return {"Authorization": "Bearer " + Path(token_path).read_text().strip()} if token_path else {}
