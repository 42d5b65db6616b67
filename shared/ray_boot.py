"""One Ray bootstrap for every entry point: ``ensure_ray(address)``.

Every command that needs Ray (label, capture, fit, pipeline, publish, serve, the demo, the
benches, the tests) calls :func:`ensure_ray` instead of its own ``ray.init`` block. It
decides two things that ``ray.init`` alone gets wrong on this project's machines:

Single-machine mode. A *local* address (none, ``"local"``, ``"auto"``, or a loopback
host such as ``127.0.0.1:6379``, given as the argument or through ``RAY_ADDRESS``) puts
Ray in single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): the node address is
127.0.0.1 and Ray's daemons listen on loopback. Without it, Ray rewrites a loopback
address to the machine's network address, and a head started on 127.0.0.1 (``prefill-router
cluster start``) is then unreachable: ``ray.init`` retries "Failed to connect to GCS"
forever. Ray reads that variable once, when ``ray`` is imported, so setting it in
``os.environ`` is not enough for a process that imported Ray already; see
:func:`_single_machine_mode`. A remote address never gets that mode: a KubeRay driver
must advertise its real address to the cluster.

Bounded connects. Before connecting, the GCS's TCP port is probed; nothing there gives
:class:`RayConnectError` (a ``ValueError``, so the CLIs print one line and exit 2).
``ray.init`` itself is bounded by a watchdog thread: Ray's C++ retry loop holds the main
thread (no timeout, no signal ends it), so after the bound the watchdog prints the reason
and ends the process with ``os._exit(2)``. Ray's own knobs
(``RAY_gcs_rpc_server_connect_timeout_s``, ``RAY_py_gcs_connect_timeout_s``) only shorten
each attempt; the loop still retries forever (checked with Ray 2.60).

A new local Ray gets a private temp dir under /tmp (removed at exit), no dashboard unless
asked, usage stats off: the same as ``prefill-router cluster start``.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.errors import ClusterUnreachable

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 60.0  # connect to a GCS that answers TCP
DEFAULT_START_TIMEOUT_S = 180.0  # start a new local Ray (2 busy CPUs: tens of seconds)
PROBE_TIMEOUT_S = 5.0  # how long the GCS port may take to accept a TCP connection
WATCHDOG_EXIT_CODE = 2  # what a command exits with for a user error (shared.cli_utils.user_errors)
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
HINT = ("start one with `prefill-router cluster start` (then `eval \"$(prefill-router cluster env)\"`), "
        "or check the address (RAY_ADDRESS, --address or ray_address)")


class RayConnectError(ClusterUnreachable, ValueError):
    """No Ray cluster answers at the address; the message says what to do (the CLIs exit 2)."""


@dataclass(frozen=True)
class RayTarget:
    """Where ``ray.init`` goes: ``address`` as it gets it, ``host``/``port`` when known."""

    address: str
    source: str  # "argument" or "RAY_ADDRESS"
    host: str | None = None
    port: int | None = None

    @property
    def starts_local(self) -> bool:
        """True when ``ray.init`` starts a new Ray in this process."""
        return self.address == "local"

    @property
    def local(self) -> bool:
        """True for a Ray on this machine: a new one, auto-detected, or a loopback address."""
        return self.host is None or is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8, ``::1`` (and IPv4-mapped loopback); hostnames are not resolved."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def resolve_target(address: str | None) -> RayTarget:
    """The address ``ray.init`` would use: the argument, else ``RAY_ADDRESS``, else a new local Ray."""
    source = "argument"
    env = os.environ.get("RAY_ADDRESS") or None
    if address in (None, "", "auto") and env:
        address, source = env, "RAY_ADDRESS"
    if address in (None, "", "local"):
        return RayTarget("local", source)
    if address == "auto":  # Ray's auto-detection only finds clusters of this machine
        return RayTarget("auto", source)
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectError(f"malformed Ray address {address!r} (from {source}): expected host:port, "
                              "'local' or 'auto'")
    return RayTarget(address, source, host.strip("[]"), int(port))


def _single_machine_mode(local: bool) -> None:
    """Make this process (and the Ray processes it starts) agree on single-machine mode.

    Ray computes ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at ``import ray``; the node address and the
    loopback rewrite (``services.get_node_ip_address`` / ``resolve_ip_for_localhost``) read
    that constant at call time. A process that imported Ray before this call (the CLI
    does, to build its commands) therefore keeps the import-time value whatever
    ``os.environ`` says now, so the constant itself is set too. The environment is set
    for the processes this one starts (raylet, workers), which import Ray afresh.
    """
    if local:
        os.environ.update(LOCAL_ENV)
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError("this Ray version has no ray._private.ray_constants.ENABLE_RAY_CLUSTER: "
                           "shared/ray_boot.py must learn how it now selects single-machine mode")
    if local and ray_constants.ENABLE_RAY_CLUSTER:
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif not local and not ray_constants.ENABLE_RAY_CLUSTER and not ray_constants.IS_WINDOWS_OR_OSX:
        # Single-machine mode would advertise 127.0.0.1 to a remote cluster, which cannot reach it.
        log.warning("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ignored for a remote Ray address")
        ray_constants.ENABLE_RAY_CLUSTER = True


def probe_gcs(target: RayTarget, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`RayConnectError` unless the target's port accepts TCP within ``timeout_s``."""
    if target.host is None or target.port is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((target.host, target.port), timeout=max(0.5, timeout_s / 5)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RayConnectError(f"no Ray cluster answers at {target.address} (from {target.source}: "
                                      f"{exc.strerror or exc}); {HINT}") from exc
            time.sleep(0.25)


@contextlib.contextmanager
def watchdog(seconds: float, message: str) -> Iterator[None]:
    """End the process with ``os._exit(2)`` and ``message`` unless the block finishes in ``seconds``.

    For calls that no exception or signal interrupts (Ray's C++ GCS retry loop)."""
    done = threading.Event()

    def bark() -> None:
        if not done.wait(seconds):
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            os._exit(WATCHDOG_EXIT_CODE)

    threading.Thread(target=bark, name="ray-boot-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _private_temp_dir() -> str:
    """A fresh temp dir for a new local Ray, removed (after Ray shuts down) when the process exits."""
    path = tempfile.mkdtemp(prefix="pr-ray-", dir="/tmp")  # short: Unix socket paths are limited

    def cleanup() -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(path, ignore_errors=True)

    atexit.register(cleanup)  # runs before Ray's own atexit shutdown (registered at import)
    return path


def ensure_ray(address: str | None = None, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
               start_timeout_s: float = DEFAULT_START_TIMEOUT_S, **init_kwargs: Any) -> bool:
    """Connect to (or start) Ray unless this process already is; True when this call did it.

    ``address``: ``None`` (``RAY_ADDRESS``, else a new local Ray), ``"local"`` (a new local
    Ray), ``"auto"`` or ``host:port`` / ``ray://host:port``. ``init_kwargs`` go to
    ``ray.init``. Raises :class:`RayConnectError` when nothing answers at the address; ends
    the process (exit 2) when ``ray.init`` does not return within the bound.
    """
    import ray

    if ray.is_initialized():
        return False
    target = resolve_target(address)
    _single_machine_mode(target.local)
    if target.starts_local:
        init_kwargs.setdefault("include_dashboard", False)
        if "_temp_dir" not in init_kwargs:
            init_kwargs["_temp_dir"] = _private_temp_dir()
        bound, what = start_timeout_s, "start a local Ray"
    else:
        probe_gcs(target, min(PROBE_TIMEOUT_S, connect_timeout_s))
        bound, what = connect_timeout_s, f"connect to the Ray cluster at {target.address} (from {target.source})"
    message = (f"could not {what} within {bound:.0f} s (Ray retries forever; something may answer there "
               f"that is not a reachable Ray GCS); {HINT}")
    log.info("ray.init(address=%s)%s", target.address, " (single-machine mode)" if target.local else "")
    with watchdog(bound, message):
        ray.init(address=target.address, **init_kwargs)
    return True


GCS_CALL_TIMEOUT_S = 60.0  # a GCS query on a connected cluster answers in milliseconds


def cluster_gpus(timeout_s: float = GCS_CALL_TIMEOUT_S) -> float:
    """The connected cluster's total GPUs, or :class:`ClusterUnreachable` after ``timeout_s``.

    ``ray.cluster_resources()`` has no timeout: with a GCS that went away it waits forever.
    The call runs in a daemon thread; when it does not answer in time the command stops with
    an error that says what to check instead of hanging."""
    import ray

    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["gpus"] = float(ray.cluster_resources().get("GPU", 0))
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=ask, name="ray-cluster-resources", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" in result:
        raise result["error"]
    if "gpus" not in result:
        raise ClusterUnreachable(f"the Ray cluster did not say what resources it has within {timeout_s:.0f} s "
                                 "(its GCS may have stopped); check `ray status` on the head, or restart it "
                                 "with `prefill-router cluster start`")
    return result["gpus"]
