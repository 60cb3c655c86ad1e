"""The ASGI application: routes, error mapping, request ids and the engine lifecycle."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spigot import __version__
from spigot.api import admin, chat, completions, models, streams, tokens
from spigot.api.openapi import install_openapi
from spigot.api.responses import error_response, json_response
from spigot.api.responses_api import routes as responses_api
from spigot.api.state import ServerState
from spigot.api.streaming import ClientDisconnected
from spigot.engine.protocol import EngineRefused, EngineUnavailable
from spigot.errors import InvalidRequest, NotFound, Overloaded, SpigotError, UpstreamUnavailable
from spigot.metering import StoreError

log = logging.getLogger(__name__)


class RequestIdMiddleware:
    """Gives every request an id, visible to handlers and sent as ``x-request-id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug, not a client mistake: answer with an OpenAI-shaped 500
            # (if nothing was sent yet) instead of a bare one, and log it.
            log.exception("unhandled error in %s", request_id)
            if not started:
                response = error_response(
                    SpigotError("The server had an error while processing your request.")
                )
                await response(scope, receive, send_with_id)


async def _spigot_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SpigotError)
    if exc.status >= 500:
        log.warning("%s: %s", request.state.request_id, exc.message)
    return error_response(exc)


async def _engine_refused(request: Request, exc: Exception) -> Response:
    # An upstream's own error before any output (its 400 on a parameter it checks,
    # its 429): the client gets it as the upstream sent it.
    assert isinstance(exc, EngineRefused)
    log.info("%s: the engine answered %d", request.state.request_id, exc.status)
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "retry-after"}
    return json_response(exc.body, status=exc.status, headers=headers)


async def _engine_unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineUnavailable)
    error = UpstreamUnavailable(str(exc), retry_after=exc.retry_after)
    log.warning("%s: %s", request.state.request_id, error.message)
    return error_response(error)


async def _client_left(request: Request, exc: Exception) -> Response:
    # Nobody is there to read it; generation was aborted and usage recorded already.
    log.info("%s: the client left before the response", request.state.request_id)
    return Response(status_code=499)


async def _store_error(request: Request, exc: Exception) -> Response:
    # The key store (a database) failing is the server's trouble, and usually passing.
    log.error("%s: key store: %s", request.state.request_id, exc)
    return error_response(
        Overloaded("The server's key store is unavailable; try again shortly.", retry_after=5)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: SpigotError = NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    else:
        error = InvalidRequest(str(exc.detail))
        error.status = exc.status_code  # type: ignore[misc]
    return error_response(error)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client closed the connection while its body was being read: routine.
    log.info("%s: the client left while sending its request", request.state.request_id)
    return Response(status_code=499)


# Headers a browser page may read from a cross-origin response.
EXPOSED_HEADERS = [
    "x-request-id",
    "retry-after",
    *(
        f"x-ratelimit-{what}-{kind}"
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    ),
]


def create_app(state: ServerState, *, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.detached is not None:
            await state.detached.events.ping()  # a wrong --redis fails before loading
        for engine in state.engines.values():
            await engine.start()
        try:
            yield
        finally:
            if state.detached is not None:
                # Detached streams end within the grace period (interrupted, billed).
                await state.detached.close(within=state.shutdown.grace + 10)
            for engine in state.engines.values():
                await engine.stop()
            state.prep.close()

    app = FastAPI(
        title="spigot",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.spigot = state
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(responses_api.router)
    app.include_router(models.router)
    app.include_router(tokens.router)
    app.include_router(streams.router)
    app.include_router(admin.router)
    install_openapi(app)

    @app.get("/health")
    async def health() -> Response:
        body: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "models": {name: e.stats() for name, e in state.engines.items()},
        }
        if state.guard is not None:
            body["guard"] = {
                "policy": state.guard.source,
                "rules": [r.id for r in state.guard.rules],
                "trips": state.guard_counters.snapshot(),
            }
        return json_response(body)

    app.add_exception_handler(SpigotError, _spigot_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(EngineRefused, _engine_refused)
    app.add_exception_handler(EngineUnavailable, _engine_unavailable)
    app.add_exception_handler(ClientDisconnected, _client_left)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    if cors_origins:
        # Off by default: only the origins an operator names may call from a page.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            # SDKs send headers of their own (x-stainless-*, openai-*): allow what a
            # listed origin asks for; the origin list is the gate.
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
    return app
