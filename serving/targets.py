"""The per-target Serve deployment's body, around the backend the registry entry names.

The backends (transformers, OpenAI-compatible endpoints, vLLM) live in ``shared/targets/``,
one class each, behind :class:`shared.backends.TargetBackend`; labelling answers with the
same classes. :class:`TargetReplica` builds the entry's backend with
:func:`shared.backends.make_backend` and passes every call through.
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator

from serving.config import TargetLiveConfig
from serving.messages import StreamEnd, TargetAnswer
from shared.backends import BackendOptions, Sampling, make_backend
from shared.registry import ModelSpec


class TargetReplica:
    """The per-target Serve deployment's body."""

    def __init__(self, spec: dict[str, Any], timeout_s: float = 120.0):
        self.spec = ModelSpec.model_validate(spec)
        # vLLM is a GPU extra; without it transformers serves the weights
        self.backend = make_backend(self.spec, BackendOptions(purpose="serving", timeout_s=timeout_s))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve user-config update ``{"timeout_s": s}`` (in place): the bound on an endpoint call.
        Local backends have none of their own; the ingress cancels them at its timeout."""
        live = TargetLiveConfig.model_validate(user_config)
        self.backend.reconfigure(live.timeout_s)

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                       sampling: Sampling = Sampling()) -> TargetAnswer:
        return await self.backend.generate(messages, max_tokens, temperature, sampling)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     sampling: Sampling = Sampling()) -> AsyncIterator[str | StreamEnd]:
        async for piece in self.backend.stream(messages, max_tokens, temperature, sampling):
            yield piece

    def ready(self) -> dict[str, Any]:
        """Answers once the backend is loaded (the ingress's readiness check)."""
        return {"target": self.spec.name, "backend": self.spec.backend, "pid": os.getpid()}

    def stats(self) -> dict[str, int]:
        """Generations running now, finished, cancelled, and tokens generated (local backends)."""
        return dict(getattr(self.backend, "stats", {}))
