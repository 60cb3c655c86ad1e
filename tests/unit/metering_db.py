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


class PgServer:
    """Creates databases on the test server and drops them all at ``close``."""

    def __init__(self) -> None:
        self.admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=3)
        self.created: list[str] = []

    def create(self) -> str:
        """A new, empty database's URL."""
        name = f"spigot_test_{secrets.token_hex(6)}"
        self.admin.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return urlunsplit(urlsplit(PG_SERVER)._replace(path=f"/{name}"))

    def close(self) -> None:
        for name in self.created:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.close()


def empty(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


class PgDatabase:
    """One migrated database made for a test module."""

    def __init__(self, server: PgServer) -> None:
        self.url = server.create()
        open_store(self.url).close()

    def empty(self) -> None:
        empty(self.url)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    try:
        server = PgServer()
    except psycopg.OperationalError as exc:
        # A missing server is a failure, never a silent skip, unless asked for.
        if os.environ.get("SPIGOT_TEST_POSTGRES_OPTIONAL") == "1":
            pytest.skip(f"no PostgreSQL at {PG_SERVER}: {exc}")
        pytest.fail(f"no PostgreSQL at {PG_SERVER} (set SPIGOT_TEST_POSTGRES): {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def pg_database(pg_server: PgServer) -> PgDatabase:
    return PgDatabase(pg_server)


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


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """What one statement on the database behind ``url`` returns (none for a write), outside
    the store."""
    if is_postgres_url(url):
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []
    with closing(sqlite3.connect(sqlite_path(url), isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database that exists but was never migrated, on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "fresh.db")
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create()
