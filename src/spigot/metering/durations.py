"""Times as people type them for keys and usage: ``30d``, ``12h``, ``90m``, ``2027-01-31``.

Shared by the CLI and the admin API, so both read ``--expires 30d`` and ``"expires_in": "30d"``
the same way. Every result is a timezone-aware UTC datetime in whole seconds (the store
refuses naive ones, and sub-second noise only clutters listings).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from spigot.metering.records import utcnow

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION = re.compile(r"([0-9]+)\s*([smhdw])")
# timedelta's own ceiling is 999,999,999 days; a century is far past any sane key lifetime
# and keeps every ``now + duration`` inside datetime's range.
MAX_DURATION = timedelta(days=36525)
MAX_SECONDS = int(MAX_DURATION.total_seconds())
FORMS = "a duration such as 30d, 12h, 90m (units s, m, h, d, w) or a date such as 2027-01-31"


def parse_duration(text: str) -> timedelta:
    """``"30d"`` -> 30 days. A positive whole number and one unit: s, m, h, d or w."""
    match = DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"expected a duration such as 30d, 12h or 90m, got {text!r}")
    # Compared as a number of seconds: timedelta itself overflows on "99999999999d" (and
    # int() refuses thousands of digits with a message of its own).
    digits = match[1].lstrip("0") or "0"
    seconds = int(digits) * UNITS[match[2]] if len(digits) <= 12 else MAX_SECONDS + 1
    if not seconds:
        raise ValueError(f"a duration must be longer than zero, got {text!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"a duration must be at most 36525d (a century), got {text!r}")
    return timedelta(seconds=seconds)


def parse_instant(text: str) -> datetime:
    """An ISO 8601 date (midnight UTC that day) or date-time with a UTC offset (``Z`` or
    ``+02:00``). A date-time without an offset is refused: it would be read as some
    machine's local time, and the CLI and the server need not agree on which."""
    stripped = text.strip()
    try:
        day = date.fromisoformat(stripped)
    except ValueError:
        pass
    else:
        return datetime.combine(day, datetime.min.time(), UTC)
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(f"expected {FORMS}, got {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(
            f"a date-time needs a UTC offset (2027-01-31T12:00:00Z or +02:00), got {text!r}"
        )
    return moment.astimezone(UTC).replace(microsecond=0)


def _is_duration(text: str) -> bool:
    return DURATION.fullmatch(text.strip().lower()) is not None


def _now(now: datetime | None) -> datetime:
    return (now if now is not None else utcnow()).astimezone(UTC).replace(microsecond=0)


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """The start of a usage window: ``"7d"`` is seven days before now, a date is midnight UTC
    that day, a date-time is that instant."""
    if _is_duration(text):
        return _now(now) - parse_duration(text)
    return parse_instant(text)


def parse_expiry(text: str, *, now: datetime | None = None) -> datetime:
    """When a key stops working: ``"30d"`` is thirty days from now, a date is midnight UTC at
    the start of that day (``2027-01-31``: the key works through January 30th), a date-time
    is that instant. A moment already past is refused: it would make a dead key."""
    current = _now(now)
    if _is_duration(text):
        return current + parse_duration(text)
    moment = parse_instant(text)
    if moment <= current:
        raise ValueError(f"the expiry {text!r} is already past")
    return moment
