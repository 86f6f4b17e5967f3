"""The FastAPI app: /v1 (token-protected when a token is set), probes, metrics, the page.

/v1 is two routers under one prefix and one token check: :mod:`.v1` (identify,
tracks, index) and :mod:`.similar` (track similarity).

Open without a token: ``/`` (the page itself: static HTML, it asks for the
token when the API wants one), ``/healthz`` and ``/readyz`` (for probes),
``/metrics`` (counts and latencies, no catalogue data; for scrapers) and
``/openapi.json``. Swagger's ``/docs`` is off: it loads its scripts from a CDN.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mert_indexer.service import similar, v1
from mert_indexer.service.errors import ApiError
from mert_indexer.service.metrics import Metrics
from mert_indexer.service.runtime import SearchService

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_VERSION = "1"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def create_app(service: SearchService, *, manage: bool = True) -> FastAPI:
    """The app over ``service``; with ``manage`` its lifespan starts and stops the service."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage:
            service.start()
        try:
            yield
        finally:
            if manage:
                service.stop()

    app = FastAPI(
        title="mert-indexer search",
        version=API_VERSION,
        summary="Which indexed track, and where in it, does this clip come from?",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    auth = [Depends(_token_check(service.options.token))]
    app.include_router(v1.router, dependencies=auth)
    app.include_router(similar.router, dependencies=auth)
    _add_probes(app, service)
    _add_page(app)
    _add_error_handlers(app)
    app.add_middleware(_MetricsMiddleware, metrics=service.metrics)
    return app


def _token_check(token: str | None) -> Callable[[Request], None]:
    expected = None if token is None else token.encode()

    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant time: the comparison does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(
                401,
                "unauthorized",
                "this service needs 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def _add_probes(app: FastAPI, service: SearchService) -> None:
    @app.get("/healthz", summary="The process is up", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="An index is loaded and Triton serves the model that built it",
        tags=["ops"],
        responses={503: {"description": "not ready, with the reason"}},
    )
    def readyz() -> JSONResponse:
        ready, details = service.readiness()
        headers = {} if ready else {"Retry-After": str(service.options.retry_after_seconds)}
        return JSONResponse(details, status_code=200 if ready else 503, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics", tags=["ops"])
    def metrics() -> Response:
        service.readiness()  # refreshes the ready gauge
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)


def _add_page(app: FastAPI) -> None:
    page = resources.files("mert_indexer.service").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path"))
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        body = {"error": {"code": "invalid_parameter", "message": "; ".join(problems)}}
        return JSONResponse(body, status_code=422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        body = {"error": {"code": code, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        body = {"error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


class _MetricsMiddleware:
    """Counts every request by route template (never the raw path) and status; times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
