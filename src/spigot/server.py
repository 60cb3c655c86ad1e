"""Building and running the server from Settings: load models, route names, start uvicorn."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from spigot.api.app import create_app
from spigot.api.metering import Metering
from spigot.api.state import ServerState
from spigot.config import Settings
from spigot.engine.async_engine import AsyncEngine
from spigot.engine.llamacpp import set_native_logging
from spigot.metering import open_store
from spigot.models import OPENAI_NAME_PATTERNS, ModelRouter

log = logging.getLogger(__name__)


def build_state(settings: Settings) -> ServerState:
    # The store first: a wrong --db should fail before minutes of model loading.
    metering = None
    if settings.db is not None:
        store = open_store(settings.db)
        # One server per SQLite file: reservations left by a killed predecessor would
        # otherwise hold budget and concurrency until they go stale.
        if store.dialect == "sqlite" and (cleared := store.clear_reservations()):
            log.info("dropped %d reservation(s) left by an earlier run", cleared)
        metering = Metering(store, settings.prices, require_auth=settings.require_auth)
        log.info("metering: keys and ledger in %s", store.dialect)
    engines: dict[str, AsyncEngine] = {}
    for spec in settings.models:
        log.info("loading %s from %s", spec.id, spec.path)
        engines[spec.id] = AsyncEngine.load(spec.id, spec.path, settings.engine)
    aliases = dict(settings.aliases)
    if settings.openai_aliases:
        first = settings.models[0].id
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
    )


def build_app(settings: Settings) -> FastAPI:
    return create_app(build_state(settings))


def run(settings: Settings, *, verbose_llama: bool = False) -> None:
    set_native_logging(verbose_llama)
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Streams are long-lived: on shutdown, let running ones finish for a
        # while, then cancel them (their generation is aborted cleanly).
        timeout_graceful_shutdown=30,
        access_log=False,
    )
    server = uvicorn.Server(config)
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
