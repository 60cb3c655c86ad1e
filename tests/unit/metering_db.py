"""Databases for tests of what sits on the metering store: a SQLite file or PostgreSQL.

As in test_metering_store.py: one fresh PostgreSQL database per test module (on the server
named by SPIGOT_TEST_POSTGRES, dropped at the end), emptied before each test; PostgreSQL tests
fail when that server cannot be reached
(SPIGOT_TEST_POSTGRES_OPTIONAL=1 skips them instead).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from spigot.metering import open_store
from spigot.metering.db import is_postgres_url, sqlite_path

PG_SERVER = os.environ.get("SPIGOT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLES = ("api_keys", "reservations", "rate_windows", "ledger", "usage_daily")


class PgDatabase:
    """One database made for a test module, migrated once, dropped by ``close``."""

    def __init__(self) -> None:
        self.admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=3)
        self.name = f"spigot_test_{secrets.token_hex(6)}"
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = urlunsplit(urlsplit(PG_SERVER)._replace(path=f"/{self.name}"))
        open_store(self.url).close()

    def empty(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")

    def close(self) -> None:
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[PgDatabase]:
    try:
        database = PgDatabase()
    except psycopg.OperationalError as exc:
        # A missing server is a failure, never a silent skip, unless asked for.
        if os.environ.get("SPIGOT_TEST_POSTGRES_OPTIONAL") == "1":
            pytest.skip(f"no PostgreSQL at {PG_SERVER}: {exc}")
        pytest.fail(f"no PostgreSQL at {PG_SERVER} (set SPIGOT_TEST_POSTGRES): {exc}")
    try:
        yield database
    finally:
        database.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated database's URL, on each backend."""
    if request.param == "sqlite":
        url = str(tmp_path / "metering.db")
        open_store(url).close()
        return url
    database: PgDatabase = request.getfixturevalue("pg_database")
    database.empty()
    return database.url


def execute(url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """One statement on the database behind ``url``, outside the store (``?`` placeholders)."""
    if is_postgres_url(url):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), params)
        return
    with closing(sqlite3.connect(sqlite_path(url), isolation_level=None)) as conn:
        conn.execute(sql, params)
