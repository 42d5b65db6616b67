"""Test-wide settings: Ray stays local and quiet; a session-scoped SmolLM2 load."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray: loopback only, no usage stats, no auth for the local test cluster, a private tmp dir.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
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
