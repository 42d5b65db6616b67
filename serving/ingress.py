"""The HTTP face of the router: OpenAI-compatible endpoints over deployment handles.

:class:`RouterIngress` is a plain class: it holds handles to the encoder, the router
head and one handle per target (Ray Serve ``DeploymentHandle``s in production; any
object whose ``method.remote(...)`` returns an awaitable works), validates requests,
routes, falls back on failure and records metrics. ``build_app`` turns it into the
ingress deployment with :func:`serving.http_app.make_fastapi_app`.

With ``decision_log`` set, every request that got as far as a model and a policy leaves one
record (``serving.decision_log``; its id is the response's ``id`` and ``x-prefill-router-request-id`` header),
and ``POST /v1/feedback`` scores an answer by that id. With ``exploration.epsilon`` above 0 a
routed request may go to another eligible target (``serving.exploration``), its propensity logged.

Errors (JSON bodies with ``detail`` and an OpenAI-style ``error``): not JSON -> 415/400,
text that is not valid Unicode (a lone surrogate, anywhere in the body) -> 400, bad fields
-> 422, a field the router cannot honour (``n`` over 1, ``tools``, ...: see ``serving.schemas``)
-> 400 naming it, unknown model or path -> 404, wrong method -> 405, body over
``max_body_bytes`` or prompt over ``max_prompt_tokens`` (checked on every path, pinned requests
included, before any target sees it) -> 413, missing/bad bearer token -> 401 (on /healthz,
/readyz and /metrics too with ``auth_probes``; by default they stay open for probes and
scrapers). A target that fails or times out is cancelled and the next eligible one answers; a
fault of the request itself is never retried elsewhere; a target whose replicas all died is
passed over at once; 502 only when every target failed. When the encoder or router head fails
(or has no live replica left: its call fails at once rather than waiting for a replacement,
:func:`serving.faults.bounded`), routed requests go to ``fallback_target`` (marked
``x-prefill-router-degraded``) or get a JSON 503. ``/healthz`` is liveness; ``/readyz`` is 200
only when the encoder, the head and at least one target answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving.config import IngressConfig, auth_token
from serving.decision_log import RequestLog, logged
from serving.exploration import explore
from serving.faults import AllTargetsFailed, EncoderFailedOnPrompt, RouterUnavailable, bounded, counted, warm
from serving.messages import (
    EncodeFailed, PromptRejected, PromptTooLong, TargetAnswer, error_line, request_fault, surely_within,
)
from serving.metrics import RouterMetrics
from serving.schemas import (
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, FeedbackRequest, RouteDecision, RouteRequest,
    UnknownModel, Usage, lone_surrogate, parse_model_field,
)
from serving.streaming import stream_response
from shared.decision_log import FeedbackRecord
from shared.policy import Policy, Tolerance

log = logging.getLogger(__name__)


DECISION_SERVICE = ("this router is a decision service: it serves no target (config `targets: []`). POST the same "
                    "body to /v1/route, which answers which model to call and why, and call that model's provider")


def _reason(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


class RouterIngress:
    """Request handling shared by every endpoint (no Ray or HTTP server needed to test it)."""

    def __init__(self, encoder: Any, head: Any, targets: dict[str, Any], config: dict[str, Any] | None = None):
        self.encoder, self.head, self.targets = encoder, head, dict(targets)
        for handle in (encoder, head, *self.targets.values()):
            warm(handle)  # each router hears its replicas now: one that dies before its first call is known dead
        self.metrics = RouterMetrics.create()
        self.cfg, self.request_log = None, RequestLog.off()
        self.reconfigure(config or {})

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (SIGTERM, scale-down, redeploy): write the log's buffer."""
        self.request_log.close()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply an :class:`IngressConfig` (Serve's ``user_config``: in place, no restart). A bad
        one (a fallback that is not served, an unset token variable) raises and changes nothing."""
        cfg = IngressConfig.model_validate(config)
        if cfg.fallback_target and cfg.fallback_target not in self.targets:
            raise ValueError(f"fallback_target {cfg.fallback_target!r} is not served ({list(self.targets)})")
        token = auth_token(cfg.auth_token_env)
        old, self.cfg, self.token = self.cfg, cfg, token
        if old is None or old.exploration.seed != cfg.exploration.seed:
            self.rng = random.Random(cfg.exploration.seed)
        if old is None or old.decision_log != cfg.decision_log:  # a new log: the old one's buffer is written first
            self.request_log.close()
            self.request_log = RequestLog(cfg.decision_log, self.metrics.log_dropped)

    # ------------------------------------------------------------------ request checks
    def check_auth(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise HTTPException(401, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": 'Bearer realm="prefill-router"'})

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past ``max_body_bytes`` (never read whole into memory)."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {declared} bytes is over the limit of {limit}")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        return bytes(body)

    async def parse(self, request: Request, model: type) -> Any:
        self.check_auth(request)
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise HTTPException(415, f"content-type must be application/json, not {ctype or 'missing'!r}")
        try:
            body = json.loads(await self.read_body(request) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPException(400, "request body must be a JSON object")
        if where := lone_surrogate(body):
            raise HTTPException(400, f"{where}: text with a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                     "escape) is not valid Unicode; send UTF-8 text")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise HTTPException(422, _reason(exc)) from exc

    def plan(self, req: ChatCompletionRequest | RouteRequest) -> tuple[str | None, Policy | None]:
        """(pinned target or None, routing rule or None for the artifact's) of a request: its
        rule (``req.rule``: a key named after a policy, e.g. ``value`` or ``tolerance``), else the
        model suffix's tolerance (``router:0.1``), else the configured default rule."""
        try:
            pinned, tol = parse_model_field(req.model, list(self.targets))
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, f"model: {exc}") from exc
        suffix = None if tol is None else Tolerance(tol)
        if suffix is not None and req.rule is not None and req.rule.name != suffix.name:
            raise HTTPException(422, f"model: {req.model!r} sets a tolerance and the request a {req.rule.name}; "
                                     "give one routing policy")
        return pinned, next((r for r in (req.rule, suffix, self.cfg.default_rule()) if r is not None), None)

    async def check_length(self, messages: list[dict[str, str]]) -> None:
        """``max_prompt_tokens`` on a path that skips the encoder's forward pass (pinned, degraded)."""
        limit = self.cfg.max_prompt_tokens
        if surely_within(messages, limit):
            return
        try:
            count = await bounded(self.encoder.count_tokens.remote(messages), self.cfg.route_timeout_s, self.encoder,
                                  "encoder")
        except Exception as exc:  # noqa: BLE001 - the encoder is down or slow: the limit cannot be checked
            raise HTTPException(503, f"cannot check the prompt against the limit of {limit} tokens: the encoder "
                                     f"is unavailable ({type(exc).__name__}); retry shortly",
                                headers={"Retry-After": "5"}) from exc
        if isinstance(count, PromptRejected):
            self.metrics.errors.labels("request").inc()
            raise HTTPException(400, count.reason)
        if refusal := count.refusal():
            raise HTTPException(413, refusal.reason)

    # ------------------------------------------------------------------ routing
    async def decide(self, messages: list[dict[str, str]], rule: Policy | None) -> RouteDecision:
        """Encoder + head: the routing decision for one prompt (413 for a prompt over the limit;
        :class:`RouterUnavailable` when either deployment fails or times out)."""
        start = time.perf_counter()
        try:
            encoded = await bounded(self.encoder.encode.remote(messages), self.cfg.route_timeout_s, self.encoder,
                                    "encoder")
            if isinstance(encoded, PromptTooLong):
                raise HTTPException(413, encoded.reason)
            if isinstance(encoded, PromptRejected):
                self.metrics.errors.labels("request").inc()
                raise HTTPException(400, encoded.reason)
            if isinstance(encoded, EncodeFailed):
                raise EncoderFailedOnPrompt(encoded)
            self.metrics.count_prefix(encoded.prefix)
            decision = await bounded(self.head.decide.remote(encoded, rule), self.cfg.route_timeout_s, self.head,
                                     "router head")
        except HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - a dead, failing or slow encoder/head: never a bare 500
            log.warning("router unavailable (%s): %s", type(exc).__name__, error_line(exc))
            self.metrics.errors.labels("router").inc()
            raise RouterUnavailable(exc) from exc
        decision = decision.model_copy()
        decision.overhead_ms = (time.perf_counter() - start) * 1000
        self.metrics.overhead.observe(decision.overhead_ms / 1000)
        self.metrics.decisions.labels(decision.target).inc()
        if decision.novel:
            self.metrics.novel.inc()
        return decision

    async def decide_or_degrade(self, messages: list[dict[str, str]],
                                rule: Policy | None) -> tuple[RouteDecision | None, str | None]:
        """(decision, None), or (None, why) when the router failed and ``fallback_target`` answers."""
        try:
            return await self.decide(messages, rule), None
        except RouterUnavailable as exc:
            if not self.cfg.fallback_target:
                raise exc.http(" and no fallback_target is configured") from exc
            why = f"router unavailable ({exc.kind})"
        await self.check_length(messages)
        return None, why

    def explored(self, decision: RouteDecision, trail: Any, served: Any) -> RouteDecision:
        """The decision, its target replaced where exploration says so; both go into the request's trail."""
        went = explore(decision, served, self.cfg.exploration, self.rng)
        trail.decided(decision, went)
        return decision if not went.explored else decision.model_copy(update={"target": went.target})

    def fallback_order(self, decision: RouteDecision | None, pinned: str | None) -> list[str]:
        """The chosen (or pinned, or fallback) target first, then the other eligible ones, then the rest."""
        first = pinned or (decision.target if decision else self.cfg.fallback_target)
        rest = sorted(self.targets, key=lambda t: -decision.probabilities.get(t, 0.0)) if decision else list(self.targets)
        order = [first, *(decision.eligible if decision else []), *rest]
        return list(dict.fromkeys(t for t in order if t in self.targets))

    async def answer(self, order: list[str], req: ChatCompletionRequest,
                     received: float | None = None) -> tuple[str, TargetAnswer, list[str]]:
        """Ask targets in order until one answers; returns (target, answer, failed targets). ``received``:
        when the ingress got the request (its queue time is observed from it)."""
        failed: list[str] = []
        max_tokens = req.answer_tokens or self.cfg.default_max_tokens
        for name in order:
            start = time.perf_counter()
            call = self.targets[name].generate.remote(req.plain_messages(), max_tokens, req.temperature or 0.0,
                                                      req.sampling())
            try:
                result = await bounded(call, self.cfg.target_timeout_s, self.targets[name], name)
            except Exception as exc:  # noqa: BLE001 - a target failure means: try the next one
                if fault := request_fault(exc):
                    self.metrics.errors.labels("request").inc()
                    raise HTTPException(fault.status, fault.reason) from exc
                log.warning("target %s failed: %s", name, error_line(exc))
                self.metrics.errors.labels("timeout" if isinstance(exc, asyncio.TimeoutError) else "target").inc()
                failed.append(name)
                continue
            now = time.perf_counter()
            self.metrics.target_latency.labels(name).observe(now - start)
            self.metrics.observe_queue(name, received, now, result.work_s)
            for bad in failed:
                self.metrics.fallbacks.labels(bad, name).inc()
            return name, result, failed
        raise AllTargetsFailed(f"every target failed or timed out: {failed}")

    def headers(self, target: str, decision: RouteDecision | None, failed: list[str],
                degraded: str | None = None) -> dict[str, str]:
        headers = {"x-prefill-router-target": target}
        if decision is not None:
            headers["x-prefill-router-overhead-ms"] = f"{decision.overhead_ms:.2f}"
        if failed:
            headers["x-prefill-router-fallback-from"] = ",".join(failed)
        if degraded:
            headers["x-prefill-router-degraded"] = degraded
        return headers

    # ---------------------------------------------------------------- endpoints
    @counted("chat_completions")
    @logged("chat")
    async def chat_completions(self, request: Request) -> Response:
        req, trail = await self.parse(request, ChatCompletionRequest), request.state.trail
        if refusal := req.refusal():
            self.metrics.errors.labels("request").inc()
            raise HTTPException(400, refusal)
        if not self.targets:
            raise HTTPException(400, DECISION_SERVICE)
        pinned, rule = self.plan(req)
        messages = req.plain_messages()
        trail.plan(req.model, messages, self.request_log.keep_prompts)
        if pinned:
            await self.check_length(messages)
            decision, degraded = None, None
        else:
            decision, degraded = await self.decide_or_degrade(messages, rule)
            decision = decision and self.explored(decision, trail, self.targets)
        order = self.fallback_order(decision, pinned)
        if req.stream:
            return await stream_response(self, order, req, decision, degraded, request.state.received, trail)
        try:
            target, result, failed = await self.answer(order, req, request.state.received)
        except AllTargetsFailed as exc:
            raise HTTPException(502, str(exc)) from exc
        trail.answered(target, failed, degraded, result.text, result, self.request_log.keep_responses)
        body = ChatCompletionResponse(
            id=trail.request_id,
            model=target,
            choices=[ChatChoice(message={"role": "assistant", "content": result.text},
                                finish_reason=result.finish_reason)],
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens),
            route=decision,
        )
        return JSONResponse(body.model_dump(mode="json"), headers=self.headers(target, decision, failed, degraded))

    @counted("route")
    @logged("route")
    async def route(self, request: Request) -> Response:
        req, trail = await self.parse(request, RouteRequest), request.state.trail
        pinned, rule = self.plan(req)
        if pinned:
            raise HTTPException(422, f"model: /v1/route decides among the targets; use 'router' or "
                                     f"'router:<tolerance>', not the target {pinned!r}")
        messages = req.plain_messages()
        trail.plan(req.model, messages, self.request_log.keep_prompts)
        try:
            decision = await self.decide(messages, rule)
        except RouterUnavailable as exc:  # a decision service without its router: 503, not a bare 500
            raise exc.http() from exc
        decision = self.explored(decision, trail, self.targets or decision.probabilities)
        return JSONResponse({"id": trail.request_id, **decision.model_dump(mode="json")},
                            headers=self.headers(decision.target, decision, []))

    @counted("feedback")
    async def feedback(self, request: Request) -> Response:
        """A score of one answer, written beside the decision log (202: accepted, not yet matched: the
        answer's own record may still be in flight; an unknown id is reported at import)."""
        req = await self.parse(request, FeedbackRequest)
        if self.request_log.feedback is None:
            raise HTTPException(404, "feedback is kept with the decision log, and this app has none: set "
                                     "decision_log.uri in the serving config")
        self.request_log.feedback.put(FeedbackRecord(request_id=req.request_id, score=req.value(), comment=req.comment))
        return JSONResponse({"request_id": req.request_id, "status": "accepted"}, status_code=202)

    @counted("models")
    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        names = ["router", *self.targets]
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "prefill-router"}
                                                         for n in names]})

    def check_probe_auth(self, request: Request) -> None:
        """The bearer token on /healthz, /readyz and /metrics too, when ``auth_probes`` asks for it."""
        if self.cfg.auth_probes:
            self.check_auth(request)

    async def healthz(self, request: Request) -> Response:
        """Liveness: the ingress itself answers (use /readyz to know the app can answer)."""
        self.check_probe_auth(request)
        return JSONResponse({"status": "ok", "targets": list(self.targets)})

    async def readyz(self, request: Request) -> Response:
        """Readiness: 200 only when the encoder, the router head and at least one target answer
        (a decision service, which serves no target: the encoder and the head)."""
        self.check_probe_auth(request)

        async def ping(handle: Any) -> str:
            try:
                await bounded(handle.ready.remote(), self.cfg.ready_timeout_s, handle)
            except Exception as exc:  # noqa: BLE001 - any failure is the answer
                return f"not ready ({type(exc).__name__})"
            return "ok"

        names = list(self.targets)
        found = await asyncio.gather(ping(self.encoder), ping(self.head), *(ping(self.targets[n]) for n in names))
        checks = {"encoder": found[0], "router_head": found[1], "targets": dict(zip(names, found[2:]))}
        ready = found[0] == found[1] == "ok" and ("ok" in found[2:] or not names)  # no targets: a decision service
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                            status_code=200 if ready else 503)

    async def prometheus(self, request: Request) -> Response:
        self.check_probe_auth(request)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")
