"""Building and running the server from Settings: load models, route names, start uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket

import httpx
import uvicorn
from fastapi import FastAPI

from spigot.api.app import create_app
from spigot.api.detach import Detached
from spigot.api.keyless import is_loopback_host
from spigot.api.metering import Metering
from spigot.api.shutdown import Shutdown
from spigot.api.state import RequestLimits, ServerState
from spigot.config import Settings
from spigot.config_file import ConfigError
from spigot.engine.llamacpp import LlamaCppEngine, set_native_logging
from spigot.engine.protocol import Engine
from spigot.http_limits import fit_to_open_files, http_protocol
from spigot.metering import open_store
from spigot.models import OPENAI_NAME_PATTERNS, ModelRouter
from spigot.resume import open_event_log
from spigot.upstream import ModelRoute, Upstream, UpstreamEngine, discover_routes

log = logging.getLogger(__name__)

# Seconds after the grace period for interrupted streams to be billed and told.
SHUTDOWN_MARGIN = 10


def build_state(settings: Settings) -> ServerState:
    # The store first: a wrong --db should fail before minutes of model loading.
    metering = None
    if settings.db is not None:
        store = open_store(settings.db)
        # One server per SQLite file: reservations left by a killed predecessor would
        # otherwise hold budget and concurrency until they go stale.
        if store.dialect == "sqlite" and (cleared := store.clear_reservations()):
            log.info("billed %d request(s) cut short by an earlier run as interrupted", cleared)
        elif store.dialect != "sqlite" and (stale := store.bill_stale_reservations()):
            log.info("billed %d stale reservation(s) of vanished replicas as interrupted", stale)
        metering = Metering(store, settings.prices, require_auth=settings.require_auth)
        log.info("metering: keys and ledger in %s", store.dialect)
    engines: dict[str, Engine] = {}
    # One Upstream per server, shared by the models served from it (one pool, one load).
    upstreams = {u.name: Upstream(u) for u in (*settings.upstreams, *settings.discover)}
    for route in _routes(settings):
        if route.name in engines or any(s.id == route.name for s in settings.models):
            raise ConfigError(f"the model name {route.name!r} is served twice")
        log.info(
            "serving %s from %s",
            route.name,
            ", ".join(f"{t.upstream}:{t.model}" for t in route.targets),
        )
        engines[route.name] = UpstreamEngine(route, upstreams)
    for spec in settings.models:
        log.info("loading %s from %s", spec.id, spec.path)
        engines[spec.id] = LlamaCppEngine.load(spec.id, spec.path, settings.engine)
    aliases = dict(settings.aliases)
    if settings.openai_aliases:
        first = next(iter(engines))
        for pattern in OPENAI_NAME_PATTERNS:
            aliases.setdefault(pattern, first)
    if settings.guard is not None:
        log.info(
            "guard policy %s: %d output rule(s), %d input rule(s)",
            settings.guard.source,
            len(settings.guard.output.rules),
            len(settings.guard.input.rules),
        )
    return ServerState(
        engines=engines,
        router=ModelRouter(list(engines), aliases),
        guard=settings.guard,
        metering=metering,
        limits=RequestLimits(
            max_body_bytes=settings.max_body_bytes, max_messages=settings.max_messages
        ),
        shutdown=Shutdown(grace=settings.shutdown_grace),
        loopback_only=is_loopback_host(settings.host),
        detached=(
            None
            if settings.detach_seconds is None
            else Detached(open_event_log(settings.redis_url), settings.detach_seconds)
        ),
    )


def _routes(settings: Settings) -> list[ModelRoute]:
    """The configured upstream models, and every model each ``--upstream URL`` lists."""
    routes = list(settings.routes)
    for upstream in settings.discover:
        try:
            found = asyncio.run(discover_routes(upstream))
        except (httpx.HTTPError, ValueError) as exc:
            raise ConfigError(
                f"--upstream {upstream.name}={upstream.base_url}: cannot list its models: {exc}"
            ) from None
        if not found:
            raise ConfigError(f"--upstream {upstream.name}={upstream.base_url} lists no models")
        log.info("%s serves %s", upstream.name, ", ".join(r.name for r in found))
        routes += found
    return routes


def build_app(settings: Settings) -> FastAPI:
    return create_app(build_state(settings), cors_origins=settings.cors_origins)


class Server(uvicorn.Server):
    """uvicorn, telling the app when shutdown starts so that streams can be drained.

    uvicorn then waits for running requests (longer than the grace period, so
    that interrupted streams are billed and told before the process exits).
    """

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self._drain = shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._drain.begin()
        await super().shutdown(sockets)


def run(settings: Settings, *, verbose_llama: bool = False) -> None:
    set_native_logging(verbose_llama)
    app = build_app(settings)
    # Timeouts, header size and connection cap below the app (http_limits.py).
    limits = fit_to_open_files(settings.connections)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=http_protocol(limits),
        timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]  # a float works
        # Streams are long-lived: on shutdown, running ones get the grace period
        # (spigot.api.shutdown), then a margin to be billed and told.
        timeout_graceful_shutdown=int(settings.shutdown_grace) + SHUTDOWN_MARGIN,
        access_log=False,
    )
    state: ServerState = app.state.spigot
    server = Server(config, state.shutdown)
    log.info(
        "serving %s on http://%s:%d/v1",
        ", ".join(app.state.spigot.engines),
        settings.host,
        settings.port,
    )
    try:
        server.run()
    finally:
        metering = app.state.spigot.metering
        if metering is not None:
            metering.store.close()
