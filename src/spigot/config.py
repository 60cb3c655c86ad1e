"""Server settings, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from spigot.engine.llamacpp.engine import EngineOptions
from spigot.guard import Policy
from spigot.http_limits import ConnectionLimits
from spigot.metering.prices import PriceTable
from spigot.models import ModelSpec
from spigot.upstream.config import ModelRoute, UpstreamConfig


@dataclass(frozen=True, slots=True)
class Settings:
    models: tuple[ModelSpec, ...]  # local GGUF models
    engine: EngineOptions = field(default_factory=EngineOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    # Route OpenAI model names (gpt-*, text-*, ...) to the first model.
    openai_aliases: bool = True
    aliases: tuple[tuple[str, str], ...] = ()  # (pattern, model id)
    log_level: str = "info"
    guard: Policy | None = None  # guardrails on prompts and replies
    # Keys, ledger, budgets and rate limits: a SQLite path or postgresql:// URL; None = off.
    db: str | None = "spigot.db"
    prices: PriceTable = field(default_factory=PriceTable)
    require_auth: bool = False
    # Requests: the largest body read (413 beyond), and the most chat messages.
    max_body_bytes: int = 8 * 2**20
    max_messages: int = 2048
    # Browser origins allowed to call the API (CORS); empty = none.
    cors_origins: tuple[str, ...] = ()
    # On SIGTERM, streams still running after this many seconds end with an
    # error event (and are billed) before the process exits.
    shutdown_grace: float = 30.0
    # A streamed request whose client left: None cancels it; otherwise it keeps
    # generating this many seconds for a reconnect (resumable streams).
    detach_seconds: float | None = None
    # Redis for the resumable streams' event log (shared by replicas); None = memory.
    redis_url: str | None = None
    # HTTP connections: how many, and how long and large a request's head and body may be.
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    # Gateway mode (docs/gateway.md): other OpenAI-compatible servers, the models
    # served from them, and upstreams whose every listed model is served (--upstream).
    upstreams: tuple[UpstreamConfig, ...] = ()
    routes: tuple[ModelRoute, ...] = ()
    discover: tuple[UpstreamConfig, ...] = ()
