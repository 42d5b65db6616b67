"""Test-wide settings: Ray stays local and quiet; session-scoped SmolLM2 and Gemma-3 loads."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray: no usage stats, no auth for the local test cluster, a private tmp dir. Loopback-only
# (single-machine) mode is not set here: shared.ray_boot.ensure_ray sets it, as in production.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="pr-ray-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def registry():
    from shared.registry import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def smollm(registry):
    """The real SmolLM2-135M, loaded once per test session (converted on first use)."""
    from shared.models import load_causal_lm

    return load_causal_lm(registry.get("smollm2-135m"), device="cpu")


@pytest.fixture(scope="session")
def gemma(registry):
    """The real Gemma-3-270M, loaded once per test session (an Encoder never modifies the model it reads)."""
    from shared.models import load_causal_lm

    return load_causal_lm(registry.get("gemma3-270m"), device="cpu")


@pytest.fixture
def session_smollm(monkeypatch, smollm):
    """``load_causal_lm`` gives the session's SmolLM2 above for SmolLM2 on its device, so in-process Encoder
    replicas read it instead of loading a copy each (an Encoder never modifies the model it reads); any
    other model, device or dtype still loads."""
    import shared.models

    load = shared.models.load_causal_lm

    def load_once(spec, device=None, *args, **kwargs):
        same_device = (device or shared.models.default_device()) == smollm.device
        if spec == smollm.spec and same_device and not (args or kwargs):
            return smollm
        return load(spec, device, *args, **kwargs)

    monkeypatch.setattr(shared.models, "load_causal_lm", load_once)
    return smollm


@pytest.fixture(scope="module")
def moto_s3():
    """A loopback moto S3 server; its env is set before any Ray starts, so every Ray process has it.

    Yields the env (``AWS_ENDPOINT_URL`` and credentials); restores the old values after.
    """
    from moto.server import ThreadedMotoServer

    from tests.procs import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ray_cluster(moto_s3):
    """A local 2-CPU Ray for one test module (after moto's env is set, so workers reach S3)."""
    import ray

    from shared.ray_boot import ensure_ray

    ensure_ray("local", num_cpus=2, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
