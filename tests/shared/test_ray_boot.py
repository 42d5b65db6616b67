"""``shared.ray_boot`` without starting Ray: which addresses are local, and a fast, clear failure."""

from __future__ import annotations

import os
import time

import pytest

from shared import ray_boot
from shared.ray_boot import RayConnectError, ensure_ray, is_loopback, resolve_target
from tests.procs import free_port


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.5", "192.0.2.2", "raycluster-head-svc", "0.0.0.0", "::"])
def test_other_hosts_are_remote(host):
    assert not is_loopback(host)


def test_resolve_target_follows_ray_address_like_ray_init(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_target(None).starts_local and resolve_target(None).local
    assert resolve_target("auto").local and not resolve_target("auto").starts_local
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    remote = resolve_target(None)
    assert (remote.host, remote.port, remote.source, remote.local) == ("10.1.2.3", 6379, "RAY_ADDRESS", False)
    assert resolve_target("local").starts_local  # an explicit "local" starts a new Ray, as ray.init does
    client = resolve_target("ray://127.0.0.1:10001")
    assert (client.host, client.port, client.local, client.source) == ("127.0.0.1", 10001, True, "argument")
    with pytest.raises(RayConnectError, match="malformed Ray address"):
        resolve_target("headnode")


def test_single_machine_mode_is_set_for_local_and_undone_for_remote(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    for key in ray_boot.LOCAL_ENV:
        monkeypatch.delenv(key, raising=False)
    ray_boot._single_machine_mode(local=True)  # what `import ray` before the env var left behind
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert all(os.environ[k] == v for k, v in ray_boot.LOCAL_ENV.items())
    ray_boot._single_machine_mode(local=False)  # a remote cluster must see this node's real address
    assert ray_constants.ENABLE_RAY_CLUSTER is True


def test_nothing_listening_is_a_clear_value_error_within_seconds(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is connected in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RayConnectError, match=f"no Ray cluster answers at {address}.*cluster start") as info:
        ensure_ray(address, connect_timeout_s=2)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConnectionError)
    assert time.monotonic() - t0 < 10 and not ray.is_initialized()


def test_cluster_gpus_stops_with_a_clear_error_when_the_gcs_never_answers(monkeypatch):
    """``ray.cluster_resources()`` has no timeout; a GCS that went away must not hang a job."""
    import threading

    import ray

    from shared.errors import ClusterUnreachable

    never = threading.Event()
    monkeypatch.setattr(ray, "cluster_resources", lambda: never.wait())  # blocks like a lost GCS
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="did not say what resources it has within 0 s"):
        ray_boot.cluster_gpus(timeout_s=0.3)
    assert time.monotonic() - start < 5
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    assert ray_boot.cluster_gpus() == 1.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert ray_boot.cluster_gpus() == 0.0
