"""TargetReplica passes every call to the backend the registry entry names, whatever its class."""

from __future__ import annotations

import asyncio

import pytest

from shared import backends
from shared.backends import StreamEnd, TargetAnswer


@pytest.fixture
def echo(monkeypatch):
    """A backend registered for this test only (a new backend is one class like this one)."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._discover()))

    @backends.register_backend("echo")
    class Echo:
        def __init__(self, spec, options):
            self.spec, self.options, self.bounds = spec, options, []

        async def generate(self, messages, max_tokens, temperature, sampling):
            return TargetAnswer(messages[-1]["content"], 1, 1, "stop")

        async def stream(self, messages, max_tokens, temperature, sampling):
            yield messages[-1]["content"]
            yield StreamEnd("stop", 1, 1)

        def reconfigure(self, timeout_s):
            self.bounds.append(timeout_s)

    return Echo


def test_the_replica_builds_the_entrys_backend_and_passes_calls_through(echo):
    from serving.targets import TargetReplica

    replica = TargetReplica({"name": "e", "role": "target", "source": "hf", "hf_id": "x", "backend": "echo"}, 45)
    assert isinstance(replica.backend, echo) and replica.backend.options.timeout_s == 45
    assert replica.backend.options.purpose == "serving"
    msgs = [{"role": "user", "content": "hi"}]

    async def run():
        return await replica.generate(msgs, 4, 0.0), [p async for p in replica.stream(msgs, 4, 0.0)]

    assert asyncio.run(run()) == (TargetAnswer("hi", 1, 1, "stop"), ["hi", StreamEnd("stop", 1, 1)])
    replica.reconfigure({"timeout_s": 3})
    with pytest.raises(ValueError, match="timeout_s"):
        replica.reconfigure({"timeout_s": 0})
    assert replica.backend.bounds == [3.0]
    assert replica.ready()["backend"] == "echo" and replica.stats() == {}
