"""The ingress's decision log: one record per answered request, written without ever blocking one.

:class:`LogWriter` buffers records of one kind (decisions or feedback, ``shared.decision_log``)
in a bounded queue; a background thread writes them as Parquet parts (``part_records`` records
or ``part_s`` seconds, whichever first) under the configured URI, local or ``s3://``. A full
queue drops the new record; a part that cannot be written after ``retries`` more tries drops
its records; both are counted (``prefill_router_log_dropped_total{kind, reason}``) and logged,
and requests go on being answered. Memory is bounded by ``queue_records`` plus one part.
:meth:`LogWriter.close` writes what is buffered (the ingress's ``__del__``, which Serve calls
when it stops a replica; an ``atexit`` hook covers an interpreter that exits on SIGTERM).

:class:`Trail` collects one request's record as it is handled; :func:`logged` wraps an endpoint
so every request that got as far as a plan (a model, a policy) leaves exactly one record,
whatever its status; a stream's record is written when the stream ends.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import HTTPException

from serving.config import DecisionLogConfig
from shared import storage
from shared.decision_log import DecisionRecord, FeedbackRecord, LogRecord, part_uri, prompt_hash

log = logging.getLogger(__name__)


class LogWriter:
    """Bounded, non-blocking writer of one record kind (see the module docstring)."""

    def __init__(self, cfg: DecisionLogConfig, record: type[LogRecord], on_drop: Callable[[str, int], None]):
        self.cfg, self.record, self.on_drop = cfg, record, on_drop
        self.writer_id = uuid.uuid4().hex[:8]
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_records)
        self.written = self.dropped = self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"decision-log-{record.KIND}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def put(self, record: LogRecord) -> None:
        """Queue a record; never waits (a full queue drops it, counted)."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._drop("queue_full", 1, f"its queue of {self.cfg.queue_records} records is full")

    def _drop(self, reason: str, n: int, why: str) -> None:
        self.dropped += n
        self.on_drop(reason, n)
        log.error("decision log: dropped %d %s record(s) (%s; %d dropped so far); requests are still answered",
                  n, self.record.KIND, why, self.dropped)

    def _run(self) -> None:
        batch: list[LogRecord] = []
        oldest = 0.0
        while not (self._stop.is_set() and self.queue.empty()):
            wait = self.cfg.part_s - (time.monotonic() - oldest) if batch else self.cfg.part_s
            try:
                item = self.queue.get(timeout=max(0.01, min(wait, 0.2)))
                if not batch:
                    oldest = time.monotonic()
                batch.append(item)
            except queue.Empty:
                pass
            if batch and (len(batch) >= self.cfg.part_records or time.monotonic() - oldest >= self.cfg.part_s):
                self._write(batch)
                batch = []
        if batch:
            self._write(batch)

    def _write(self, batch: list[LogRecord]) -> None:
        table = self.record.table(batch)
        self.seq += 1
        uri = part_uri(self.cfg.uri, self.record.KIND, time.time(), self.writer_id, self.seq)
        for attempt in range(self.cfg.retries + 1):
            try:
                storage.write_parquet(table, uri)
                self.written += len(batch)
                return
            except Exception as exc:  # noqa: BLE001 - storage down: retry, then drop and count
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                if attempt < self.cfg.retries:
                    time.sleep(min(2.0 ** attempt, 10.0))
        self._drop("write_failed", len(batch), f"could not write {uri}: {error}")

    def close(self) -> None:
        """Write what is queued and stop (waits at most ``close_timeout_s``); safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self.cfg.close_timeout_s)
        atexit.unregister(self.close)
        if self._thread.is_alive():
            log.error("decision log: %d %s record(s) still unwritten after %.0f s at shutdown",
                      self.queue.qsize(), self.record.KIND, self.cfg.close_timeout_s)


class RequestLog:
    """The ingress's two writers (decisions, feedback) and what its config says to keep; ``off()``: no log.
    ``dropped``: the Prometheus counter of dropped records, labelled by kind and reason."""

    def __init__(self, cfg: DecisionLogConfig | None, dropped: Any = None):
        self.keep_prompts = bool(cfg and cfg.keep_prompts)
        self.keep_responses = bool(cfg and cfg.keep_responses)
        self.decisions = self.feedback = None
        if cfg is not None:
            def count(kind: str) -> Callable[[str, int], None]:
                return lambda reason, n: dropped.labels(kind, reason).inc(n)

            self.decisions = LogWriter(cfg, DecisionRecord, count("decisions"))
            self.feedback = LogWriter(cfg, FeedbackRecord, count("feedback"))

    @classmethod
    def off(cls) -> "RequestLog":
        return cls(None)

    def close(self) -> None:
        for writer in (self.decisions, self.feedback):
            if writer is not None:
                writer.close()


class Trail:
    """One request's decision record, filled in as the request is handled."""

    def __init__(self, endpoint: str, received: float):
        self.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.endpoint, self.received, self.started = endpoint, time.time(), received
        self.fields: dict[str, Any] = {}
        self.planned = self.streaming = False

    def plan(self, model: str, messages: list[dict[str, str]], keep_prompt: bool) -> None:
        self.planned = True
        self.fields.update(model=model, prompt_hash=prompt_hash(messages),
                           messages=json.dumps(messages, ensure_ascii=False) if keep_prompt else None)

    def decided(self, decision: Any, explored: Any) -> None:
        param = getattr(decision, decision.policy, None) if decision.policy else None
        self.fields.update(policy=decision.policy, policy_param=param, probabilities=decision.probabilities,
                           expected_cost=decision.expected_cost, chosen=decision.target, artifact=decision.artifact,
                           target=explored.target, explored=explored.explored, propensity=explored.propensity)

    def answered(self, target: str, failed: list[str], degraded: str | None, text: str | None,
                 end: Any, keep_response: bool) -> None:
        self.fields.update(target=target, fallback_from=list(failed), degraded=degraded,
                           response=text if keep_response else None, finish_reason=end.finish_reason,
                           prompt_tokens=end.prompt_tokens, completion_tokens=end.completion_tokens)

    def record(self, status: int, error: str | None, now: float) -> DecisionRecord:
        return DecisionRecord(request_id=self.request_id, time=self.received, endpoint=self.endpoint, status=status,
                              error=error, stream=self.streaming, latency_s=now - self.started, **self.fields)


def logged(endpoint: str):
    """Give each call a :class:`Trail` (``request.state.trail``) and log it when the answer is complete:
    at return, at an HTTP error (its status and reason; the ``x-prefill-router-request-id`` header is added), or at
    the end of a stream (:func:`finish`). Wraps inside :func:`serving.faults.counted`."""

    def wrap(fn):
        @functools.wraps(fn)
        async def inner(self, request, *args, **kwargs):
            trail = request.state.trail = Trail(endpoint, request.state.received)
            try:
                response = await fn(self, request, *args, **kwargs)
            except HTTPException as exc:
                exc.headers = {**(exc.headers or {}), "x-prefill-router-request-id": trail.request_id}
                finish(self, trail, exc.status_code, str(exc.detail))
                raise
            except BaseException as exc:
                finish(self, trail, 499 if isinstance(exc, asyncio.CancelledError) else 500, type(exc).__name__)
                raise
            response.headers["x-prefill-router-request-id"] = trail.request_id
            if not trail.streaming:
                finish(self, trail, response.status_code, None)
            return response

        return inner

    return wrap


def finish(ingress: Any, trail: Trail, status: int, error: str | None) -> None:
    """Queue the request's record, if the ingress logs and the request got as far as a plan."""
    writer = ingress.request_log.decisions
    if writer is not None and trail.planned:
        writer.put(trail.record(status, error, time.perf_counter()))
