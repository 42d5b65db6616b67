"""A Ray worker node whose view of one directory differs from the driver's, as a KubeRay pod's disk does.

Run as ``unshare -m sh -c 'mount -t tmpfs tmpfs DIR && exec python -m tests.multinode.own_disk_node ...'``:
the raylet and every worker it starts live in that mount namespace, where ``DIR`` is an empty tmpfs,
while the driver and the other nodes see the real ``DIR``. The node is started as
``ray.cluster_utils.Cluster.add_node`` starts one (``ray start --address`` refuses a multi-node
cluster in single-machine mode), and it stops with its processes on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gcs-address", required=True)
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--resources", default="{}", help="JSON custom resources")
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args(argv)

    import ray._private.node
    from ray._private.parameter import RayParams

    from shared.ray_boot import _single_machine_mode

    _single_machine_mode(True)
    params = RayParams(gcs_address=args.gcs_address, num_cpus=args.num_cpus, num_gpus=0,
                       resources=json.loads(args.resources), temp_dir=args.temp_dir, include_log_monitor=False,
                       node_manager_port=0, object_store_memory=150 * 1024 * 1024, min_worker_port=0,
                       max_worker_port=0)
    params.dashboard_agent_listen_port = None
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("node up", flush=True)
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
