"""Backend choice and OpenAI-compatible client settings, shared by labelling and serving.

This module is the one owner of two decisions that labelling
(:func:`training.label.backends.make_scorer`) and serving
(:func:`serving.targets.make_target`) both make for a registry entry:

- :func:`resolve_backend`: which backend actually runs it. ``vllm`` is used only where
  vLLM is installed; elsewhere the same weights run with transformers (with a warning).
- :func:`openai_client_kwargs` and :func:`chat_body`: how an OpenAI-compatible endpoint
  is called: base URL, the ``authorization: Bearer`` header from the env var the registry
  names (the key is never logged), the timeout, and the ``/chat/completions`` request body.

Nothing here has import-time side effects; optional dependencies are looked up lazily.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from shared.registry import Backend, ModelSpec

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether vLLM is installed (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(spec: ModelSpec, purpose: str = "labelling") -> Backend:
    """The backend that runs ``spec``: its own, except ``vllm`` without vLLM installed, which
    becomes ``transformers`` (logging one warning that says ``purpose`` goes on with transformers)."""
    if spec.backend != Backend.vllm or vllm_available():
        return spec.backend
    log.warning("%s: vllm is not installed; %s with transformers instead", spec.name, purpose)
    return Backend.transformers


def auth_headers(spec: ModelSpec) -> dict[str, str]:
    """The ``authorization: Bearer`` header from ``spec.api_key_env``; empty (with a warning when
    the env var is named but unset) where there is no key."""
    key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
    if key:
        return {"authorization": f"Bearer {key}"}
    if spec.api_key_env:
        log.warning("%s: env var %s is not set; calling the endpoint without a key", spec.name, spec.api_key_env)
    return {}


def openai_client_kwargs(spec: ModelSpec, timeout_s: float) -> dict[str, Any]:
    """Keyword arguments of an ``httpx.Client``/``AsyncClient`` for the entry's endpoint."""
    return {"base_url": spec.base_url.rstrip("/"), "headers": auth_headers(spec), "timeout": timeout_s}


def chat_body(spec: ModelSpec, messages: list[dict[str, str]], max_tokens: int, temperature: float,
              stream: bool | None = None) -> dict[str, Any]:
    """A ``/chat/completions`` request body. ``stream=None`` leaves the field out (the endpoint's
    default, no streaming); a streamed request also asks for the usage in its last chunk."""
    body: dict[str, Any] = {"model": spec.remote_model or spec.name, "messages": messages,
                            "max_tokens": max_tokens, "temperature": temperature}
    if stream is not None:
        body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
