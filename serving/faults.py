"""What can go wrong between the ingress and the deployments it calls, and the two wrappers every
call and endpoint goes through: :func:`bounded` (a timeout that cancels the call) and
:func:`counted` (requests by HTTP status in Prometheus)."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from fastapi import HTTPException

from serving.messages import EncodeFailed


class AllTargetsFailed(RuntimeError):
    pass


class EncoderFailedOnPrompt(RuntimeError):
    """The encoder's forward pass failed on this prompt alone (its :class:`EncodeFailed` answer)."""

    def __init__(self, failed: EncodeFailed):
        self.kind = failed.kind
        super().__init__(f"{failed.kind}: {failed.message}")


class RouterUnavailable(RuntimeError):
    """The encoder or the router head failed or timed out (``kind``: the failure's type name)."""

    def __init__(self, cause: BaseException):
        self.kind = cause.kind if isinstance(cause, EncoderFailedOnPrompt) else type(cause).__name__
        super().__init__(f"the router's encoder or head is unavailable ({self.kind})")

    def http(self, hint: str = "") -> HTTPException:
        """The JSON 503 a request gets when nothing can answer it without the router."""
        return HTTPException(503, f"{self}{hint}; retry shortly", headers={"Retry-After": "5"})


def counted(endpoint: str):
    """Count each call of an endpoint method by HTTP status in ``self.metrics.requests`` and time it
    in ``self.metrics.duration`` (a request the client gave up on counts as 499). The request's
    arrival is ``request.state.received`` (``time.perf_counter()``) for the method to read."""

    def wrap(fn):
        @functools.wraps(fn)
        async def inner(self, request, *args, **kwargs):
            status, request.state.received = 500, time.perf_counter()
            try:
                response = await fn(self, request, *args, **kwargs)
                status = response.status_code
                return response
            except HTTPException as exc:
                status = exc.status_code
                raise
            except asyncio.CancelledError:
                status = 499
                raise
            finally:
                self.metrics.requests.labels(endpoint, str(status)).inc()
                self.metrics.duration.labels(endpoint, str(status)).observe(
                    time.perf_counter() - request.state.received)

        return inner

    return wrap


async def bounded(response: Any, timeout_s: float) -> Any:
    """Await a handle call within ``timeout_s``; on timeout or cancellation cancel the call
    itself, so the replica stops working on it."""
    try:
        return await asyncio.wait_for(asyncio.ensure_future(response), timeout=timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        if hasattr(response, "cancel"):
            response.cancel()
        raise
