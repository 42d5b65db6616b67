"""The ``openai`` backend: a model behind an OpenAI-compatible ``/chat/completions`` endpoint
(closed models, or another router).

The API key comes from the env var the registry entry names (``api_key_env``) and is never
logged. Every call is bounded by ``timeout_s`` (connect and read).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, AsyncIterator, Sequence

from shared.backends import (BackendOptions, Completion, InFlight, Sampling, StreamEnd, TargetAnswer,
                             TargetRequestError, register_backend)
from shared.registry import ModelSpec

log = logging.getLogger(__name__)
REQUEST_FAULTS = (400, 413, 422)  # an upstream endpoint's answers that the same request would get anywhere
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


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
              stream: bool | None = None, sampling: Sampling = Sampling()) -> dict[str, Any]:
    """A ``/chat/completions`` request body. ``stream=None`` leaves the field out (the endpoint's
    default, no streaming); a streamed request also asks for the usage in its last chunk. Stop
    strings and a seed are passed on (the endpoint honours them)."""
    body: dict[str, Any] = {"model": spec.remote_model or spec.name, "messages": messages,
                            "max_tokens": max_tokens, "temperature": temperature}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if stream is not None:
        body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


class RateLimiter:
    """At most ``rate`` calls per second: :meth:`wait` sleeps until the next slot."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep, self.next_at = 1.0 / rate, clock, sleep, 0.0

    def wait(self) -> None:
        now = self.clock()
        if now < self.next_at:
            self.sleep(self.next_at - now)
            now = self.next_at
        self.next_at = now + self.interval


def backoff_delay(attempt: int, base: float, cap: float, retry_after: str | None = None) -> float:
    """Delay before retry ``attempt`` (0-based): ``Retry-After`` when given, else ``base * 2**attempt``."""
    if retry_after:
        try:
            return min(cap, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP-date Retry-After: fall back to exponential backoff
    return min(cap, base * (2 ** attempt))


class EndpointError(RuntimeError):
    """The endpoint did not answer after all retries (or answered a non-retryable error)."""


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


@register_backend("openai")
class OpenAIBackend:
    """An OpenAI-compatible endpoint.

    Serving (an ``httpx.AsyncClient``): a cancelled call closes its connection, so the endpoint
    sees the client go. An answer of 400/413/422 is a fault of the request
    (:class:`TargetRequestError`, not retried elsewhere); any other failure is the target's (the
    ingress falls back). Labelling (an ``httpx.Client``): one request at a time, retried on
    transport errors and 408/429/5xx with exponential backoff, at most ``requests_per_s``.
    """

    remote = True

    def __init__(self, spec: ModelSpec, options: BackendOptions | None = None):
        import httpx

        self.spec, self.options = spec, options or BackendOptions()
        self.model = spec.remote_model or spec.name
        client = httpx.AsyncClient if self.options.purpose == "serving" else httpx.Client
        self.client = client(**openai_client_kwargs(spec, self.options.timeout_s))
        rate = self.options.requests_per_s
        self.limiter = RateLimiter(rate) if rate else None
        self.inflight = InFlight()

    # ------------------------------------------------------------------ serving
    async def _check(self, resp: Any) -> None:
        if resp.status_code in REQUEST_FAULTS:
            await resp.aread()
            raise TargetRequestError(resp.status_code, f"{self.spec.name} refused the request: {_detail(resp)}")
        resp.raise_for_status()

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                       sampling: Sampling = Sampling()) -> TargetAnswer:
        start = time.perf_counter()
        with self.inflight.track():
            body = chat_body(self.spec, messages, max_tokens, temperature, False, sampling)
            resp = await self.client.post("/chat/completions", json=body)
            await self._check(resp)
        body = resp.json()
        usage = body.get("usage") or {}
        choice = body["choices"][0]
        return TargetAnswer(choice["message"]["content"], int(usage.get("prompt_tokens", 0)),
                            int(usage.get("completion_tokens", 0)), choice.get("finish_reason") or "stop",
                            time.perf_counter() - start)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     sampling: Sampling = Sampling()) -> AsyncIterator[str | StreamEnd]:
        body = chat_body(self.spec, messages, max_tokens, temperature, True, sampling)
        finish, usage, start = "stop", {}, time.perf_counter()
        with self.inflight.track():
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
        yield StreamEnd(finish, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                        time.perf_counter() - start)

    def cancel(self) -> int:
        return self.inflight.cancel()

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """Unknown here: the endpoint's tokenizer counts (its answer's ``usage``)."""
        return None

    def reconfigure(self, timeout_s: float) -> None:
        """The bound on one endpoint call (connect and read), changed in place."""
        self.client.timeout = timeout_s

    async def close(self) -> None:
        self.cancel()
        if self.options.purpose == "serving":
            await self.client.aclose()
        else:
            self.client.close()

    # ------------------------------------------------------------------ labelling
    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """One completion, retried on transport errors and 408/429/5xx; raises :class:`EndpointError`."""
        import httpx

        body, retries = chat_body(self.spec, messages, max_tokens, 0.0), self.options.max_retries
        error = "no attempt"
        for attempt in range(retries + 1):
            if self.limiter:
                self.limiter.wait()
            retry_after = None
            try:
                resp = self.client.post("/chat/completions", json=body)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return resp.json()
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRYABLE_STATUS:
                    break
                retry_after = resp.headers.get("retry-after")
            if attempt < retries:
                time.sleep(backoff_delay(attempt, self.options.backoff_s, self.options.backoff_max_s, retry_after))
        raise EndpointError(f"{self.spec.name} at {self.spec.base_url}: {error} (after {attempt + 1} attempts)")

    def _complete_one(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        start = time.perf_counter()
        try:
            body = self.chat(list(messages), max_tokens)
            text = body["choices"][0]["message"]["content"] or ""
        except (EndpointError, KeyError, IndexError, TypeError, ValueError) as exc:
            return Completion(None, None, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
        latency = time.perf_counter() - start
        usage = body.get("usage") or {}
        return Completion(text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), latency)

    def complete(self, chats: Sequence[list[dict[str, str]]], max_tokens: int) -> list[Completion]:
        """One request per chat, in order; a request that fails after its retries is that row's error."""
        return [self._complete_one(messages, max_tokens) for messages in chats]

    def option_scores(self, rows: Sequence[dict[str, Any]], mode: str) -> None:
        """An endpoint gives no log-probabilities here: multiple choice is answered as text."""
        return None
