"""The FastAPI app of the ingress: its routes, bound to a :class:`serving.ingress.RouterIngress`, and
errors with the OpenAI ``error`` object its clients read."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ROUTES = [
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/route", "route"),
    ("POST", "/v1/feedback", "feedback"),
    ("GET", "/v1/models", "models"),
    ("GET", "/healthz", "healthz"),
    ("GET", "/readyz", "readyz"),
    ("GET", "/metrics", "prometheus"),
]


def _endpoint(name: str, get_ingress: Callable[[], Any]) -> Callable:
    async def endpoint(request: Request) -> Response:
        return await getattr(get_ingress(), name)(request)

    endpoint.__name__ = name
    return endpoint


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's ``detail`` plus the OpenAI ``error`` object its clients read (the router's own
    errors, and Starlette's 404 of an unknown path and 405 of a wrong method)."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = {"detail": exc.detail, "error": {"message": str(exc.detail), "type": kind, "code": exc.status_code}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def make_fastapi_app(get_ingress: Callable[[], Any]) -> FastAPI:
    """A FastAPI app whose routes call the :class:`RouterIngress` that ``get_ingress()`` returns.

    In Serve, ``get_ingress`` returns the replica's own instance (see ``serving.app``);
    without Serve, any instance: ``make_fastapi_app(lambda: ingress)``.
    """
    app = FastAPI(title="prefill-router", version="1")
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for method, path, name in ROUTES:
        app.add_api_route(path, _endpoint(name, get_ingress), methods=[method])
    return app
