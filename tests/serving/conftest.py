"""Fixtures of the serving tests."""

import os

import pytest

from tests.procs import local_ray
from tests.serving.serving_fixtures import TOKENS


@pytest.fixture(scope="package")
def serve_ray():
    """One local 4-CPU Ray for the package's two Serve apps (test_serving_app, then test_serving_probe: each
    starts Serve on it and shuts Serve down after), started once the apps' bearer tokens are in the env."""
    os.environ.update(TOKENS)  # before Ray starts: the replicas inherit them (the auth tests use them)
    yield from local_ray(num_cpus=4)

