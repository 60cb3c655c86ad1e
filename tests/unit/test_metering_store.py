"""The metering store against a real SQLite file and a real PostgreSQL database.

Every store test runs on both backends. PostgreSQL: one fresh database per module (created on
the server named by SPIGOT_TEST_POSTGRES, dropped at the end), emptied before each test;
failed when that server cannot be reached
(SPIGOT_TEST_POSTGRES_OPTIONAL=1 skips them instead).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from spigot.metering import (
    UNSET,
    DuplicateKeyName,
    DuplicateRequest,
    KeyNotFound,
    LedgerEntry,
    Price,
    ReservationNotFound,
    SchemaTooNew,
    Store,
    StoreError,
    cost,
    open_store,
    parse_usd,
    usd,
)
from spigot.metering.db import SqliteDatabase, connect, sqlite_path
from spigot.metering.keys import hash_secret, key_prefix, new_secret
from spigot.metering.migrations import LATEST, MIGRATIONS, migrate
from spigot.metering.prices import PriceError, PriceTable
from tests.unit import metering_db
from tests.unit.metering_db import TABLES, PgServer

pg_server = metering_db.pg_server

# Whole seconds, ten seconds into a minute: the rate window ends 50 s later.
T0 = datetime(2030, 1, 1, 0, 0, 10, tzinfo=UTC)
WINDOW_LEFT = 50.0
R = 1_000_000  # one reservation, pico-USD

T = TypeVar("T")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- databases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url(pg_server: PgServer) -> str:
    url = pg_server.create()
    open_store(url).close()  # migrated once; tests empty the tables
    return url


@dataclass
class Backend:
    kind: str  # sqlite | postgres
    url: str
    fresh_url: Callable[[], str]
    stores: list[Store] = field(default_factory=list)

    def open(self, url: str | None = None, **kwargs: Any) -> Store:
        store = open_store(url or self.url, **kwargs)
        self.stores.append(store)
        return store

    def rows(self, sql: str, params: tuple[Any, ...] = (), url: str | None = None) -> list[tuple]:
        url = url or self.url
        if self.kind == "sqlite":
            with closing(sqlite3.connect(sqlite_path(url), isolation_level=None)) as conn:
                return conn.execute(sql, params).fetchall()
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def value(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.rows(sql, params)[0][0]

    def tables(self) -> list[str]:
        if self.kind == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        else:
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        return sorted(row[0] for row in self.rows(sql))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        counter = iter(range(1000))
        b = Backend(
            "sqlite", str(tmp_path / "metering.db"), lambda: str(tmp_path / f"{next(counter)}.db")
        )
    else:
        pg: PgServer = request.getfixturevalue("pg_server")
        url = request.getfixturevalue("pg_url")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        b = Backend("postgres", url, pg.create)
    try:
        yield b
    finally:
        for store in b.stores:
            store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def run_at_once(count: int, work: Callable[[int], T]) -> list[T]:
    """``work(i)`` in ``count`` threads released together; results in index order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return results


def entry(request_id: str, key_id: int | None, **fields: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "prompt_tokens": 10,
        "cached_tokens": 0,
        "completion_tokens": 5,
        "cost_pusd": 100,
        "ttft_ms": 12,
        "duration_ms": 340,
        "finish_reason": "stop",
        "status": "ok",
        "created_at": at(1),
    }
    values.update(fields)
    return LedgerEntry(request_id=request_id, key_id=key_id, **values)


# -- money and secrets (no database) -------------------------------------------------------


def test_prices_and_costs_are_exact() -> None:
    price = Price.per_million(prompt="0.15", cached="0.075", completion="0.60")
    assert price == Price(prompt=150_000, cached=75_000, completion=600_000)
    # 600 uncached + 400 cached prompt tokens, 500 completion tokens.
    assert cost(price, 1000, 400, 500) == 420_000_000
    assert usd(cost(price, 1000, 400, 500)) == Decimal("0.00042")
    # The smallest quotable price is one pico-USD per token; a million of them is exact.
    tiny = Price.per_million(prompt="0.000001", completion=Decimal("0.000001"))
    assert tiny.cached == tiny.prompt == 1
    assert sum(cost(tiny, 1, 0, 0) for _ in range(1_000_000)) == parse_usd("0.000001")
    assert usd(sum(cost(price, 7, 3, 11) for _ in range(3))) == Decimal("0.000022275")

    assert parse_usd("12.50") == 12_500_000_000_000
    assert parse_usd("$0.000000000001") == 1
    assert usd(parse_usd("123456.789")) == Decimal("123456.789")
    for bad in ("0.0000000000001", "-1", "nan", "abc"):
        with pytest.raises(ValueError):
            parse_usd(bad)
    with pytest.raises(ValueError, match="more than 6 decimals"):
        Price.per_million(prompt="0.0000001", completion="1")
    with pytest.raises(TypeError):
        Price.per_million(prompt=0.15, completion="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cost(price, 10, 11, 0)


def test_secrets_hashes_and_prefixes() -> None:
    secret = new_secret()
    assert secret.startswith("sk-spigot-") and len(secret) == len("sk-spigot-") + 43
    assert new_secret() != secret
    assert len(hash_secret(secret)) == 64 and hash_secret(secret) == hash_secret(secret)
    assert key_prefix(secret) == secret[:14]


def test_sqlite_urls() -> None:
    assert sqlite_path("sqlite:///rel.db") == "rel.db"
    assert sqlite_path("sqlite:////abs/x.db") == "/abs/x.db"
    assert sqlite_path("sqlite://") == ":memory:"
    assert sqlite_path("/plain/path.db") == "/plain/path.db"
    with open_store("sqlite://") as store:
        assert store.dialect == "sqlite" and not store.has_keys()


# -- keys ------------------------------------------------------------------------------------


def test_create_and_authenticate(store: Store) -> None:
    assert not store.has_keys()
    key, secret = store.create_key(
        "alice", budget_pusd=parse_usd("5"), rpm=60, tpm=10_000, models="b, a", admin=True
    )
    assert key.id == 1 and key.name == "alice" and key.prefix == secret[:14]
    assert (
        key.budget_pusd == 5 * 10**12
        and key.spent_pusd == 0
        and key.remaining_pusd == key.budget_pusd
    )
    assert key.models == ("a", "b") and key.allows_model("a") and not key.allows_model("c")
    assert key.admin and not key.revoked and not key.expired()
    assert key.created_at.tzinfo is not None
    assert store.authenticate(secret) == key
    assert store.authenticate(secret + "x") is None
    assert store.authenticate("") is None
    assert store.get_key("alice") == store.get_key(key.id) == store.get_key(str(key.id)) == key
    assert store.get_key("bob") is None and store.get_key(99) is None
    # Ids past a BIGINT match nothing (the drivers would refuse the value: a 500).
    huge = 10**20
    assert store.get_key(huge) is None and store.get_key(str(huge)) is None
    assert store.revoke_key(str(huge)) is False

    bob, bob_secret = store.create_key("bob")
    assert bob.models is None and bob.budget_pusd is None and not bob.admin
    assert store.authenticate(bob_secret) == bob
    assert [k.name for k in store.list_keys()] == ["alice", "bob"]
    assert store.has_keys()


def test_only_the_hash_of_a_secret_is_stored(backend: Backend, store: Store) -> None:
    made = [store.create_key(f"k{i}") for i in range(3)]
    dump = "\n".join(
        repr(row) for table in backend.tables() for row in backend.rows(f"SELECT * FROM {table}")
    )
    for key, secret in made:
        assert hash_secret(secret) in dump and key.prefix in dump
        assert secret not in dump
        assert secret[len(key.prefix) :] not in dump  # the part that is secret
    if backend.kind == "sqlite":
        raw = b"".join(p.read_bytes() for p in Path(backend.url).parent.glob("metering.db*"))
        assert all(secret[14:].encode() not in raw for _, secret in made)


def test_names_must_be_unique_and_not_numbers(store: Store) -> None:
    store.create_key("alice")
    with pytest.raises(DuplicateKeyName, match="'alice' already exists") as caught:
        store.create_key("alice")
    assert isinstance(caught.value, StoreError)
    store.create_key("bob")
    with pytest.raises(DuplicateKeyName):
        store.update_key("bob", name="alice")
    for bad in ("", " alice", "42"):
        with pytest.raises(ValueError):
            store.create_key(bad)
    for limits in ({"rpm": 0}, {"tpm": -1}, {"max_concurrent": True}, {"budget_pusd": -1}):
        with pytest.raises(ValueError):
            store.create_key("carol", **limits)
    assert [k.name for k in store.list_keys()] == ["alice", "bob"]


def test_revoke(store: Store) -> None:
    key, secret = store.create_key("alice")
    assert store.revoke_key("alice", now=T0)
    assert not store.revoke_key("alice")  # already revoked
    assert not store.revoke_key("nobody")
    found = store.authenticate(secret)
    assert found is not None and found.revoked and found.revoked_at == T0
    assert store.list_keys() == [] and store.list_keys(include_revoked=True) == [found]
    # A revoked last key still counts: keys stay required (auth never fails open).
    assert store.has_keys()
    refused = store.admit(key, request_id="r1", now=T0)
    assert not refused.ok and refused.reason == "revoked"


def test_expiry(store: Store) -> None:
    key, secret = store.create_key("alice", expires_at=at(60))
    assert key.expires_at == at(60)
    found = store.authenticate(secret)
    assert found is not None and not found.expired(T0) and found.expired(at(60))
    assert store.admit(key, request_id="r1", now=T0).ok
    late = store.admit(key, request_id="r2", now=at(61))
    assert not late.ok and late.reason == "expired"
    # Expired keys still count as keys: the server keeps asking for one.
    assert store.has_keys()
    with pytest.raises(ValueError, match="timezone-aware"):
        store.create_key("bob", expires_at=datetime(2030, 1, 1))


def test_update(store: Store) -> None:
    key, secret = store.create_key("alice", rpm=10, budget_pusd=500)
    updated = store.update_key("alice", tpm=1000, models=["x"], max_concurrent=3)
    assert (updated.rpm, updated.tpm, updated.budget_pusd) == (10, 1000, 500)
    assert updated.models == ("x",) and updated.max_concurrent == 3
    cleared = store.update_key(key.id, rpm=None, budget_pusd=None, models=None)
    assert cleared.rpm is None and cleared.budget_pusd is None and cleared.models is None
    assert cleared.tpm == 1000  # untouched
    renamed = store.update_key(str(key.id), name="alicia", expires_at=at(5), admin=True)
    assert renamed.name == "alicia" and renamed.expires_at == at(5) and renamed.admin
    assert store.update_key("alicia", expires_at=None).expires_at is None
    assert store.update_key("alicia") == store.get_key("alicia")
    assert store.update_key("alicia", name=UNSET).name == "alicia"
    assert store.authenticate(secret) == store.get_key(key.id)
    with pytest.raises(KeyNotFound):
        store.update_key("nobody", rpm=1)
    with pytest.raises(ValueError):
        store.update_key("alicia", rpm=0)


# -- admission -------------------------------------------------------------------------------


def test_admission_reasons_in_order(store: Store) -> None:
    key, _ = store.create_key("k", max_concurrent=2, rpm=2, tpm=100, budget_pusd=1000)

    first = store.admit(key, request_id="r1", reserve_pusd=300, tokens=40, now=T0)
    assert first.ok and first.reason is None and first.retry_after is None
    assert (first.limit_requests, first.remaining_requests, first.reset_requests) == (2, 1, 50.0)
    assert (first.limit_tokens, first.remaining_tokens, first.reset_tokens) == (100, 60, 50.0)
    assert store.admit(key, request_id="r2", reserve_pusd=300, tokens=40, now=T0).ok

    # Two in flight and two requests this minute: concurrency is checked first.
    busy = store.admit(key, request_id="r3", reserve_pusd=1, tokens=1, now=T0)
    assert (busy.ok, busy.reason, busy.retry_after) == (False, "concurrency", None)
    assert busy.remaining_requests == 0 and busy.remaining_tokens == 20

    assert store.release("r2")
    rpm = store.admit(key, request_id="r3", reserve_pusd=1, tokens=1000, now=T0)
    assert (rpm.reason, rpm.retry_after) == ("rpm", WINDOW_LEFT)

    # A new minute. Larger than the whole tpm: waiting would not help.
    huge = store.admit(key, request_id="r3", reserve_pusd=1, tokens=101, now=at(60))
    assert (huge.reason, huge.retry_after) == ("tpm", None)
    assert store.admit(key, request_id="r3", reserve_pusd=600, tokens=70, now=at(60)).ok
    # Everything fails at once (r1 and r3 run): concurrency wins.
    both = store.admit(key, request_id="r4", reserve_pusd=10_000, tokens=31, now=at(70))
    assert (both.reason, both.retry_after) == ("concurrency", None)
    assert store.settle(entry("r1", key.id, cost_pusd=100, created_at=at(70)))
    # tpm (70 + 31 > 100) before budget.
    over = store.admit(key, request_id="r4", reserve_pusd=10_000, tokens=31, now=at(70))
    assert (over.reason, over.retry_after) == ("tpm", 40.0)
    # spent 100 + held 600 + 301 > 1000
    broke = store.admit(key, request_id="r4", reserve_pusd=301, tokens=30, now=at(70))
    assert (broke.reason, broke.retry_after) == ("budget", None)
    last = store.admit(key, request_id="r4", reserve_pusd=300, tokens=30, now=at(70))
    assert last.ok and last.remaining_requests == 0 and last.remaining_tokens == 0


def test_unlimited_key_and_duplicate_request(store: Store) -> None:
    key, _ = store.create_key("free")
    ok = store.admit(key, request_id="r1", reserve_pusd=10**15, tokens=10**9, now=T0)
    assert ok.ok and ok.limit_requests is None and ok.remaining_tokens is None
    with pytest.raises(DuplicateRequest):
        store.admit(key, request_id="r1", now=T0)
    with pytest.raises(KeyNotFound):
        store.admit(999, request_id="r2", now=T0)
    # The failed transactions left the connection usable.
    assert store.admit(key.id, request_id="r2", now=T0).ok


def test_rate_windows_and_retry_after(backend: Backend, store: Store) -> None:
    key, _ = store.create_key("k", rpm=2, tpm=100)
    assert store.admit(key, request_id="a", tokens=60, now=T0).remaining_tokens == 40
    assert store.admit(key, request_id="b", tokens=40, now=at(1)).remaining_requests == 0
    late = store.admit(key, request_id="c", tokens=0, now=at(49.5))
    assert late.reason == "rpm" and late.retry_after == pytest.approx(0.5)
    fresh = store.admit(key, request_id="c", tokens=100, now=at(50))  # 00:01:00
    assert fresh.ok and fresh.reset_requests == 60.0 and fresh.remaining_tokens == 0
    # Earlier windows are purged when a key starts a new one.
    windows = backend.rows("SELECT window_start FROM rate_windows WHERE key_id = ?", (key.id,))
    assert windows == [(int(at(50).timestamp()),)]
    full = store.admit(key, request_id="d", tokens=1, now=at(51))
    assert (full.reason, full.retry_after) == ("tpm", 59.0)


def test_settle_corrects_the_window_and_frees_the_reservation(
    backend: Backend, store: Store
) -> None:
    key, _ = store.create_key("k", tpm=100, budget_pusd=1000)
    assert store.admit(key, request_id="r1", reserve_pusd=900, tokens=90, now=T0).ok
    assert store.admit(key, request_id="r2", tokens=11, now=T0).reason == "tpm"
    assert store.admit(key, request_id="r2", reserve_pusd=101, now=T0).reason == "budget"

    assert store.settle(entry("r1", key.id, prompt_tokens=20, completion_tokens=10, cost_pusd=250))
    assert backend.rows("SELECT * FROM reservations") == []
    # 90 estimated, 30 used: 70 tokens and 750 pico-USD are free again.
    assert store.admit(key, request_id="r2", reserve_pusd=750, tokens=70, now=at(2)).ok
    assert store.admit(key, request_id="r3", tokens=1, now=at(2)).reason == "tpm"
    assert store.admit(key, request_id="r3", reserve_pusd=1, now=at(2)).reason == "budget"
    assert store.get_key(key.id).spent_pusd == 250  # type: ignore[union-attr]

    # A release gives the estimate back too.
    assert store.release("r2") and not store.release("r2")
    assert store.admit(key, request_id="r3", tokens=70, reserve_pusd=750, now=at(3)).ok


def test_settle_is_idempotent(store: Store) -> None:
    key, _ = store.create_key("k", budget_pusd=10_000)
    assert store.admit(key, request_id="r1", reserve_pusd=500, now=T0).ok
    first = entry("r1", key.id, cost_pusd=400)
    assert store.settle(first)
    assert not store.settle(first)
    assert not store.settle(entry("r1", key.id, cost_pusd=9999))
    assert store.get_key(key.id).spent_pusd == 400  # type: ignore[union-attr]
    assert store.totals(key.id) == (1, 10, 5, 400)
    assert [row.requests for row in store.usage()] == [1]
    assert store.ledger() == [first]
    # Traffic without a key is recorded too; an unknown key is an error.
    assert store.settle(entry("anon", None, cost_pusd=7))
    assert store.totals() == (2, 20, 10, 407)
    with pytest.raises(KeyNotFound):
        store.settle(entry("ghost", 999))


def test_stale_reservations_are_purged(backend: Backend, store: Store) -> None:
    key, _ = store.create_key("k", max_concurrent=1, budget_pusd=100)
    assert store.admit(key, request_id="lost", reserve_pusd=100, now=T0).ok
    assert store.admit(key, request_id="r2", now=at(10)).reason == "concurrency"
    assert store.admit(key, request_id="r2", now=at(3599)).reason == "concurrency"
    # The replica that admitted "lost" never came back: after an hour it stops counting.
    assert store.admit(key, request_id="r2", reserve_pusd=100, now=at(3601)).ok
    assert backend.rows("SELECT request_id FROM reservations") == [("r2",)]
    # A late settle of the lost request still bills it and leaves r2's reservation alone.
    assert store.settle(entry("lost", key.id, cost_pusd=30, created_at=at(3700)))
    assert backend.rows("SELECT request_id FROM reservations") == [("r2",)]
    assert store.get_key(key.id).spent_pusd == 30  # type: ignore[union-attr]
    assert store.admit(key, request_id="r3", now=at(3701)).reason == "concurrency"

    short = backend.open(stale_after=5)
    assert short.admit(key, request_id="r3", now=at(3601 + 6)).ok


def test_budget_is_never_exceeded_by_racing_admissions(backend: Backend, store: Store) -> None:
    key, _ = store.create_key("k", budget_pusd=5 * R)
    results = run_at_once(
        20, lambda i: store.admit(key, request_id=f"a{i}", reserve_pusd=R, tokens=10, now=T0)
    )
    admitted = [f"a{i}" for i, result in enumerate(results) if result.ok]
    assert len(admitted) == 5
    assert {r.reason for r in results if not r.ok} == {"budget"}
    assert backend.value("SELECT SUM(amount_pusd) FROM reservations") == 5 * R

    # Real costs are half the estimates: two and a half reservations come free.
    for request_id in admitted:
        assert store.settle(entry(request_id, key.id, cost_pusd=R // 2, created_at=at(5)))
    assert store.get_key(key.id).spent_pusd == 5 * R // 2  # type: ignore[union-attr]
    again = run_at_once(
        20, lambda i: store.admit(key, request_id=f"b{i}", reserve_pusd=R, now=at(6))
    )
    assert sum(result.ok for result in again) == 2


def test_spending_past_the_budget_blocks_the_key(store: Store) -> None:
    key, _ = store.create_key("k", budget_pusd=100)
    assert store.admit(key, request_id="r1", reserve_pusd=50, now=T0).ok
    # The estimate was low; the real cost is billed anyway.
    assert store.settle(entry("r1", key.id, cost_pusd=130))
    assert store.get_key(key.id).remaining_pusd == -30  # type: ignore[union-attr]
    assert store.admit(key, request_id="r2", reserve_pusd=0, now=T0).reason == "budget"
    store.update_key(key.id, budget_pusd=1000)
    assert store.admit(key, request_id="r2", reserve_pusd=870, now=T0).ok


def test_two_stores_share_rpm_and_budget(backend: Backend) -> None:
    # Two connections to one database, as two replicas would have.
    one, two = backend.open(), backend.open()
    limited, _ = one.create_key("rpm", rpm=7)
    budgeted, _ = two.create_key("budget", budget_pusd=5 * R)

    def admit(key_id: int, prefix: str) -> Callable[[int], bool]:
        def work(i: int) -> bool:
            store = (one, two)[i % 2]
            return store.admit(key_id, request_id=f"{prefix}{i}", reserve_pusd=R, now=T0).ok

        return work

    assert sum(run_at_once(20, admit(limited.id, "rpm"))) == 7
    budget_ok = run_at_once(20, admit(budgeted.id, "budget"))
    assert sum(budget_ok) == 5
    # Settled on one replica, seen by the other.
    for i, ok in enumerate(budget_ok):
        if ok:
            assert (one, two)[i % 2 - 1].settle(entry(f"budget{i}", budgeted.id, cost_pusd=R // 5))
    assert one.get_key(budgeted.id).spent_pusd == R  # type: ignore[union-attr]
    assert sum(run_at_once(20, admit(budgeted.id, "more"))) == 4
    assert one.admit(limited, request_id="late", now=at(50)).ok  # next minute


def test_usage_daily_matches_the_ledger(backend: Backend, store: Store) -> None:
    alice, _ = store.create_key("alice")
    bob, _ = store.create_key("bob")
    day1, day2 = T0, T0 + timedelta(days=1)
    settled = []
    for i in range(30):
        key_id = (alice.id, bob.id, None)[i % 3]
        settled.append(
            entry(
                f"r{i}",
                key_id,
                model=("small", "large")[i % 2],
                prompt_tokens=10 + i,
                cached_tokens=i % 5,
                completion_tokens=3 * i,
                cost_pusd=1000 + 17 * i,
                created_at=(day1, day2)[i % 4 == 0] + timedelta(seconds=i),
            )
        )
    for item in settled:
        assert store.settle(item)

    by_key = {row.key_name: row for row in store.usage(by="key")}
    assert set(by_key) == {"alice", "bob", None}
    assert by_key[None].key_id is None and by_key["alice"].key_id == alice.id
    for row in by_key.values():
        expected = store.totals(row.key_id) if row.key_id else None
        mine = [e for e in settled if e.key_id == row.key_id]
        assert row.requests == len(mine)
        assert row.prompt_tokens == sum(e.prompt_tokens for e in mine)
        assert row.cached_tokens == sum(e.cached_tokens for e in mine)
        assert row.completion_tokens == sum(e.completion_tokens for e in mine)
        assert row.cost_pusd == sum(e.cost_pusd for e in mine)
        if expected is not None:
            assert expected == (
                row.requests,
                row.prompt_tokens,
                row.completion_tokens,
                row.cost_pusd,
            )

    everything = store.totals()
    for by in ("key", "model", "day"):
        rows = store.usage(by=by)  # type: ignore[arg-type]
        sums = (
            sum(r.requests for r in rows),
            sum(r.prompt_tokens for r in rows),
            sum(r.completion_tokens for r in rows),
            sum(r.cost_pusd for r in rows),
        )
        assert sums == everything
    assert [r.model for r in store.usage(by="model")] == ["large", "small"]
    days = store.usage(by="day")
    assert [r.day for r in days] == ["2030-01-01", "2030-01-02"]
    assert days[1].requests == sum(1 for i in range(30) if i % 4 == 0)

    # Filters.
    assert [r.day for r in store.usage(since=day2, by="day")] == ["2030-01-02"]
    only_bob = store.usage(key_id=bob.id, by="model")
    assert sum(r.requests for r in only_bob) == 10 and all(r.key_id is None for r in only_bob)
    assert store.ledger(key_id=bob.id) == sorted(
        (e for e in settled if e.key_id == bob.id), key=lambda e: e.created_at
    )
    assert all(e.created_at >= day2 for e in store.ledger(since=day2))
    assert len(store.ledger(since=day2)) == sum(1 for i in range(30) if i % 4 == 0)
    # The daily table holds one row per (day, key, model).
    assert backend.value("SELECT COUNT(*) FROM usage_daily") == len(
        {(e.created_at.date(), e.key_id, e.model) for e in settled}
    )


# -- migrations and connections --------------------------------------------------------------


def test_migrations_apply_once_under_concurrent_opens(backend: Backend) -> None:
    url = backend.fresh_url()
    stores = run_at_once(4, lambda _: backend.open(url))
    assert all(isinstance(s, Store) for s in stores)
    versions = backend.rows(
        "SELECT version, COUNT(*) FROM schema_migrations GROUP BY version ORDER BY version",
        url=url,
    )
    assert versions == [(version, 1) for version in range(1, LATEST + 1)]
    assert set(TABLES) <= set(
        row[0]
        for row in backend.rows(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if backend.kind == "sqlite"
            else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
            url=url,
        )
    )
    db = connect(url)
    try:
        assert migrate(db) == []
    finally:
        db.close()

    stores[0].create_key("k")
    backend.rows("INSERT INTO schema_migrations VALUES (999, 'future', 0)", url=url)
    with pytest.raises(SchemaTooNew):
        open_store(url)


def test_postgres_reconnects_after_losing_its_connection(backend: Backend, store: Store) -> None:
    if backend.kind != "postgres":
        pytest.skip("PostgreSQL only")
    store.create_key("k")
    pid = store._db._conn.info.backend_pid  # type: ignore[attr-defined]
    backend.rows("SELECT pg_terminate_backend(?)", (pid,))
    # The dead connection is noticed at BEGIN, before anything ran: retried on a new one.
    assert [k.name for k in store.list_keys()] == ["k"]
    assert store._db._conn.info.backend_pid != pid  # type: ignore[attr-defined]


def test_many_connections_opening_a_fresh_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    # Switching a new file to WAL can fail at once with "database is locked"
    # when several connections open it together (before the retry, about one
    # round in twelve of 8 threads failed).
    for round_no in range(20):
        path = str(tmp_path / f"{round_no}.db")
        databases = run_at_once(8, lambda _, at=path: SqliteDatabase(at))
        for db in databases:
            db.close()


# -- issue 13: auth persistence, n against concurrency, two-phase admission, crash billing ----


def test_keys_stay_required_once_any_key_existed(backend: Backend, store: Store) -> None:
    assert not store.has_keys()
    store.create_key("only")
    assert store.revoke_key("only")
    # The last key revoked: keys are still required, here and for a store opened later (a
    # restarted server), or the server would serve everyone and the revoked key again.
    assert store.has_keys()
    assert backend.open().has_keys()
    store.create_key("brief", expires_at=at(1))
    assert backend.open().has_keys()


def test_n_counts_against_max_concurrent(backend: Backend, store: Store) -> None:
    key, _ = store.create_key("k", max_concurrent=3)
    # Alone larger than the key may run: refused, and waiting would not help.
    alone = store.admit(key, request_id="n4", sequences=4, now=T0)
    assert (alone.ok, alone.reason, alone.retry_after) == (False, "sequences", None)
    assert store.admit(key, request_id="n2", sequences=2, now=T0).ok
    busy = store.admit(key, request_id="n2b", sequences=2, now=T0)
    assert (busy.reason, busy.retry_after) == ("concurrency", None)
    assert store.admit(key, request_id="n1", sequences=1, now=T0).ok
    assert store.admit(key, request_id="x", now=T0).reason == "concurrency"
    held = backend.value("SELECT SUM(sequences) FROM reservations WHERE key_id = ?", (key.id,))
    assert held == 3
    assert store.release("n2")
    assert store.admit(key, request_id="n2b", sequences=2, now=T0).ok
    with pytest.raises(ValueError):
        store.admit(key, request_id="zero", sequences=0, now=T0)


def test_two_phase_admission(backend: Backend, store: Store) -> None:
    key, _ = store.create_key("k", rpm=3, tpm=100, budget_pusd=1000)

    def reservation(request_id: str) -> list[tuple]:
        return backend.rows(
            "SELECT amount_pusd, tokens FROM reservations WHERE request_id = ?", (request_id,)
        )

    def window() -> tuple[int, int]:
        rows = backend.rows(
            "SELECT requests, tokens FROM rate_windows WHERE key_id = ? AND window_start = ?",
            (key.id, int(T0.timestamp()) - 10),
        )
        return rows[0] if rows else (0, 0)

    # Phase 1 decides neither tokens nor budget (a key with none left may still /tokenize).
    broke, _ = store.create_key("broke", budget_pusd=0, tpm=1)
    assert store.admit(broke, request_id="b1", now=T0).ok
    assert store.reserve("b1", reserve_pusd=0, tokens=1, now=T0).reason == "budget"
    assert store.admit(broke, request_id="b2", now=T0).ok
    assert store.release("b2")

    # Phase 1 holds a slot and counts the request; nothing is reserved yet.
    first = store.admit(key, request_id="r1", model="m", endpoint="chat", now=T0)
    assert first.ok and first.remaining_requests == 2 and first.remaining_tokens == 100
    assert reservation("r1") == [(0, 0)] and window() == (1, 0)
    # Phase 2 with the exact prompt: tokens and budget.
    second = store.reserve("r1", reserve_pusd=400, tokens=60, now=at(1))
    assert second.ok and second.remaining_requests == 2 and second.remaining_tokens == 40
    assert reservation("r1") == [(400, 60)] and window() == (1, 60)

    # Refused at phase 2: the reservation is gone, the request stays counted.
    assert store.admit(key, request_id="r2", now=at(2)).ok
    over = store.reserve("r2", reserve_pusd=1, tokens=41, now=at(2))
    assert (over.ok, over.reason, over.retry_after) == (False, "tpm", 48.0)
    assert over.remaining_tokens == 40
    assert reservation("r2") == [] and window() == (2, 60)
    broke = store.admit(key, request_id="r3", now=at(3))
    assert broke.ok
    assert store.reserve("r3", reserve_pusd=601, tokens=1, now=at(3)).reason == "budget"
    assert reservation("r3") == [] and window() == (3, 60)
    assert store.admit(key, request_id="r4", now=at(4)).reason == "rpm"
    with pytest.raises(ReservationNotFound):
        store.reserve("r3", reserve_pusd=0, tokens=0, now=at(4))
    with pytest.raises(ReservationNotFound):
        store.reserve("never", reserve_pusd=0, tokens=0, now=at(4))

    # r1 settles: its minute's estimate (60) is corrected to the use (15).
    assert store.settle(entry("r1", key.id, cost_pusd=100, created_at=at(5)))
    assert window() == (3, 15)

    # Larger than a whole minute: no Retry-After. Revoked between the phases: refused.
    assert store.admit(key, request_id="r5", now=at(60)).ok
    huge = store.reserve("r5", reserve_pusd=0, tokens=101, now=at(60))
    assert (huge.reason, huge.retry_after) == ("tpm", None)
    assert store.admit(key, request_id="r6", now=at(61)).ok
    store.revoke_key(key.id)
    assert store.reserve("r6", reserve_pusd=0, tokens=1, now=at(61)).reason == "revoked"
    assert reservation("r6") == []


def test_phase_two_counts_its_tokens_in_its_own_minute(backend: Backend, store: Store) -> None:
    key, _ = store.create_key("k", tpm=100)
    assert store.admit(key, request_id="r1", now=at(49)).ok  # 00:00:59
    assert store.reserve("r1", reserve_pusd=0, tokens=80, now=at(51)).ok  # 00:01:01
    assert store.admit(key, request_id="r2", now=at(52)).ok
    assert store.reserve("r2", reserve_pusd=0, tokens=21, now=at(52)).reason == "tpm"
    assert store.settle(entry("r1", key.id, prompt_tokens=10, completion_tokens=10))
    # The 80 reserved in the second minute came back there (60 of them).
    assert store.admit(key, request_id="r3", now=at(53)).ok
    assert store.reserve("r3", reserve_pusd=0, tokens=80, now=at(53)).ok


def test_worst_case_cost_and_price_tables() -> None:
    price = Price.per_million(prompt="0.10", cached="0.05", completion="0.40")
    assert price.worst_case(1000, 10) == 1000 * 100_000 + 10 * 400_000
    # A table that prices cached tokens above prompt tokens is refused...
    with pytest.raises(PriceError, match=r"cached price .* above the prompt price"):
        PriceTable.from_dict({"prices": {"m": {"prompt": "1", "cached": "15", "completion": "1"}}})
    # ...and a Price made by hand still reserves the higher price per prompt token.
    odd = Price(prompt=1, cached=15, completion=2)
    assert odd.worst_case(10, 3) == 10 * 15 + 3 * 2
    assert cost(odd, 10, 10, 3) <= odd.worst_case(10, 3)
    with pytest.raises(PriceError, match="at most 1000000"):
        PriceTable.from_dict({"prices": {"m": {"prompt": "1e300", "completion": "1"}}})
    assert PriceTable.from_dict(
        {"prices": {"m": {"prompt": "1", "cached": "1", "completion": "2"}}}
    ).for_model("m") == Price(1_000_000, 1_000_000, 2_000_000)


def test_values_past_a_bigint_are_refused(store: Store) -> None:
    big = 2**63
    for limits in ({"rpm": big}, {"tpm": 10**30}, {"max_concurrent": big}, {"budget_pusd": big}):
        with pytest.raises(ValueError, match="at most 9223372036854775807"):
            store.create_key("x", **limits)
    store.create_key("x", rpm=big - 1, budget_pusd=big - 1)
    with pytest.raises(ValueError, match="at most"):
        store.update_key("x", tpm=big)
    for amount in ("1e300", "1e999999999", "9223372.036854775808", 10**30):
        with pytest.raises(ValueError, match=r"at most 9223372\.036854775807"):
            parse_usd(amount)
    assert parse_usd("9223372.036854775807") == big - 1


def test_a_checkpointed_request_is_billed_when_its_server_died(
    backend: Backend, store: Store
) -> None:
    key, _ = store.create_key("k", budget_pusd=10_000, tpm=1000)
    assert store.admit(key, request_id="r1", model="m", endpoint="chat", now=T0).ok
    assert store.reserve("r1", reserve_pusd=5000, tokens=500, now=T0).ok
    assert store.checkpoint(
        "r1", prompt_tokens=10, cached_tokens=4, completion_tokens=3, cost_pusd=70, now=at(2)
    )
    assert store.checkpoint(
        "r1", prompt_tokens=10, cached_tokens=4, completion_tokens=7, cost_pusd=123, now=at(5)
    )
    # Admitted (phase 1) but never checkpointed.
    assert store.admit(key, request_id="r2", model="m", endpoint="completions", now=at(6)).ok
    assert not store.checkpoint(
        "nobody", prompt_tokens=1, cached_tokens=0, completion_tokens=0, cost_pusd=0
    )
    with pytest.raises(ValueError):
        store.checkpoint("r1", prompt_tokens=1, cached_tokens=2, completion_tokens=0, cost_pusd=0)

    # The server is SIGKILLed; the next one to start on this store ends what it left.
    assert backend.open().clear_reservations() == 2
    rows = {row.request_id: row for row in store.ledger()}
    one, two = rows["r1"], rows["r2"]
    assert (one.status, one.model, one.endpoint, one.finish_reason) == (
        "interrupted",
        "m",
        "chat",
        None,
    )
    assert (one.prompt_tokens, one.cached_tokens, one.completion_tokens) == (10, 4, 7)
    assert one.cost_pusd == 123 and one.created_at == at(5) and one.duration_ms == 5000
    assert (two.status, two.prompt_tokens, two.completion_tokens, two.cost_pusd) == (
        "interrupted",
        0,
        0,
        0,
    )
    assert two.endpoint == "completions" and two.created_at == at(6)
    assert store.get_key(key.id).spent_pusd == 123  # type: ignore[union-attr]
    assert store.totals(key.id) == (2, 10, 7, 123)
    assert backend.rows("SELECT * FROM reservations") == []
    # The tokens reserved are given back down to the 17 used.
    assert backend.value("SELECT tokens FROM rate_windows WHERE key_id = ?", (key.id,)) == 17

    # Idempotent: nothing left to end, nothing billed twice.
    assert store.clear_reservations() == 0
    assert store.totals(key.id) == (2, 10, 7, 123)
    # The request settling after all (its server was not dead) replaces the row: billed
    # once, in full; and only once.
    final = entry(
        "r1", key.id, prompt_tokens=10, cached_tokens=4, completion_tokens=9, cost_pusd=150
    )
    assert store.settle(final)
    assert not store.settle(entry("r1", key.id, cost_pusd=9999))
    assert {row.request_id: row for row in store.ledger()}["r1"] == final
    assert store.get_key(key.id).spent_pusd == 150  # type: ignore[union-attr]
    assert store.totals(key.id) == (2, 10, 9, 150)
    usage = store.usage(by="day")
    assert [(r.day, r.requests, r.cost_pusd) for r in usage] == [("2030-01-01", 2, 150)]


def test_a_stale_reservation_is_billed_and_a_checkpoint_keeps_it_alive(
    backend: Backend, store: Store
) -> None:
    key, _ = store.create_key("k", max_concurrent=1)
    assert store.admit(key, request_id="long", model="m", endpoint="chat", now=T0).ok
    assert store.reserve("long", reserve_pusd=0, tokens=0, now=T0)
    # Still streaming past the hour: each checkpoint is a heartbeat.
    for minute in range(0, 120, 10):
        assert store.checkpoint(
            "long",
            prompt_tokens=5,
            cached_tokens=0,
            completion_tokens=minute,
            cost_pusd=minute,
            now=at(minute * 60),
        )
    assert store.admit(key, request_id="r2", now=at(119 * 60)).reason == "concurrency"
    assert store.ledger() == []
    # Then silence for an hour: its replica died. Billed for its last checkpoint.
    assert store.admit(key, request_id="r2", now=at(110 * 60 + 3601)).ok
    (lost,) = store.ledger()
    assert (lost.request_id, lost.status, lost.completion_tokens, lost.cost_pusd) == (
        "long",
        "interrupted",
        110,
        110,
    )
    assert lost.created_at == at(110 * 60)
    assert backend.rows("SELECT request_id FROM reservations") == [("r2",)]

    # A key never used again: its orphan is billed by a sweep over every key.
    idle, _ = store.create_key("idle")
    assert store.admit(idle, request_id="gone", model="m", now=at(7200)).ok
    assert store.checkpoint(
        "gone", prompt_tokens=3, cached_tokens=0, completion_tokens=2, cost_pusd=9, now=at(7201)
    )
    assert store.bill_stale_reservations(now=at(7201 + 3599)) == 0
    assert store.bill_stale_reservations(now=at(7201 + 3601)) == 1
    assert store.bill_stale_reservations(now=at(7201 + 3601)) == 0
    assert [(e.request_id, e.status, e.cost_pusd) for e in store.ledger(key_id=idle.id)] == [
        ("gone", "interrupted", 9)
    ]
    assert store.get_key(idle.id).spent_pusd == 9  # type: ignore[union-attr]
    # r2 is fresh: left alone.
    assert backend.rows("SELECT request_id FROM reservations") == [("r2",)]


def test_an_old_database_is_migrated_with_its_reservations(backend: Backend) -> None:
    url = backend.fresh_url()
    db = connect(url)
    try:
        assert migrate(db, MIGRATIONS[:1]) == [1]
    finally:
        db.close()
    backend.rows(
        "INSERT INTO api_keys (name, key_hash, key_prefix, created_at) VALUES (?, ?, ?, ?)",
        ("old", "h", "p", T0.timestamp()),
        url=url,
    )
    backend.rows(
        "INSERT INTO reservations (request_id, key_id, amount_pusd, tokens, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        ("before", 1, 10, 10, T0.timestamp()),
        url=url,
    )
    store = backend.open(url)
    assert backend.rows("SELECT sequences FROM reservations", url=url) == [(1,)]
    assert store.admit(1, request_id="after", sequences=2, now=T0).ok
    assert store.clear_reservations() == 2
    rows = {row.request_id: row for row in store.ledger()}
    assert (rows["before"].model, rows["before"].endpoint) == ("unknown", "unknown")
    assert rows["after"].status == rows["before"].status == "interrupted"


def test_racing_two_phase_admissions_hold_every_limit(backend: Backend) -> None:
    one, two = backend.open(), backend.open()  # two replicas
    key, _ = one.create_key("k", max_concurrent=7, budget_pusd=5 * R)

    def work(i: int) -> str:
        store = (one, two)[i % 2]
        admitted = store.admit(key.id, request_id=f"r{i}", sequences=2, now=T0)
        if not admitted.ok:
            return str(admitted.reason)
        reserved = store.reserve(f"r{i}", reserve_pusd=2 * R, tokens=10, now=T0)
        return "ok" if reserved.ok else str(reserved.reason)

    results = run_at_once(20, work)
    # Seven slots hold three requests of two sequences at a time; two fit the budget (a
    # request refused at phase 2 frees its slots, so how many more got in varies).
    assert results.count("ok") == 2, results
    assert set(results) <= {"ok", "budget", "concurrency"}, results
    assert backend.value("SELECT SUM(amount_pusd) FROM reservations") == 4 * R
    assert backend.value("SELECT SUM(sequences) FROM reservations") == 4
