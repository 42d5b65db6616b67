"""Fixtures of the serving tests."""

import os

import pytest

from tests.procs import free_port, local_ray
from tests.serving.serving_fixtures import TOKENS


@pytest.fixture(scope="package")
def serve_port():
    """One local 4-CPU Ray running Serve on a loopback port for the package's two Serve apps (test_serving_app,
    then test_serving_probe: each deploys its app there and deletes it after); its HTTP port. Ray starts once
    the apps' bearer tokens are in the env: the replicas inherit them (the auth tests use them)."""
    from ray import serve

    os.environ.update(TOKENS)
    port = free_port()
    cluster = local_ray(num_cpus=4)
    next(cluster)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
        serve.shutdown()
    finally:
        next(cluster, None)  # shuts that Ray down
