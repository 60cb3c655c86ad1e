"""The metering store: API keys, admission (rate limits, concurrency, budget), the ledger.

Every method is one transaction. Admission and settlement for a key first lock the key's row
(``SELECT ... FOR UPDATE`` in PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` locks the whole
database), so replicas sharing a database never both spend the last of a budget or the last
request of a minute. The Store is synchronous and thread-safe (one connection behind a lock);
the server calls it through ``asyncio.to_thread``.

Admission reserves before a request runs and settlement replaces the reservation with the real
cost, so the budget check sees requests still in flight:

    admit(key, request_id, reserve_pusd, tokens)   reservation row + rate window bumped
      -> settle(LedgerEntry)                       ledger row, usage_daily, spent_pusd,
                                                   reservation gone, window tokens corrected
      -> or release(request_id)                    refused after admission: no ledger row
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import Any, Literal, TypeAlias

from spigot.metering.db import Conflict, Database, Row, Tx, connect
from spigot.metering.errors import DuplicateKeyName, DuplicateRequest, KeyNotFound
from spigot.metering.keys import hash_secret, hashes_match, key_prefix, new_secret
from spigot.metering.migrations import migrate
from spigot.metering.records import (
    Admission,
    ApiKey,
    LedgerEntry,
    Reason,
    UsageBy,
    UsageRow,
    day_of,
    epoch_or_now,
    from_epoch,
    to_epoch,
)

WINDOW_SECONDS = 60
DEFAULT_STALE_AFTER = 3600.0  # a reservation older than this belongs to a crashed replica
NO_KEY = 0  # usage_daily's key_id for traffic without a key

KEY_COLUMNS = (
    "id, name, key_prefix, created_at, expires_at, revoked_at, budget_pusd, spent_pusd, "
    "rpm, tpm, max_concurrent, models, admin"
)
LEDGER_COLUMNS = (
    "request_id, key_id, model, endpoint, prompt_tokens, cached_tokens, completion_tokens, "
    "cost_pusd, ttft_ms, duration_ms, finish_reason, status, created_at"
)
DIGITS = re.compile(r"[0-9]+")


class _Unset(Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""``update_key``'s "not given": None already means "no limit"."""

Unset: TypeAlias = Literal[_Unset.UNSET]


def window_start(epoch: float) -> int:
    return int(epoch // WINDOW_SECONDS) * WINDOW_SECONDS


def _opt_time(value: float | None) -> datetime | None:
    return None if value is None else from_epoch(value)


def _key(row: Row) -> ApiKey:
    models = row[11]
    return ApiKey(
        id=int(row[0]),
        name=row[1],
        prefix=row[2],
        created_at=from_epoch(row[3]),
        expires_at=_opt_time(row[4]),
        revoked_at=_opt_time(row[5]),
        budget_pusd=row[6],
        spent_pusd=int(row[7]),
        rpm=row[8],
        tpm=row[9],
        max_concurrent=row[10],
        models=None if models is None else tuple(json.loads(models)),
        admin=bool(row[12]),
    )


def _entry(row: Row) -> LedgerEntry:
    return LedgerEntry(
        request_id=row[0],
        key_id=row[1],
        model=row[2],
        endpoint=row[3],
        prompt_tokens=int(row[4]),
        cached_tokens=int(row[5]),
        completion_tokens=int(row[6]),
        cost_pusd=int(row[7]),
        ttft_ms=row[8],
        duration_ms=int(row[9]),
        finish_reason=row[10],
        status=row[11],
        created_at=from_epoch(row[12]),
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a key name must be a non-empty string without edge spaces: {name!r}")
    if DIGITS.fullmatch(name):
        # Names and ids share one argument (``spigot keys revoke 3``): keep them apart.
        raise ValueError(f"a key name cannot be only digits: {name!r}")
    return name


def _check_count(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _check_limit(value: object, what: str, minimum: int = 1) -> int | None:
    return None if value is None else _check_count(value, what, minimum)


def _models_text(models: Iterable[str] | str | None) -> str | None:
    if models is None:
        return None
    names = models.split(",") if isinstance(models, str) else list(models)
    cleaned = [name.strip() for name in names if name.strip()]
    if not cleaned:
        raise ValueError("models must name at least one model (None allows every model)")
    return json.dumps(sorted(set(cleaned)))


def _expiry(value: datetime | None) -> float | None:
    return None if value is None else to_epoch(value)


class Store:
    def __init__(self, db: Database, *, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        if stale_after <= 0:
            raise ValueError(f"stale_after must be positive, got {stale_after!r}")
        self._db = db
        self.stale_after = stale_after
        migrate(db)

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys ---------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        *,
        budget_pusd: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
        models: Iterable[str] | str | None = None,
        expires_at: datetime | None = None,
        admin: bool = False,
        now: datetime | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret: the only time the secret exists outside the client."""
        values = (
            _check_name(name),
            _check_limit(budget_pusd, "budget_pusd", 0),
            _check_limit(rpm, "rpm"),
            _check_limit(tpm, "tpm"),
            _check_limit(max_concurrent, "max_concurrent"),
            _models_text(models),
            _expiry(expires_at),
            bool(admin),
        )
        secret = new_secret()
        try:
            with self._db.transaction() as tx:
                if tx.one("SELECT id FROM api_keys WHERE name = ?", (name,)) is not None:
                    raise DuplicateKeyName(name)
                row = tx.one(
                    "INSERT INTO api_keys (name, budget_pusd, rpm, tpm, max_concurrent, models, "
                    "expires_at, admin, key_hash, key_prefix, created_at) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {KEY_COLUMNS}",
                    (*values, hash_secret(secret), key_prefix(secret), epoch_or_now(now)),
                )
        except Conflict:
            # Another process took the name between our check and our insert.
            raise DuplicateKeyName(name) from None
        assert row is not None
        return _key(row), secret

    def _find(self, tx: Tx, id_or_name: int | str, *, lock: bool = False) -> Row | None:
        suffix = tx.for_update if lock else ""
        by_id = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?{suffix}"
        if isinstance(id_or_name, int):
            return tx.one(by_id, (id_or_name,))
        row = tx.one(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?{suffix}", (id_or_name,))
        if row is None and DIGITS.fullmatch(id_or_name):
            row = tx.one(by_id, (int(id_or_name),))
        return row

    def get_key(self, id_or_name: int | str) -> ApiKey | None:
        """By id, or by name (a string of digits is an id: names cannot be all digits)."""
        with self._db.transaction(write=False) as tx:
            row = self._find(tx, id_or_name)
        return None if row is None else _key(row)

    def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._db.transaction(write=False) as tx:
            rows = tx.all(f"SELECT {KEY_COLUMNS} FROM api_keys{where} ORDER BY id")
        return [_key(row) for row in rows]

    def has_keys(self) -> bool:
        """Whether any key is not revoked (expired ones count): if so, the server requires a
        key on every request."""
        with self._db.transaction(write=False) as tx:
            return tx.one("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1") is not None

    def update_key(
        self,
        id_or_name: int | str,
        *,
        name: str | Unset = UNSET,
        budget_pusd: int | Unset | None = UNSET,
        rpm: int | Unset | None = UNSET,
        tpm: int | Unset | None = UNSET,
        max_concurrent: int | Unset | None = UNSET,
        models: Iterable[str] | str | Unset | None = UNSET,
        expires_at: datetime | Unset | None = UNSET,
        admin: bool | Unset = UNSET,
    ) -> ApiKey:
        """Changes what is given; None lifts a limit. Raises KeyNotFound, DuplicateKeyName."""
        changes: dict[str, Any] = {}
        if name is not UNSET:
            changes["name"] = _check_name(name)
        if budget_pusd is not UNSET:
            changes["budget_pusd"] = _check_limit(budget_pusd, "budget_pusd", 0)
        if rpm is not UNSET:
            changes["rpm"] = _check_limit(rpm, "rpm")
        if tpm is not UNSET:
            changes["tpm"] = _check_limit(tpm, "tpm")
        if max_concurrent is not UNSET:
            changes["max_concurrent"] = _check_limit(max_concurrent, "max_concurrent")
        if models is not UNSET:
            changes["models"] = _models_text(models)
        if expires_at is not UNSET:
            changes["expires_at"] = _expiry(expires_at)
        if admin is not UNSET:
            changes["admin"] = bool(admin)
        try:
            with self._db.transaction() as tx:
                row = self._find(tx, id_or_name, lock=True)
                if row is None:
                    raise KeyNotFound(id_or_name)
                if not changes:
                    return _key(row)
                key_id = row[0]
                if "name" in changes:
                    other = tx.one(
                        "SELECT id FROM api_keys WHERE name = ? AND id <> ?",
                        (changes["name"], key_id),
                    )
                    if other is not None:
                        raise DuplicateKeyName(changes["name"])
                # Column names come from the fixed set above, never from the caller.
                sets = ", ".join(f"{column} = ?" for column in changes)
                row = tx.one(
                    f"UPDATE api_keys SET {sets} WHERE id = ? RETURNING {KEY_COLUMNS}",
                    (*changes.values(), key_id),
                )
        except Conflict:
            raise DuplicateKeyName(changes.get("name", "")) from None
        assert row is not None
        return _key(row)

    def revoke_key(self, id_or_name: int | str, *, now: datetime | None = None) -> bool:
        """True when the key was live and is now revoked; False when unknown or already
        revoked. Revoking is final: requests in flight finish and are still settled."""
        with self._db.transaction() as tx:
            row = self._find(tx, id_or_name, lock=True)
            if row is None:
                return False
            changed = tx.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (epoch_or_now(now), row[0]),
            )
        return changed == 1

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key a secret belongs to, revoked or expired as it may be (the caller picks the
        error: ``key.revoked``, ``key.expired()``); None for an unknown secret."""
        digest = hash_secret(secret)
        with self._db.transaction(write=False) as tx:
            row = tx.one(
                f"SELECT key_hash, {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (digest,)
            )
        if row is None or not hashes_match(row[0], digest):
            return None
        return _key(row[1:])

    # -- admission ----------------------------------------------------------------------

    def admit(
        self,
        key: ApiKey | int,
        *,
        request_id: str,
        reserve_pusd: int = 0,
        tokens: int = 0,
        now: datetime | None = None,
    ) -> Admission:
        """May this request start? Checks, in order: the key is live, concurrency, requests
        per minute, tokens per minute, budget; when it may, reserves ``reserve_pusd`` and counts
        the request and ``tokens`` (prompt plus max output) in the current minute.

        The limits are read from the locked row, not from ``key``: an update or revoke made
        by another replica a moment ago applies.
        """
        key_id = key.id if isinstance(key, ApiKey) else key
        _check_count(reserve_pusd, "reserve_pusd", 0)
        _check_count(tokens, "tokens", 0)
        t = epoch_or_now(now)
        try:
            with self._db.transaction() as tx:
                row = tx.one(
                    f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?{tx.for_update}", (key_id,)
                )
                if row is None:
                    raise KeyNotFound(key_id)
                return self._admit_locked(tx, _key(row), request_id, reserve_pusd, tokens, t)
        except Conflict:
            raise DuplicateRequest(request_id) from None

    def _admit_locked(
        self, tx: Tx, key: ApiKey, request_id: str, reserve: int, tokens: int, t: float
    ) -> Admission:
        window = window_start(t)
        reset = window + WINDOW_SECONDS - t
        rpm, tpm = key.rpm, key.tpm

        # Reservations of a replica that died never settle: past stale_after they stop
        # counting, so a crash cannot hold a key's budget or concurrency forever.
        tx.execute(
            "DELETE FROM reservations WHERE key_id = ? AND created_at < ?",
            (key.id, t - self.stale_after),
        )
        held = tx.one(
            "SELECT COUNT(*), COALESCE(SUM(amount_pusd), 0) FROM reservations WHERE key_id = ?",
            (key.id,),
        )
        in_flight, reserved = (int(held[0]), int(held[1])) if held else (0, 0)
        current = tx.one(
            "SELECT requests, tokens FROM rate_windows WHERE key_id = ? AND window_start = ?",
            (key.id, window),
        )
        if current is None:
            # A new minute: the key's earlier windows are history.
            tx.execute(
                "DELETE FROM rate_windows WHERE key_id = ? AND window_start < ?", (key.id, window)
            )
            used_requests, used_tokens = 0, 0
        else:
            used_requests, used_tokens = int(current[0]), int(current[1])

        def answer(reason: Reason | None, retry_after: float | None = None) -> Admission:
            ok = reason is None
            return Admission(
                ok=ok,
                reason=reason,
                retry_after=retry_after,
                limit_requests=rpm,
                remaining_requests=(
                    None if rpm is None else max(0, rpm - used_requests - (1 if ok else 0))
                ),
                reset_requests=None if rpm is None else reset,
                limit_tokens=tpm,
                remaining_tokens=(
                    None if tpm is None else max(0, tpm - used_tokens - (tokens if ok else 0))
                ),
                reset_tokens=None if tpm is None else reset,
            )

        if key.revoked:
            return answer("revoked")
        if key.expired(from_epoch(t)):
            return answer("expired")
        if key.max_concurrent is not None and in_flight >= key.max_concurrent:
            return answer("concurrency")
        if rpm is not None and used_requests >= rpm:
            return answer("rpm", reset)
        if tpm is not None and used_tokens + tokens > tpm:
            # Larger than a whole minute's allowance: waiting will not help.
            return answer("tpm", None if tokens > tpm else reset)
        if key.budget_pusd is not None:
            committed = key.spent_pusd + reserved
            # Nothing left (even for a zero estimate), or the estimate does not fit.
            if committed >= key.budget_pusd or committed + reserve > key.budget_pusd:
                return answer("budget")

        tx.execute(
            "INSERT INTO reservations (request_id, key_id, amount_pusd, tokens, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (request_id, key.id, reserve, tokens, t),
        )
        tx.execute(
            "INSERT INTO rate_windows (key_id, window_start, requests, tokens) "
            "VALUES (?, ?, 1, ?) ON CONFLICT (key_id, window_start) DO UPDATE SET "
            "requests = rate_windows.requests + 1, tokens = rate_windows.tokens + excluded.tokens",
            (key.id, window, tokens),
        )
        return answer(None)

    def release(self, request_id: str) -> bool:
        """Drops an admitted request's reservation without a ledger row (refused after
        admission), and gives its tokens back to the minute it counted in. False when there
        was none."""
        with self._db.transaction() as tx:
            owner = tx.one("SELECT key_id FROM reservations WHERE request_id = ?", (request_id,))
            if owner is None:
                return False
            # Same lock order as admit and settle: key row first.
            tx.one(f"SELECT id FROM api_keys WHERE id = ?{tx.for_update}", (owner[0],))
            return self._drop_reservation(tx, request_id, owner[0], used_tokens=0)

    def clear_reservations(self) -> int:
        """Forgets every open reservation. Only for a server that alone uses this store,
        starting up: whatever its reservations belonged to died with its last process."""
        with self._db.transaction() as tx:
            return tx.execute("DELETE FROM reservations")

    @staticmethod
    def _drop_reservation(tx: Tx, request_id: str, key_id: int, *, used_tokens: int) -> bool:
        held = tx.one(
            "DELETE FROM reservations WHERE request_id = ? AND key_id = ? "
            "RETURNING tokens, created_at",
            (request_id, key_id),
        )
        if held is None:
            return False
        # The estimate was counted in the minute of admission: correct that minute (a no-op
        # once it has been purged) and never credit a later one with tokens it never held.
        delta = used_tokens - int(held[0])
        if delta:
            tx.execute(
                "UPDATE rate_windows SET tokens = tokens + ? WHERE key_id = ? AND window_start = ?",
                (delta, key_id, window_start(held[1])),
            )
        return True

    # -- the ledger ---------------------------------------------------------------------

    def settle(self, entry: LedgerEntry) -> bool:
        """Records a finished request: ledger row, daily usage, the key's spending; frees its
        reservation. Idempotent by request_id: a second settle changes nothing and returns
        False."""
        for field_name in ("prompt_tokens", "cached_tokens", "completion_tokens", "cost_pusd"):
            _check_count(getattr(entry, field_name), field_name, 0)
        t = to_epoch(entry.created_at)
        key_id = entry.key_id
        with self._db.transaction() as tx:
            if key_id is not None:
                locked = tx.one(f"SELECT id FROM api_keys WHERE id = ?{tx.for_update}", (key_id,))
                if locked is None:
                    raise KeyNotFound(key_id)
            inserted = tx.execute(
                f"INSERT INTO ledger ({LEDGER_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING",
                (
                    entry.request_id,
                    key_id,
                    entry.model,
                    entry.endpoint,
                    entry.prompt_tokens,
                    entry.cached_tokens,
                    entry.completion_tokens,
                    entry.cost_pusd,
                    entry.ttft_ms,
                    entry.duration_ms,
                    entry.finish_reason,
                    entry.status,
                    t,
                ),
            )
            if inserted == 0:
                return False
            tx.execute(
                "INSERT INTO usage_daily (day, key_id, model, requests, prompt_tokens, "
                "cached_tokens, completion_tokens, cost_pusd) VALUES (?, ?, ?, 1, ?, ?, ?, ?) "
                "ON CONFLICT (day, key_id, model) DO UPDATE SET "
                "requests = usage_daily.requests + 1, "
                "prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, "
                "cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens, "
                "completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, "
                "cost_pusd = usage_daily.cost_pusd + excluded.cost_pusd",
                (
                    day_of(t),
                    NO_KEY if key_id is None else key_id,
                    entry.model,
                    entry.prompt_tokens,
                    entry.cached_tokens,
                    entry.completion_tokens,
                    entry.cost_pusd,
                ),
            )
            if key_id is not None:
                if entry.cost_pusd:
                    tx.execute(
                        "UPDATE api_keys SET spent_pusd = spent_pusd + ? WHERE id = ?",
                        (entry.cost_pusd, key_id),
                    )
                used = entry.prompt_tokens + entry.completion_tokens
                self._drop_reservation(tx, entry.request_id, key_id, used_tokens=used)
        return True

    def ledger(self, since: datetime | None = None, key_id: int | None = None) -> list[LedgerEntry]:
        """Ledger rows, oldest first; ``since`` is inclusive."""
        where, params = self._filters(
            "created_at", None if since is None else to_epoch(since), key_id
        )
        with self._db.transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {LEDGER_COLUMNS} FROM ledger{where} ORDER BY created_at, id", params
            )
        return [_entry(row) for row in rows]

    @staticmethod
    def _filters(
        time_column: str, since: object | None, key_id: int | None, prefix: str = ""
    ) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if since is not None:
            clauses.append(f"{prefix}{time_column} >= ?")
            params.append(since)
        if key_id is not None:
            clauses.append(f"{prefix}key_id = ?")
            params.append(key_id)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def usage(
        self, since: datetime | None = None, key_id: int | None = None, by: UsageBy = "key"
    ) -> list[UsageRow]:
        """Sums from usage_daily grouped by key, model or day. ``since`` counts whole UTC days
        (the day it falls in onwards)."""
        group = {"key": "u.key_id, k.name", "model": "u.model", "day": "u.day"}.get(by)
        if group is None:
            raise ValueError(f"by must be 'key', 'model' or 'day', not {by!r}")
        day = None if since is None else day_of(to_epoch(since))
        where, params = self._filters("day", day, key_id, prefix="u.")
        with self._db.transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {group}, SUM(u.requests), SUM(u.prompt_tokens), SUM(u.cached_tokens), "
                "SUM(u.completion_tokens), SUM(u.cost_pusd) "
                f"FROM usage_daily u LEFT JOIN api_keys k ON k.id = u.key_id{where} "
                f"GROUP BY {group} ORDER BY {group}",
                params,
            )
        out = []
        for row in rows:
            key_id = key_name = model = day = None
            if by == "key":
                key_id = None if row[0] == NO_KEY else int(row[0])
                key_name = row[1]
            elif by == "model":
                model = row[0]
            else:
                day = row[0]
            requests, prompt, cached, completion, spent = (int(value) for value in row[-5:])
            out.append(
                UsageRow(
                    key_id=key_id,
                    key_name=key_name,
                    model=model,
                    day=day,
                    requests=requests,
                    prompt_tokens=prompt,
                    cached_tokens=cached,
                    completion_tokens=completion,
                    cost_pusd=spent,
                )
            )
        return out

    def totals(self, key_id: int | None = None) -> tuple[int, int, int, int]:
        """(requests, prompt tokens, completion tokens, pico-USD) over the whole ledger."""
        where, params = self._filters("created_at", None, key_id)
        with self._db.transaction(write=False) as tx:
            row = tx.one(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
                "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost_pusd), 0) "
                f"FROM ledger{where}",
                params,
            )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def open_store(url: str, *, stale_after: float = DEFAULT_STALE_AFTER) -> Store:
    """``postgresql://`` or ``postgres://`` URLs open PostgreSQL; anything else is a SQLite
    path (``sqlite:///`` accepted). The schema is migrated before this returns."""
    db = connect(url)
    try:
        return Store(db, stale_after=stale_after)
    except BaseException:
        db.close()
        raise
