"""The HTTP face of the router: OpenAI-compatible endpoints over deployment handles.

:class:`RouterIngress` is a plain class: it holds handles to the encoder, the router
head and one handle per target (Ray Serve ``DeploymentHandle``s in production; any
object whose ``method.remote(...)`` returns an awaitable works), validates requests,
routes, falls back on failure and records metrics. ``build_app`` turns it into the
ingress deployment with :func:`make_fastapi_app`.

Errors: malformed JSON or fields -> 400/422, unknown model -> 404, oversize prompt ->
413, missing/bad bearer token -> 401; a failing target falls back to the next eligible
one; 502 only when every target failed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from serving.config import IngressConfig
from serving.metrics import RouterMetrics
from serving.schemas import (
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, RouteDecision, RouteRequest, Usage, chunk,
    parse_model_field,
)

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """The prompt has more tokens than the router accepts."""


class AllTargetsFailed(RuntimeError):
    pass


def counted(endpoint: str):
    """Count each call of an endpoint method by HTTP status in ``self.metrics.requests``."""

    def wrap(fn):
        @functools.wraps(fn)
        async def inner(self, *args, **kwargs):
            status = 500
            try:
                response = await fn(self, *args, **kwargs)
                status = response.status_code
                return response
            except HTTPException as exc:
                status = exc.status_code
                raise
            finally:
                self.metrics.requests.labels(endpoint, str(status)).inc()

        return inner

    return wrap


def _reason(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


class RouterIngress:
    """Request handling shared by every endpoint (no Ray or HTTP server needed to test it)."""

    def __init__(self, config: dict[str, Any], encoder: Any, head: Any, targets: dict[str, Any]):
        self.cfg = IngressConfig.model_validate(config)
        self.encoder, self.head, self.targets = encoder, head, dict(targets)
        self.metrics = RouterMetrics.create()
        self.token = os.environ.get(self.cfg.auth_token_env) if self.cfg.auth_token_env else None

    # ------------------------------------------------------------------ helpers
    def check_auth(self, request: Request) -> None:
        if self.token is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.token}":
            raise HTTPException(401, "missing or invalid bearer token")

    async def parse(self, request: Request, model: type) -> Any:
        self.check_auth(request)
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPException(400, "request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise HTTPException(422, _reason(exc)) from exc

    async def decide(self, messages: list[dict[str, str]], tolerance: float | None) -> RouteDecision:
        """Encoder + head: the routing decision for one prompt."""
        start = time.perf_counter()
        try:
            features = await self.encoder.encode.remote(messages)
        except Exception as exc:  # noqa: BLE001 - a Ray error wraps the replica's exception
            if "PromptTooLong" in type(exc).__name__ or "PromptTooLong" in str(exc):
                raise HTTPException(413, str(exc).splitlines()[-1]) from exc
            raise
        decision = await self.head.decide.remote(features, tolerance)
        decision = RouteDecision.model_validate(decision)
        decision.overhead_ms = (time.perf_counter() - start) * 1000
        self.metrics.overhead.observe(decision.overhead_ms / 1000)
        self.metrics.decisions.labels(decision.target).inc()
        return decision

    def fallback_order(self, decision: RouteDecision | None, pinned: str | None) -> list[str]:
        """The chosen (or pinned) target first, then the other eligible ones, then the rest by P(correct)."""
        if decision is None:
            return [pinned] + [t for t in self.targets if t != pinned]
        rest = sorted(self.targets, key=lambda t: -decision.probabilities.get(t, 0.0))
        order = [decision.target, *decision.eligible, *rest]
        return list(dict.fromkeys(t for t in order if t in self.targets))

    async def answer(self, order: list[str], req: ChatCompletionRequest) -> tuple[str, dict[str, Any], list[str]]:
        """Ask targets in order until one answers; returns (target, result, failed targets)."""
        failed: list[str] = []
        max_tokens = req.answer_tokens or self.cfg.default_max_tokens
        for name in order:
            start = time.perf_counter()
            try:
                result = await asyncio.wait_for(
                    self.targets[name].generate.remote(req.plain_messages(), max_tokens, req.temperature or 0.0),
                    timeout=self.cfg.target_timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - any target failure means: try the next one
                log.warning("target %s failed: %s", name, str(exc).splitlines()[-1] if str(exc) else type(exc))
                self.metrics.errors.labels("target").inc()
                failed.append(name)
                continue
            self.metrics.target_latency.labels(name).observe(time.perf_counter() - start)
            for bad in failed:
                self.metrics.fallbacks.labels(bad, name).inc()
            return name, result, failed
        raise AllTargetsFailed(f"every target failed: {failed}")

    def _plan(self, req: ChatCompletionRequest) -> tuple[str | None, float | None]:
        try:
            pinned, tol = parse_model_field(req.model, list(self.targets), -1.0)
        except ValueError as exc:
            raise HTTPException(404, str(exc)) from exc
        tolerance = req.tolerance if req.tolerance is not None else (None if tol < 0 else tol)
        return pinned, tolerance

    # ---------------------------------------------------------------- endpoints
    @counted("chat_completions")
    async def chat_completions(self, request: Request) -> Response:
        req = await self.parse(request, ChatCompletionRequest)
        pinned, tolerance = self._plan(req)
        decision = None if pinned else await self.decide(req.plain_messages(), tolerance)
        order = self.fallback_order(decision, pinned)
        if req.stream:
            return await self._stream(order, req, decision)
        try:
            target, result, failed = await self.answer(order, req)
        except AllTargetsFailed as exc:
            raise HTTPException(502, str(exc)) from exc
        body = ChatCompletionResponse(
            model=target,
            choices=[ChatChoice(message={"role": "assistant", "content": result["text"]},
                                finish_reason=result.get("finish_reason", "stop"))],
            usage=Usage(prompt_tokens=result.get("prompt_tokens", 0), completion_tokens=result.get("completion_tokens", 0),
                        total_tokens=result.get("prompt_tokens", 0) + result.get("completion_tokens", 0)),
            route=decision,
        )
        return JSONResponse(body.model_dump(mode="json"), headers=self._headers(target, decision, failed))

    def _headers(self, target: str, decision: RouteDecision | None, failed: list[str]) -> dict[str, str]:
        headers = {"x-prefill-router-target": target}
        if decision is not None:
            headers["x-prefill-router-overhead-ms"] = f"{decision.overhead_ms:.2f}"
        if failed:
            headers["x-prefill-router-fallback-from"] = ",".join(failed)
        return headers

    async def _stream(self, order: list[str], req: ChatCompletionRequest, decision: RouteDecision | None) -> Response:
        """Stream from the first target that yields; a target failing before its first token falls back."""
        max_tokens = req.answer_tokens or self.cfg.default_max_tokens
        failed: list[str] = []
        for name in order:
            gen = self.targets[name].options(stream=True).stream.remote(
                req.plain_messages(), max_tokens, req.temperature or 0.0)
            try:
                first = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.target_timeout_s)
            except StopAsyncIteration:
                first = ""
            except Exception as exc:  # noqa: BLE001 - fall back to the next target
                log.warning("target %s failed before streaming: %s", name, exc)
                self.metrics.errors.labels("target").inc()
                failed.append(name)
                continue
            for bad in failed:
                self.metrics.fallbacks.labels(bad, name).inc()
            return StreamingResponse(self._sse(name, first, gen, decision), media_type="text/event-stream",
                                     headers=self._headers(name, decision, failed))
        raise HTTPException(502, f"every target failed: {failed}")

    async def _sse(self, target: str, first: str, gen: Any, decision: RouteDecision | None) -> AsyncIterator[str]:
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        extra = {"route": decision.model_dump(mode="json")} if decision else None
        yield f"data: {json.dumps(chunk(cid, target, {'role': 'assistant', 'content': first}, extra=extra))}\n\n"
        try:
            async for piece in gen:
                yield f"data: {json.dumps(chunk(cid, target, {'content': piece}))}\n\n"
        except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
            self.metrics.errors.labels("stream").inc()
            yield f"data: {json.dumps({'error': {'message': f'target {target} failed mid-stream: {exc}'}})}\n\n"
        yield f"data: {json.dumps(chunk(cid, target, {}, finish_reason='stop'))}\n\n"
        yield "data: [DONE]\n\n"

    @counted("route")
    async def route(self, request: Request) -> Response:
        req = await self.parse(request, RouteRequest)
        decision = await self.decide(req.plain_messages(), req.tolerance)
        return JSONResponse(decision.model_dump(mode="json"), headers={"x-prefill-router-target": decision.target})

    @counted("models")
    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        names = ["router", *self.targets]
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "prefill-router"}
                                                         for n in names]})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "targets": list(self.targets)})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


ROUTES = [
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/route", "route"),
    ("GET", "/v1/models", "models"),
    ("GET", "/healthz", "healthz"),
    ("GET", "/metrics", "prometheus"),
]


def _endpoint(name: str, get_ingress: Callable[[], RouterIngress]) -> Callable:
    async def endpoint(request: Request) -> Response:
        return await getattr(get_ingress(), name)(request)

    endpoint.__name__ = name
    return endpoint


def make_fastapi_app(get_ingress: Callable[[], RouterIngress]) -> FastAPI:
    """A FastAPI app whose routes call the :class:`RouterIngress` that ``get_ingress()`` returns.

    In Serve, ``get_ingress`` returns the replica's own instance (see ``serving.app``);
    without Serve, any instance: ``make_fastapi_app(lambda: ingress)``.
    """
    app = FastAPI(title="prefill-router", version="1")
    for method, path, name in ROUTES:
        app.add_api_route(path, _endpoint(name, get_ingress), methods=[method])
    return app
