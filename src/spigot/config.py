"""Server settings, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from spigot.engine.async_engine import EngineOptions
from spigot.guard import Policy
from spigot.metering.prices import PriceTable
from spigot.models import ModelSpec


@dataclass(frozen=True, slots=True)
class Settings:
    models: tuple[ModelSpec, ...]
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
