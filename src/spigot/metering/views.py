"""Keys and usage as JSON-ready dicts: one shape for ``spigot keys list --format json``,
``spigot usage --format json`` and the admin API, so scripts can switch between them.

Money is a decimal string of USD (``"12.50"``), never a float: JSON numbers are doubles in
most clients, and a budget read back must equal the budget set.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from spigot.metering.money import usd
from spigot.metering.records import ApiKey, UsageBy, UsageRow, utcnow

CENT = Decimal("0.01")
USAGE_COUNTS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens")


def usd_text(pico: int) -> str:
    """Pico-USD as exact dollars with at least two decimals: ``"12.50"``, ``"0.000042"``."""
    amount = usd(pico)
    if amount == amount.quantize(CENT):
        return f"{amount:.2f}"
    # More precise than cents: show every significant digit, never round money away.
    return f"{amount.normalize():f}"


def iso(moment: datetime | None) -> str | None:
    """UTC, whole seconds, ``Z``: ``2027-01-31T00:00:00Z``."""
    if moment is None:
        return None
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def key_status(key: ApiKey, now: datetime | None = None) -> str:
    if key.revoked:
        return "revoked"
    return "expired" if key.expired(now if now is not None else utcnow()) else "active"


def key_dict(key: ApiKey, now: datetime | None = None) -> dict[str, Any]:
    """Everything about a key except its secret, which the store never has."""
    remaining = key.remaining_pusd
    return {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "status": key_status(key, now),
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
        "budget_usd": None if key.budget_pusd is None else usd_text(key.budget_pusd),
        "spent_usd": usd_text(key.spent_pusd),
        "remaining_usd": None if remaining is None else usd_text(remaining),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "max_concurrent": key.max_concurrent,
        "models": None if key.models is None else list(key.models),
        "admin": key.admin,
    }


def usage_group(row: UsageRow, by: UsageBy) -> dict[str, Any]:
    if by == "key":
        # key_id None is the traffic that carried no key (auth off).
        return {"key_id": row.key_id, "key_name": row.key_name}
    if by == "model":
        return {"model": row.model}
    return {"day": row.day}


def since_day(since: datetime | None) -> str | None:
    """The first UTC day ``store.usage(since=...)`` counts: usage is kept per day."""
    return None if since is None else since.astimezone(UTC).date().isoformat()


def usage_dict(rows: list[UsageRow], by: UsageBy, since: datetime | None) -> dict[str, Any]:
    """The usage report: one item per group, and their total."""
    data = [
        {
            **usage_group(row, by),
            **{name: getattr(row, name) for name in USAGE_COUNTS},
            "cost_usd": usd_text(row.cost_pusd),
        }
        for row in rows
    ]
    total = {name: sum(getattr(row, name) for row in rows) for name in USAGE_COUNTS}
    return {
        "object": "usage",
        "by": by,
        "since": since_day(since),
        "data": data,
        "total": {**total, "cost_usd": usd_text(sum(row.cost_pusd for row in rows))},
    }
