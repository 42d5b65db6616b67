"""Fixtures of the cluster tests."""

import pytest


@pytest.fixture
def local_ray():
    """One local Ray for a pipeline and the held-out capture after it (neither then starts its own)."""
    import ray

    from shared.ray_boot import ensure_ray

    started = ensure_ray("local", num_cpus=2, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
