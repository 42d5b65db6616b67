"""Test-wide settings: Ray stays local and quiet; session-scoped SmolLM2 and Gemma-3 loads; a module's loopback S3."""

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
# Ray Train's controller polls its workers every 2 s, so each fit ended up to 2 s after its workers did (a
# dozen fits in the suite). Ray Train passes the setting on from the driver to its controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


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
    """A loopback moto S3 server for one module (``tests.procs.moto_env``)."""
    from tests.procs import moto_env

    yield from moto_env()
