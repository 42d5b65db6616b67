"""Fixtures of the training tests: one loopback S3 and one local Ray for the whole package.

Capture, fit and label each ran a Ray of their own (a start and a shutdown per module, and fresh
Ray Data and Ray Train system actors each time); they share one now. The tests that kill a driver
kill the one they started (its workers go with it), never this cluster.
"""

import pytest

from tests.procs import local_ray, moto_env


@pytest.fixture(scope="package")
def moto_s3():
    """One loopback S3 for the package, its env set before the package's Ray starts (its workers reach it)."""
    yield from moto_env()


@pytest.fixture(scope="package")
def ray_cluster(moto_s3):
    """A local 2-CPU Ray for the package's Ray tests (capture, fit, label); its GCS address."""
    yield from local_ray(num_cpus=2)
