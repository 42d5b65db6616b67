"""Paths that every node of a Ray cluster must reach: a stage's output, when Ray workers write it.

Label and capture send every result back to the driver, which writes the shards, so their output
may be any path the driver reaches. Fit's checkpoints are written by the Ray Train workers,
wherever Ray places them. On one node any path works. On a KubeRay cluster every worker pod has
its own disk: a local path there is a different directory on each node, and what a worker writes
never reaches the driver (a resumed run starts over, or fails to load its checkpoint). So before
such a stage starts any work, :func:`require_reachable` checks the path:

- a remote URI (``s3://``) is shared by construction;
- a cluster with one node that can run work needs nothing;
- otherwise the driver writes a marker file holding a random token under the path, and a
  zero-CPU task pinned to each alive node that can run work reads it back. Every node seeing the
  token proves the path is shared (an NFS or PVC mount, or nodes of one machine); a node that
  cannot see it makes the stage fail at once, naming the nodes and what to use instead.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from shared.errors import ClusterUnreachable, ConfigError
from shared.storage import is_s3

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 60.0  # a task on each node (a worker process start) answers in seconds
MARKER_PREFIX = ".prefill-router-reach-"


def _sees(marker: str, token: str) -> bool:
    """On a node: whether ``marker`` exists there and holds ``token``."""
    try:
        return Path(marker).read_text() == token
    except OSError:
        return False


def working_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster that can run a stage's actors (CPU or GPU > 0)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")
            and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def blind_nodes(path: str, nodes: list[dict[str, Any]],
                timeout_s: float = REACH_TIMEOUT_S) -> tuple[list[str], list[str]]:
    """``(unseeing, silent)``: the nodes of ``nodes`` that do not see a marker the driver writes under the
    local directory ``path`` (created if missing; the marker is removed after), and those that did not
    answer within ``timeout_s``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = root / f"{MARKER_PREFIX}{token}"
    marker.write_text(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker), token)
            for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for ref in set(refs.values()) - set(ready):
            ray.cancel(ref, force=True)
        silent = [node for node, ref in refs.items() if ref not in ready]
        return [node for node, ref in refs.items() if ref in ready and not ray.get(ref)], silent
    finally:
        marker.unlink(missing_ok=True)


def require_reachable(uri: str, what: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise :class:`ConfigError` unless every node of the connected Ray cluster that can run work
    reaches ``uri`` (``what``: the setting that names it, for the message). Call after Ray is up."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_s3(uri) or "://" in uri:
        return
    nodes = working_nodes()
    if len(nodes) <= 1:
        return
    try:
        unseeing, silent = blind_nodes(uri, nodes, timeout_s)
    except OSError as exc:
        raise ConfigError(f"{what}={uri!r}: cannot write a marker there to check that every node reaches it "
                          f"({exc})") from exc
    lines = "; ".join([f"{node} does not see {Path(uri).resolve()}" for node in unseeing]
                      + [f"{node} did not answer within {timeout_s:.0f} s" for node in silent])
    if unseeing:
        raise ConfigError(f"{what}={uri!r} is a local path, and {len(unseeing) + len(silent)} of the cluster's "
                          f"{len(nodes)} nodes cannot see it ({lines}): what their workers write there never "
                          "reaches this driver. Use an s3:// URI, or a path every node mounts (a shared volume "
                          "on KubeRay)")
    if silent:
        raise ClusterUnreachable(f"{what}={uri!r}: no answer from {lines} while checking that every node "
                                 "reaches the path; check `ray status`")
    log.info("%s=%s is reached by all %d nodes", what, uri, len(nodes))
