"""Fixtures of the cluster tests."""

import pytest

from tests.procs import local_ray as start_local_ray


@pytest.fixture(scope="package")
def local_ray():
    """One local Ray for the package's in-process pipelines (RouterBench, RouterDC) and the held-out
    captures after them (none of them then starts its own): one start for both modules."""
    yield from start_local_ray(num_cpus=2)
