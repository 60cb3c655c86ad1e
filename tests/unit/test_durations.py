"""Durations and dates as typed for key expiry and usage windows (spigot.metering.durations)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from spigot.metering.durations import (
    MAX_DURATION,
    parse_duration,
    parse_expiry,
    parse_instant,
    parse_since,
)

NOW = datetime(2026, 11, 15, 10, 30, 45, 123456, tzinfo=UTC)
WHOLE_NOW = NOW.replace(microsecond=0)


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("90m", timedelta(minutes=90)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
        (" 7D ", timedelta(days=7)),
        ("3 h", timedelta(hours=3)),
        ("36525d", MAX_DURATION),
    ],
)
def test_durations(text: str, span: timedelta) -> None:
    assert parse_duration(text) == span


@pytest.mark.parametrize(
    "text", ["", "d", "30", "0d", "-1d", "1.5h", "30days", "1y", "1h30m", "36526d", "P30D"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_instants_are_utc_in_whole_seconds() -> None:
    assert parse_instant("2027-01-31") == datetime(2027, 1, 31, tzinfo=UTC)
    assert parse_instant("20270131") == datetime(2027, 1, 31, tzinfo=UTC)
    assert parse_instant("2027-01-31T12:00:00Z") == datetime(2027, 1, 31, 12, tzinfo=UTC)
    moved = parse_instant("2027-01-31T12:00:00.9+02:00")
    assert moved == datetime(2027, 1, 31, 10, tzinfo=UTC) and moved.tzinfo is UTC


@pytest.mark.parametrize("text", ["2027-13-01", "2027-02-30", "tomorrow", "31/01/2027", ""])
def test_bad_instants(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a duration .* or a date"):
        parse_instant(text)


def test_a_time_without_an_offset_is_refused() -> None:
    # Whose local time would it be: the CLI's machine or the server's?
    with pytest.raises(ValueError, match="needs a UTC offset"):
        parse_instant("2027-01-31T12:00:00")


def test_since() -> None:
    assert parse_since("7d", now=NOW) == WHOLE_NOW - timedelta(days=7)
    assert parse_since("24h", now=NOW) == WHOLE_NOW - timedelta(hours=24)
    assert parse_since("2026-11-01", now=NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T06:00:00Z", now=NOW) == datetime(2026, 11, 1, 6, tzinfo=UTC)
    # Without now: the real clock, in UTC.
    recent = parse_since("1h")
    assert recent.tzinfo is UTC and recent.microsecond == 0
    assert abs(datetime.now(UTC) - timedelta(hours=1) - recent) < timedelta(seconds=5)
    for bad in ("7x", "0d", "2026-11-31"):
        with pytest.raises(ValueError):
            parse_since(bad, now=NOW)


def test_expiry() -> None:
    assert parse_expiry("30d", now=NOW) == WHOLE_NOW + timedelta(days=30)
    assert parse_expiry("90m", now=NOW) == WHOLE_NOW + timedelta(minutes=90)
    # A date: midnight UTC at its start.
    assert parse_expiry("2027-01-31", now=NOW) == datetime(2027, 1, 31, tzinfo=UTC)
    assert parse_expiry("2026-11-15T12:00:00+01:00", now=NOW) == datetime(
        2026, 11, 15, 11, tzinfo=UTC
    )
    moments = [parse_expiry("12h"), parse_expiry("2099-01-01T00:00:00Z")]
    assert all(m.tzinfo is UTC and m > datetime.now(UTC) for m in moments)


@pytest.mark.parametrize(
    "text", ["2026-11-15", "2026-11-14", "2026-11-15T10:30:45Z", "2026-11-15T11:30:00+01:00"]
)
def test_an_expiry_already_past_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="already past"):
        parse_expiry(text, now=NOW)


def test_expiry_a_timezone_aware_now_in_another_zone() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert parse_expiry("1h", now=local) == WHOLE_NOW + timedelta(hours=1)
    assert parse_expiry("1h", now=local).tzinfo is UTC
