"""The store's values: keys, admissions, ledger entries, usage rows; and its clock.

The API speaks timezone-aware UTC datetimes; the database keeps epoch seconds (a double in
both dialects), so the SQL is the same for SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

# "sequences": the request alone runs more sequences (n) than the key's max_concurrent.
Reason = Literal["revoked", "expired", "sequences", "concurrency", "rpm", "tpm", "budget"]
UsageBy = Literal["key", "model", "day"]


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
    the request's last checkpoint, and a settle that comes later replaces it.
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
