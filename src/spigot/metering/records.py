"""The store's values: keys, admissions, ledger entries, usage rows; and its clock.

The API speaks timezone-aware UTC datetimes; the database keeps epoch seconds (a double in
both dialects), so the SQL is the same for SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, get_args

# "sequences": the request alone runs more sequences (n) than the key's max_concurrent.
Reason = Literal["revoked", "expired", "sequences", "concurrency", "rpm", "tpm", "budget"]
UsageBy = Literal["key", "model", "day"]
# Where a ledger row's token counts come from (its usage_source column):
#   engine    a local model counted its own tokens
#   upstream  an upstream OpenAI-compatible server reported usage
#   counted   the upstream sent none: spigot counted them with a tokenizer
#   partial   the stream was cut short: what was served until then (a checkpoint, when the
#             store bills a request whose server died)
# The same values as spigot.engine.types.UsageSource, which the server passes in.
UsageSource = Literal["engine", "upstream", "counted", "partial"]
USAGE_SOURCES: tuple[UsageSource, ...] = get_args(UsageSource)
INTERRUPTED = "interrupted"  # the status of a row the store wrote for a request that died


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        # A naive datetime would be read as local time: refuse rather than guess.
        raise ValueError(f"timestamps must be timezone-aware: {moment!r}")
    return moment.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def epoch_or_now(moment: datetime | None) -> float:
    return time.time() if moment is None else to_epoch(moment)


def day_of(seconds: float) -> str:
    """The UTC day of an instant, ``YYYY-MM-DD`` (text sorts in date order)."""
    return from_epoch(seconds).date().isoformat()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as stored: never its secret, nor its hash. Limits are None when unlimited."""

    id: int
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    budget_pusd: int | None = None
    spent_pusd: int = 0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    models: tuple[str, ...] | None = None  # None: every model
    admin: bool = False

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (now if now is not None else utcnow()) >= self.expires_at

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def remaining_pusd(self) -> int | None:
        """Budget left after settled spending (open reservations not counted)."""
        return None if self.budget_pusd is None else self.budget_pusd - self.spent_pusd


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to "may this request start?", with what the x-ratelimit-* headers need.

    ``retry_after`` is the seconds to the end of the rate window when waiting helps (rpm, tpm);
    None otherwise (concurrency, budget, or a request larger than the whole tpm limit or
    running more sequences than max_concurrent: waiting never helps those).
    ``reset_*`` are seconds to the end of the current window. ``remaining_*`` count this
    request when it was admitted. Each trio is None when the key has no such limit.
    """

    ok: bool
    reason: Reason | None = None
    retry_after: float | None = None
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One finished request, however it ended. ``key_id`` is None when auth is off.

    ``created_at`` is when the request ended: it picks the usage day. ``status``
    "interrupted" is written by the store itself for a request whose server died: it bills
    the request's last checkpoint (``usage_source`` "partial"), and a settle that comes later
    replaces it. ``usage_source`` is one of USAGE_SOURCES (ValueError otherwise).
    """

    request_id: str
    key_id: int | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int
    cost_pusd: int
    ttft_ms: int | None = None
    duration_ms: int
    finish_reason: str | None = None
    status: str = "ok"  # ok | disconnected | error | interrupted
    created_at: datetime = field(default_factory=utcnow)
    usage_source: str = "engine"

    def __post_init__(self) -> None:
        source = self.usage_source
        if not isinstance(source, str) or source not in USAGE_SOURCES:
            raise ValueError(f"usage_source must be one of {USAGE_SOURCES}, got {source!r}")
        # An enum member of those values (spigot.engine.types.UsageSource) becomes its plain
        # value: the entry then equals the one read back, and str() of a (str, Enum) member
        # would be its name ("UsageSource.ENGINE").
        object.__setattr__(self, "usage_source", str.__str__(source))


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage summed over one group; the fields not grouped on are None.

    ``key_id`` None (with ``by="key"``) is the traffic that carried no key.
    """

    key_id: int | None
    key_name: str | None
    model: str | None
    day: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_pusd: int
