"""The ledger's usage_source: where each row's token counts come from. On a SQLite file and on
PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from spigot.engine.types import UsageSource as EngineUsageSource
from spigot.metering import USAGE_SOURCES, LedgerEntry, Store, open_store
from spigot.metering.db import connect
from spigot.metering.migrations import LATEST, MIGRATIONS, migrate
from tests.unit import metering_db
from tests.unit.metering_db import rows

# The shared database fixtures: pytest looks fixtures up by name in the module.
db_url = metering_db.db_url
fresh_url = metering_db.fresh_url
pg_database = metering_db.pg_database
pg_server = metering_db.pg_server

T0 = datetime(2030, 1, 1, 0, 0, 10, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def entry(request_id: str, key_id: int | None, **fields: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_pusd": 100,
        "duration_ms": 340,
        "created_at": at(1),
    }
    values.update(fields)
    return LedgerEntry(request_id=request_id, key_id=key_id, **values)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with open_store(db_url) as opened:
        yield opened


def test_the_ledger_speaks_the_engines_values() -> None:
    # The server passes the engine's enum; the store checks against its own list.
    assert tuple(source.value for source in EngineUsageSource) == USAGE_SOURCES


def test_an_entry_takes_only_a_known_source() -> None:
    assert entry("r", None).usage_source == "engine"
    for bad in ("", "Engine", "estimated", " engine", None, 1):
        with pytest.raises(ValueError, match="usage_source must be one of"):
            entry("r", None, usage_source=bad)
    # An enum member is kept as its plain value.
    upstream = entry("r", None, usage_source=EngineUsageSource.UPSTREAM)
    assert type(upstream.usage_source) is str and upstream.usage_source == "upstream"
    assert upstream == entry("r", None, usage_source="upstream")


def test_each_source_is_kept_on_its_row(db_url: str, store: Store) -> None:
    key, _ = store.create_key("k")
    for i, source in enumerate(USAGE_SOURCES):
        assert store.settle(entry(f"r{i}", key.id, usage_source=source, created_at=at(i)))
    assert store.settle(
        entry("enum", None, usage_source=EngineUsageSource.COUNTED, created_at=at(9))
    )
    assert store.settle(entry("default", None, created_at=at(10)))

    expected = [*((f"r{i}", s) for i, s in enumerate(USAGE_SOURCES)), ("enum", "counted")]
    expected.append(("default", "engine"))
    assert [(row.request_id, row.usage_source) for row in store.ledger()] == expected
    assert rows(db_url, "SELECT request_id, usage_source FROM ledger ORDER BY id") == expected
    # The rollups are per key, model and day, whatever counted the tokens.
    assert sum(row.requests for row in store.usage(by="model")) == len(expected)


def test_rows_billed_from_checkpoints_are_partial(store: Store) -> None:
    key, _ = store.create_key("k")
    # A request whose server was killed: billed at the next start-up.
    assert store.admit(key, request_id="killed", model="m", endpoint="chat", now=T0).ok
    assert store.checkpoint(
        "killed", prompt_tokens=10, cached_tokens=0, completion_tokens=3, cost_pusd=30, now=at(2)
    )
    assert store.clear_reservations() == 1
    # One that went silent for an hour: billed when its key is next admitted...
    assert store.admit(key, request_id="silent", model="m", endpoint="chat", now=at(10)).ok
    assert store.admit(key, request_id="next", now=at(10 + 3601)).ok
    # ...or by the sweep over every key.
    idle, _ = store.create_key("idle")
    assert store.admit(idle, request_id="idle", model="m", now=at(20)).ok
    assert store.bill_stale_reservations(now=at(20 + 3601)) == 1

    billed = {row.request_id: row for row in store.ledger()}
    assert set(billed) == {"killed", "silent", "idle"}
    for row in billed.values():
        assert (row.status, row.usage_source) == ("interrupted", "partial")
    assert billed["killed"].completion_tokens == 3

    # The request settling after all replaces its interrupted row, source and all.
    final = entry("killed", key.id, completion_tokens=4, usage_source="upstream")
    assert store.settle(final)
    assert {row.request_id: row for row in store.ledger()}["killed"] == final


def test_a_ledger_from_before_is_migrated(fresh_url: str) -> None:
    db = connect(fresh_url)
    try:
        assert migrate(db, MIGRATIONS[:2]) == [1, 2]
    finally:
        db.close()
    insert = (
        "INSERT INTO ledger (request_id, key_id, model, endpoint, prompt_tokens, cached_tokens, "
        "completion_tokens, cost_pusd, duration_ms, status, created_at) "
        "VALUES (?, NULL, 'm', 'chat', 1, 0, 1, 0, 5, ?, ?)"
    )
    for request_id, status in (("done", "ok"), ("cut", "disconnected"), ("died", "interrupted")):
        rows(fresh_url, insert, (request_id, status, T0.timestamp()))

    with open_store(fresh_url) as store:
        assert [(row.request_id, row.usage_source) for row in store.ledger()] == [
            ("done", "engine"),
            ("cut", "engine"),
            ("died", "partial"),
        ]
    versions = rows(fresh_url, "SELECT version FROM schema_migrations ORDER BY version")
    # Later migrations (stored responses...) apply too.
    assert versions == [(v,) for v in range(1, LATEST + 1)]
    # NOT NULL DEFAULT 'engine': a writer that leaves it out gets the default, never NULL.
    rows(fresh_url, insert, ("later", "ok", T0.timestamp()))
    assert rows(fresh_url, "SELECT usage_source FROM ledger WHERE request_id = 'later'") == [
        ("engine",)
    ]
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.NotNullViolation)):
        rows(fresh_url, "UPDATE ledger SET usage_source = NULL")
