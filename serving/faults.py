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


WATCH_S = 0.2  # how often a call in flight checks that its deployment still has a live replica


class ReplicasGone(RuntimeError):
    """Every replica of the called deployment died while the call waited for one (Serve would hold the
    call until the controller has started a replacement: tens of seconds for a model)."""


def live_replicas(handle: Any) -> int | None:
    """How many replicas a Serve ``DeploymentHandle``'s router can send calls to now; None where that
    is not known (not a Serve handle, or one whose router has not started). Serve's router drops a
    replica from this set as soon as a call to it meets ``ActorDiedError`` (its actor is dead) or the
    controller reports it gone, and adds its replacement only once the controller has it running."""
    replicas = getattr(getattr(_asyncio_router(handle), "request_router", None), "curr_replicas", None)
    return None if replicas is None else len(replicas)


def _asyncio_router(handle: Any) -> Any:
    """The Serve ``DeploymentHandle``'s own router (Ray 2.60's private ``AsyncioRouter``), or None."""
    return getattr(getattr(handle, "_router", None), "_asyncio_router", None)


def min_replicas(handle: Any) -> int | None:
    """The autoscaling floor of the deployment a Serve ``DeploymentHandle`` calls, as its router last
    heard it from the controller; None where that is not known."""
    scaling = getattr(getattr(_asyncio_router(handle), "_metrics_manager", None), "autoscaling_config", None)
    return getattr(scaling, "min_replicas", None)


def seen_live(handle: Any) -> bool:
    """Whether the handle's router has ever heard of a running replica of its deployment (Serve's own
    flag, set by the first non-empty replica set the controller sends it)."""
    populated = getattr(_asyncio_router(handle), "running_replicas_populated", None)
    return bool(populated()) if callable(populated) else False


def warm(handle: Any) -> None:
    """Start a Serve ``DeploymentHandle``'s router now rather than at its first call, so it hears the
    controller's replica set while the replicas are up: a deployment whose replicas all died before
    its first call is then known dead (:func:`seen_live`), not taken for one scaling up from zero.
    Anything that is not an uninitialised Serve handle is left alone."""
    if getattr(handle, "is_initialized", True) is False:
        handle._init()


GONE_HOLD_S = 30.0  # a deployment seen with every replica dead is passed over this long, or until one is live
_GONE: dict[Any, float] = {}  # deployment (see _key) -> when every replica of it was seen dead


def _key(handle: Any) -> Any:
    """What :data:`_GONE` remembers a deployment by: its Serve deployment id, which the handles that
    ``.options()`` makes (one per streamed call) share; the object itself for anything else."""
    return getattr(handle, "deployment_id", None) or id(handle)


def _down(handle: Any, live: int | None) -> bool:
    """Whether a call on ``handle`` should fail at once: it has no live replica, and either it was seen
    with every replica dead within ``GONE_HOLD_S``, or its router has heard of running replicas before
    and the deployment cannot scale to zero (its floor is 1 or more: no replica means they died, and
    Serve's controller may have dropped the dead one before the call, so no call ever meets the death)."""
    if live != 0:
        return False
    if time.monotonic() - _GONE.get(_key(handle), -GONE_HOLD_S) < GONE_HOLD_S:
        return True
    return seen_live(handle) and (min_replicas(handle) or 0) >= 1


def _gone(handle: Any, name: str) -> ReplicasGone:
    _GONE[_key(handle)] = time.monotonic()
    return ReplicasGone(f"{name}: every replica died; its replacement is not running yet")


async def _unless_gone(call: asyncio.Future, handle: Any, name: str, had_live: bool) -> Any:
    """``call``'s result, or :class:`ReplicasGone` once ``handle`` has no live replica left and either
    had some when the call started (``had_live``) or is down (:func:`_down`)."""
    try:
        while not (await asyncio.wait([call], timeout=WATCH_S))[0]:
            live = live_replicas(handle)
            if live == 0 and (had_live or _down(handle, live)):
                raise _gone(handle, name)
        return call.result()
    except BaseException:
        call.cancel()
        raise


async def bounded(response: Any, timeout_s: float, handle: Any = None, name: str = "deployment") -> Any:
    """Await a handle call within ``timeout_s``; on timeout or cancellation cancel the call
    itself, so the replica stops working on it. With the ``handle`` it was made on, a call whose
    deployment had live replicas when it started and has none left (each died: SIGKILL, OOM, node
    lost) fails at once with :class:`ReplicasGone` instead of waiting for a replacement, and so
    does every later call until a replica is live again (at most ``GONE_HOLD_S``: a deployment that
    scales to zero is then called again, so Serve starts a replica). A call that finds no live
    replica fails at once too (or as soon as its router learns it) when the router has heard of
    running replicas before and the deployment's floor is 1 or more (the controller dropped the dead
    replica before any call met it); a deployment scaled to zero (floor 0, none seen dying lately) is
    waited for, as Serve starts one."""
    live = None if handle is None else live_replicas(handle)
    if live:
        _GONE.pop(_key(handle), None)
    elif _down(handle, live):
        # not sent: cancel the call, or close a coroutine that never ran
        getattr(response, "cancel", getattr(response, "close", lambda: None))()
        raise _gone(handle, name)
    call = asyncio.ensure_future(response)
    watched = call if handle is None else _unless_gone(call, handle, name, bool(live))
    try:
        return await asyncio.wait_for(watched, timeout=timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError, ReplicasGone):
        if hasattr(response, "cancel"):
            response.cancel()
        raise
