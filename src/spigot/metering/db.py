"""One connection to SQLite or PostgreSQL, used one transaction at a time by many threads.

The store writes its SQL once, with ``?`` placeholders, in the dialect both databases share
(``ON CONFLICT`` upserts, ``RETURNING``, epoch-second doubles); this module turns ``?`` into
psycopg's ``%s`` and hides how each driver begins, commits and fails.

* SQLite: WAL (readers never block the writer), a busy timeout, and writes in
  ``BEGIN IMMEDIATE`` so a transaction takes the database's write lock before it reads what
  it will decide on: two connections (or processes) cannot both pass a budget check.
* PostgreSQL: autocommit plus an explicit transaction block per call, so no connection is ever
  left idle inside a transaction; rows that decide are locked with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from spigot.metering.errors import StoreUnavailable

if TYPE_CHECKING:
    import psycopg

Dialect = Literal["sqlite", "postgresql"]
Params = Sequence[Any]
# A row's values are whatever the column holds (int, float, str, None): the store reads each
# by position and converts it where its type matters.
Row = tuple[Any, ...]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Conflict(Exception):
    """A unique or foreign-key constraint refused a write (the transaction is rolled back)."""


@functools.lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    # The store's SQL never holds a literal '?' or '%', so the swap is safe.
    return sql.replace("?", "%s")


class Cursor(Protocol):
    """What Tx needs of a DB-API cursor: sqlite3's and psycopg's both have it."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Params, /) -> object: ...

    def fetchall(self) -> Sequence[Sequence[Any]]: ...


class Tx:
    """The statements of one transaction."""

    def __init__(
        self,
        cursor: Cursor,
        dialect: Dialect,
        integrity_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._cursor = cursor
        self.dialect = dialect
        self._integrity_errors = integrity_errors
        # SQLite has no row locks: BEGIN IMMEDIATE already holds the whole database.
        self.for_update = " FOR UPDATE" if dialect == "postgresql" else ""

    def execute(self, sql: str, params: Params = ()) -> int:
        """Runs one statement; the number of rows it changed."""
        if self.dialect == "postgresql":
            sql = _pyformat(sql)
        try:
            self._cursor.execute(sql, params)
        except self._integrity_errors as exc:
            raise Conflict(str(exc)) from exc
        return self._cursor.rowcount

    def one(self, sql: str, params: Params = ()) -> Row | None:
        # fetchall, not fetchone: a statement left half-read must not outlive its use.
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        self.execute(sql, params)
        return [tuple(row) for row in self._cursor.fetchall()]


class Database(ABC):
    dialect: Dialect

    @abstractmethod
    def transaction(self, *, write: bool = True) -> AbstractContextManager[Tx]:
        """One transaction, committed on success, rolled back on error."""

    @abstractmethod
    def close(self) -> None: ...


class SqliteDatabase(Database):
    dialect: Dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout: float = 10.0) -> None:
        if path != ":memory:":
            path = str(Path(path).expanduser())
        # isolation_level=None: the driver starts no transactions of its own; we do.
        self._conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        self._enable_wal(busy_timeout)
        self._conn.execute("PRAGMA foreign_keys=ON")

    def _enable_wal(self, within: float) -> None:
        # Switching a fresh file to WAL takes an exclusive lock, and SQLite
        # may answer "database is locked" at once instead of waiting on the
        # busy timeout when several processes open the file together (workers
        # starting at once): retry for as long as that timeout.
        deadline = time.monotonic() + within
        delay = 0.005
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield Tx(self._conn.cursor(), "sqlite", (sqlite3.IntegrityError,))
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreUnavailable(f"SQLite database stayed locked: {exc}") from exc
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresDatabase(Database):
    dialect: Dialect = "postgresql"

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        import psycopg  # only a Postgres store needs the driver loaded

        self._url = url
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._integrity: tuple[type[BaseException], ...] = (psycopg.errors.IntegrityError,)
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        options = psycopg.conninfo.conninfo_to_dict(self._url)
        options.setdefault("connect_timeout", max(1, round(self._connect_timeout)))
        options.setdefault("application_name", "spigot")
        try:
            # What connect(**options) would build itself, but typed.
            return psycopg.connect(psycopg.conninfo.make_conninfo("", **options), autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        import psycopg

        with self._lock:
            try:
                with ExitStack() as stack:
                    # Entered already: the stack only has to exit it.
                    stack.push(self._begin())
                    cursor = stack.enter_context(self._conn.cursor())
                    yield Tx(cursor, "postgresql", self._integrity)
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"PostgreSQL failed: {exc}") from exc

    def _begin(self) -> AbstractContextManager[psycopg.Transaction]:
        """Enters a transaction block (sends BEGIN), on a new connection if the old one died
        while idle (server restart, idle timeout): nothing had been sent, so a retry is safe.
        The block is returned entered: the caller only exits it."""
        import psycopg

        if not (self._conn.closed or self._conn.broken):
            block = self._conn.transaction()
            try:
                block.__enter__()
                return block
            except psycopg.OperationalError:
                if not self._conn.broken:
                    raise
        self._conn.close()
        self._conn = self._connect()
        block = self._conn.transaction()
        block.__enter__()
        return block

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def is_postgres_url(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def sqlite_path(url: str) -> str:
    """``sqlite:///rel.db``, ``sqlite:////abs.db`` (SQLAlchemy's spelling), ``sqlite://``
    (in memory) or a plain path."""
    if url.startswith("sqlite://"):
        return url.removeprefix("sqlite://").removeprefix("/") or ":memory:"
    return url


def connect(url: str) -> Database:
    if is_postgres_url(url):
        return PostgresDatabase(url)
    return SqliteDatabase(sqlite_path(url))
