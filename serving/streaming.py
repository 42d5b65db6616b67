"""Server-sent events for ``stream: true`` chat completions, with OpenAI's semantics.

A target that fails before its first token (or whose replicas all died) falls back to the next one; after the first
token the stream has started, so a failure is reported in-band as an OpenAI-style
``error`` event (no internals: actor ids, pids and addresses stay in the log) and the
stream ends without a ``finish_reason`` chunk. The last chunk's ``finish_reason`` is the
target's (``length`` when ``max_tokens`` cut the answer). With
``stream_options.include_usage`` every chunk carries ``usage: null`` and a last chunk
with no choices carries the token usage. A client that goes away cancels the target's
generation. The request's decision-log record is written when the stream ends (cut short: status
499, or the in-band error), with the text that was sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Protocol

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from serving.decision_log import Trail, finish
from serving.faults import bounded
from serving.messages import StreamEnd, request_fault
from serving.schemas import ChatCompletionRequest, RouteDecision, chunk, usage_chunk


class StreamingIngress(Protocol):
    """What streaming reads of :class:`serving.ingress.RouterIngress` (typed without importing it)."""

    cfg: Any
    metrics: Any
    targets: dict[str, Any]
    request_log: Any

    def headers(self, *args: Any, **kwargs: Any) -> dict[str, str]: ...

log = logging.getLogger(__name__)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_response(ingress: StreamingIngress, order: list[str], req: ChatCompletionRequest,
                          decision: RouteDecision | None, degraded: str | None,
                          received: float | None, trail: Trail) -> StreamingResponse:
    """Stream from the first target that yields; a target failing before its first token falls back.
    ``received``: when the ingress got the request (the queue time is observed at the stream's end);
    ``trail``: the request's log record, finished when the stream ends."""
    max_tokens = req.answer_tokens or ingress.cfg.default_max_tokens
    failed: list[str] = []
    for name in order:
        gen_handle = ingress.targets[name].options(stream=True)
        gen = gen_handle.stream.remote(
            req.plain_messages(), max_tokens, req.temperature or 0.0, req.sampling())
        try:
            first = await bounded(gen.__anext__(), ingress.cfg.target_timeout_s, gen_handle, name)
        except BaseException as exc:
            _cancel(gen)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if fault := request_fault(exc):
                raise HTTPException(fault.status, fault.reason) from exc
            log.warning("target %s failed before streaming: %s", name, exc)
            ingress.metrics.errors.labels("target").inc()
            failed.append(name)
            continue
        for bad in failed:
            ingress.metrics.fallbacks.labels(bad, name).inc()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        trail.streaming, trail.fields["fallback_from"], trail.fields["degraded"] = True, list(failed), degraded
        events = sse_events(ingress, name, first, gen, decision, include_usage, received, trail)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers=ingress.headers(name, decision, failed, degraded))
    raise HTTPException(502, f"every target failed or timed out: {failed}")


def _cancel(gen: Any) -> None:
    if hasattr(gen, "cancel"):
        gen.cancel()


async def sse_events(ingress: StreamingIngress, target: str, first: Any, gen: Any, decision: RouteDecision | None,
                     include_usage: bool, received: float | None, trail: Trail) -> AsyncIterator[str]:
    """The ``data:`` events of one streamed answer (see the module docstring for the rules)."""
    cid = trail.request_id
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    head = {**extra, "route": decision.model_dump(mode="json")} if decision else extra
    end, item, sent, status, error_text = None, first, [], 499, "the client went away mid-stream"
    try:
        yield sse(chunk(cid, target, {"role": "assistant", "content": ""}, extra=head))
        while not isinstance(item, StreamEnd):
            if item:
                yield sse(chunk(cid, target, {"content": item}, extra=extra))
                sent.append(item)
            item = await asyncio.wait_for(gen.__anext__(), timeout=ingress.cfg.target_timeout_s)
        end = item
    except StopAsyncIteration:
        end = StreamEnd("stop", 0, 0)
    except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band, without internals
        log.warning("target %s failed mid-stream: %s", target, exc)
        ingress.metrics.errors.labels("stream").inc()
        error = {"message": f"target {target} failed mid-stream; the answer is incomplete",
                 "type": "server_error", "code": "target_failed"}
        status, error_text = 200, error["message"]
        yield sse({"error": error})
        yield sse("[DONE]")
        return
    finally:
        if end is None:  # failed, timed out or the client went away: stop the target's generation
            _cancel(gen)
        done = end or StreamEnd(None, None, None)  # cut short: no counts from the target
        trail.answered(target, trail.fields["fallback_from"], trail.fields["degraded"], "".join(sent), done,
                       ingress.request_log.keep_responses)
        finish(ingress, trail, 200 if end else status, None if end else error_text)
    ingress.metrics.observe_queue(target, received, time.perf_counter(), end.work_s)
    yield sse(chunk(cid, target, {}, finish_reason=end.finish_reason, extra=extra))
    if include_usage:
        yield sse(usage_chunk(cid, target, end.prompt_tokens, end.completion_tokens))
    yield sse("[DONE]")
