"""The metering store: API keys, admission (rate limits, concurrency, budget), the ledger.

Every method is one transaction. Admission and settlement for a key first lock the key's row
(``SELECT ... FOR UPDATE`` in PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` locks the whole
database), so replicas sharing a database never both spend the last of a budget or the last
request of a minute. The Store is synchronous and thread-safe (one connection behind a lock);
the server calls it through ``asyncio.to_thread``.

Admission reserves before a request runs and settlement replaces the reservation with the real
cost, so the budget check sees requests still in flight. It comes in two phases, so that the
work that grows with a prompt (templating, tokenizing) is done only for requests already
admitted:

    admit(key, request_id, sequences)     phase 1, before the prompt is read: key live,
                                          concurrency (sequences), requests per minute;
                                          reservation row (nothing reserved yet), request
                                          counted in the minute
      -> reserve(request_id, reserve_pusd, tokens)
                                          phase 2, exact prompt tokens known: tokens per
                                          minute, budget; the row's amount set and the
                                          minute's tokens bumped, or the row dropped
      -> checkpoint(request_id, counts)   while it runs: progress kept on the row
      -> settle(LedgerEntry)              ledger row, usage_daily, spent_pusd,
                                          reservation gone, window tokens corrected
      -> or release(request_id)           refused after admission: no ledger row

``admit`` with ``reserve_pusd`` and ``tokens`` is both phases in one transaction.

A reservation whose server died (SIGKILL, a lost replica) is not forgotten: it becomes a ledger
row with status "interrupted" billing its last checkpoint, either when a server starts on a
SQLite file (``clear_reservations``) or when admission finds it stale.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import Any, Literal, TypeAlias

from spigot.metering.db import Conflict, Database, Row, Tx, connect
from spigot.metering.errors import (
    DuplicateKeyName,
    DuplicateRequest,
    KeyNotFound,
    ReservationNotFound,
)
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
# A reservation neither made nor checkpointed for this long belongs to a crashed replica.
DEFAULT_STALE_AFTER = 3600.0
NO_KEY = 0  # usage_daily's key_id for traffic without a key
MAX_BIGINT = 2**63 - 1  # every integer column is a signed 64-bit BIGINT
UNKNOWN = "unknown"  # model/endpoint of a reservation made before they were recorded
INTERRUPTED = "interrupted"

KEY_COLUMNS = (
    "id, name, key_prefix, created_at, expires_at, revoked_at, budget_pusd, spent_pusd, "
    "rpm, tpm, max_concurrent, models, admin"
)
LEDGER_COLUMNS = (
    "request_id, key_id, model, endpoint, prompt_tokens, cached_tokens, completion_tokens, "
    "cost_pusd, ttft_ms, duration_ms, finish_reason, status, created_at"
)
# What an orphaned reservation becomes a ledger row from (see _bill_orphans).
ORPHAN_COLUMNS = (
    "request_id, key_id, model, endpoint, prompt_tokens, cached_tokens, completion_tokens, "
    "cost_pusd, created_at, checkpointed_at, tokens, COALESCE(reserved_at, created_at)"
)
DIGITS = re.compile(r"[0-9]+")


class _Unset(Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""``update_key``'s "not given": None already means "no limit"."""

Unset: TypeAlias = Literal[_Unset.UNSET]


def window_start(epoch: float) -> int:
    return int(epoch // WINDOW_SECONDS) * WINDOW_SECONDS


def _reset(t: float) -> float:
    """Seconds to the end of the minute ``t`` falls in."""
    return window_start(t) + WINDOW_SECONDS - t


def _spend_refusal(
    key: ApiKey, t: float, used_tokens: int, tokens: int, reserved: int, reserve: int
) -> tuple[Reason, float | None] | None:
    """Tokens per minute, then budget: why ``tokens`` and ``reserve`` cannot be spent now."""
    tpm = key.tpm
    if tpm is not None and used_tokens + tokens > tpm:
        # Larger than a whole minute's allowance: waiting will not help.
        return "tpm", None if tokens > tpm else _reset(t)
    if key.budget_pusd is not None:
        committed = key.spent_pusd + reserved
        # Nothing left (even for a zero estimate), or the estimate does not fit.
        if committed >= key.budget_pusd or committed + reserve > key.budget_pusd:
            return "budget", None
    return None


def _answer(
    key: ApiKey,
    t: float,
    used_requests: int,
    used_tokens: int,
    reason: Reason | None,
    retry_after: float | None,
    requests: int,
    tokens: int,
) -> Admission:
    """The decision, with what the x-ratelimit-* headers need; ``requests`` and ``tokens``
    are what this call counts in the minute when it admits."""
    ok = reason is None
    rpm, tpm = key.rpm, key.tpm
    reset = _reset(t)
    return Admission(
        ok=ok,
        reason=reason,
        retry_after=retry_after,
        limit_requests=rpm,
        remaining_requests=(
            None if rpm is None else max(0, rpm - used_requests - (requests if ok else 0))
        ),
        reset_requests=None if rpm is None else reset,
        limit_tokens=tpm,
        remaining_tokens=(
            None if tpm is None else max(0, tpm - used_tokens - (tokens if ok else 0))
        ),
        reset_tokens=None if tpm is None else reset,
    )


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
    if value > MAX_BIGINT:
        # Past what the column holds: a clear refusal, not a driver's overflow error.
        raise ValueError(f"{what} must be at most {MAX_BIGINT}, got {value!r}")
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
            # Past a BIGINT no key can match (and the drivers refuse the value).
            return tx.one(by_id, (id_or_name,)) if 0 <= id_or_name <= MAX_BIGINT else None
        row = tx.one(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?{suffix}", (id_or_name,))
        if row is None and DIGITS.fullmatch(id_or_name) and int(id_or_name) <= MAX_BIGINT:
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
        """Whether any key was ever made (revoked and expired ones count): if so, the server
        requires a key on every request. Keys are never deleted, only revoked, so once true
        this stays true for the database: revoking the last key must not open the server to
        everyone (it would fail open, and the revoked key would work again)."""
        with self._db.transaction(write=False) as tx:
            return tx.one("SELECT 1 FROM api_keys LIMIT 1") is not None

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
        reserve_pusd: int | None = None,
        tokens: int | None = None,
        sequences: int = 1,
        model: str | None = None,
        endpoint: str | None = None,
        now: datetime | None = None,
    ) -> Admission:
        """May this request start? Checks, in order: the key is live, concurrency (the
        request's ``sequences`` on top of those its key already runs), requests per minute,
        tokens per minute, budget; when it may, holds a reservation row of ``reserve_pusd``
        and counts the request and ``tokens`` (prompt plus max output) in the current minute.

        Phase 1 of two-phase admission is this call with neither ``reserve_pusd`` nor
        ``tokens``: tokens per minute and budget are then left to ``reserve`` (phase 2), once
        the prompt is counted, and nothing is reserved yet. With either given (the other is
        then 0), it is the whole admission in one transaction. ``model`` and ``endpoint`` are
        kept on the reservation for the ledger row it becomes if its server dies.

        The limits are read from the locked row, not from ``key``: an update or revoke made
        by another replica a moment ago applies.
        """
        key_id = key.id if isinstance(key, ApiKey) else key
        spend: tuple[int, int] | None = None  # phase 1: decided by reserve
        if reserve_pusd is not None or tokens is not None:
            spend = (
                _check_count(reserve_pusd or 0, "reserve_pusd", 0),
                _check_count(tokens or 0, "tokens", 0),
            )
        _check_count(sequences, "sequences", 1)
        t = epoch_or_now(now)
        try:
            with self._db.transaction() as tx:
                locked = self._lock_key(tx, key_id)
                return self._admit_locked(
                    tx, locked, request_id, spend, sequences, model, endpoint, t
                )
        except Conflict:
            raise DuplicateRequest(request_id) from None

    @staticmethod
    def _lock_key(tx: Tx, key_id: int) -> ApiKey:
        row = tx.one(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?{tx.for_update}", (key_id,))
        if row is None:
            raise KeyNotFound(key_id)
        return _key(row)

    def _admit_locked(
        self,
        tx: Tx,
        key: ApiKey,
        request_id: str,
        spend: tuple[int, int] | None,
        sequences: int,
        model: str | None,
        endpoint: str | None,
        t: float,
    ) -> Admission:
        window = window_start(t)
        reserve, tokens = (0, 0) if spend is None else spend
        # Reservations of a replica that died never settle: once neither made nor
        # checkpointed within stale_after, they are billed as interrupted and stop counting,
        # so a crash can hold neither a key's budget nor its concurrency for ever.
        self._bill_orphans(
            tx,
            "key_id = ? AND COALESCE(checkpointed_at, created_at) < ?",
            (key.id, t - self.stale_after),
        )
        held = tx.one(
            "SELECT COALESCE(SUM(sequences), 0), COALESCE(SUM(amount_pusd), 0) "
            "FROM reservations WHERE key_id = ?",
            (key.id,),
        )
        in_flight, reserved = (int(held[0]), int(held[1])) if held else (0, 0)
        used_requests, used_tokens = self._window(tx, key.id, window)

        def answer(reason: Reason | None, retry_after: float | None = None) -> Admission:
            return _answer(key, t, used_requests, used_tokens, reason, retry_after, 1, tokens)

        if key.revoked:
            return answer("revoked")
        if key.expired(from_epoch(t)):
            return answer("expired")
        if key.max_concurrent is not None:
            if sequences > key.max_concurrent:
                # Alone larger than the key may run: waiting will not help.
                return answer("sequences")
            if in_flight + sequences > key.max_concurrent:
                return answer("concurrency")
        if key.rpm is not None and used_requests >= key.rpm:
            return answer("rpm", _reset(t))
        if spend is not None:
            refused = _spend_refusal(key, t, used_tokens, tokens, reserved, reserve)
            if refused is not None:
                return answer(*refused)

        tx.execute(
            "INSERT INTO reservations (request_id, key_id, amount_pusd, tokens, created_at, "
            "sequences, reserved_at, model, endpoint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, key.id, reserve, tokens, t, sequences, t, model, endpoint),
        )
        self._count(tx, key.id, window, requests=1, tokens=tokens)
        return answer(None)

    def reserve(
        self,
        request_id: str,
        *,
        reserve_pusd: int,
        tokens: int,
        now: datetime | None = None,
    ) -> Admission:
        """Phase 2, once the prompt is counted: may the admitted request spend ``tokens``
        (prompt plus max output) this minute and ``reserve_pusd`` of the budget? If so, both
        are held on its reservation; if not, the reservation is dropped (its request stays
        counted against requests per minute: phase 1 admitted it and its prompt was read).
        Raises ReservationNotFound when the request holds no reservation."""
        _check_count(reserve_pusd, "reserve_pusd", 0)
        _check_count(tokens, "tokens", 0)
        t = epoch_or_now(now)
        with self._db.transaction() as tx:
            owner = tx.one("SELECT key_id FROM reservations WHERE request_id = ?", (request_id,))
            if owner is None:
                raise ReservationNotFound(request_id)
            key = self._lock_key(tx, int(owner[0]))  # key row first, as everywhere
            # Read again under the lock: a settle, release or purge may have ended it since.
            mine = tx.one(
                "SELECT tokens, COALESCE(reserved_at, created_at) FROM reservations "
                "WHERE request_id = ?",
                (request_id,),
            )
            if mine is None:
                raise ReservationNotFound(request_id)
            # Reserved before (phase 2 again): give back what that counted, then decide anew.
            self._correct_window(tx, key.id, int(mine[0]), mine[1], used=0)
            window = window_start(t)
            others = tx.one(
                "SELECT COALESCE(SUM(amount_pusd), 0) FROM reservations "
                "WHERE key_id = ? AND request_id <> ?",
                (key.id, request_id),
            )
            reserved = int(others[0]) if others else 0
            used_requests, used_tokens = self._window(tx, key.id, window)

            refused: tuple[Reason, float | None] | None
            if key.revoked:
                refused = ("revoked", None)
            elif key.expired(from_epoch(t)):
                refused = ("expired", None)
            else:
                refused = _spend_refusal(key, t, used_tokens, tokens, reserved, reserve_pusd)
            if refused is not None:
                tx.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
                return _answer(key, t, used_requests, used_tokens, *refused, 0, tokens)
            tx.execute(
                "UPDATE reservations SET amount_pusd = ?, tokens = ?, reserved_at = ? "
                "WHERE request_id = ?",
                (reserve_pusd, tokens, t, request_id),
            )
            self._count(tx, key.id, window, requests=0, tokens=tokens)
            return _answer(key, t, used_requests, used_tokens, None, None, 0, tokens)

    @staticmethod
    def _window(tx: Tx, key_id: int, window: int) -> tuple[int, int]:
        """Requests and tokens counted in the key's current minute."""
        current = tx.one(
            "SELECT requests, tokens FROM rate_windows WHERE key_id = ? AND window_start = ?",
            (key_id, window),
        )
        if current is None:
            # A new minute: the key's earlier windows are history.
            tx.execute(
                "DELETE FROM rate_windows WHERE key_id = ? AND window_start < ?", (key_id, window)
            )
            return 0, 0
        return int(current[0]), int(current[1])

    @staticmethod
    def _count(tx: Tx, key_id: int, window: int, *, requests: int, tokens: int) -> None:
        tx.execute(
            "INSERT INTO rate_windows (key_id, window_start, requests, tokens) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (key_id, window_start) DO UPDATE SET "
            "requests = rate_windows.requests + excluded.requests, "
            "tokens = rate_windows.tokens + excluded.tokens",
            (key_id, window, requests, tokens),
        )

    def checkpoint(
        self,
        request_id: str,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        cost_pusd: int,
        now: datetime | None = None,
    ) -> bool:
        """Records how far a running request has got (counts so far and what they cost), on
        its reservation: if its server dies, the request is billed this much. Also a
        heartbeat: a reservation checkpointed within stale_after is never taken for an
        orphan. False when the request holds no reservation (no key, or already ended)."""
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("cached_tokens", cached_tokens),
            ("completion_tokens", completion_tokens),
            ("cost_pusd", cost_pusd),
        ):
            _check_count(value, name, 0)
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) > prompt_tokens ({prompt_tokens})")
        t = epoch_or_now(now)
        # Only the reservation's own row is written: no key lock is needed, and none is
        # waited for (admission and settlement lock the key row, then this row).
        with self._db.transaction() as tx:
            changed = tx.execute(
                "UPDATE reservations SET prompt_tokens = ?, cached_tokens = ?, "
                "completion_tokens = ?, cost_pusd = ?, checkpointed_at = ? WHERE request_id = ?",
                (prompt_tokens, cached_tokens, completion_tokens, cost_pusd, t, request_id),
            )
        return changed == 1

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
        """Ends every open reservation, each billed as an "interrupted" ledger row for its
        last checkpoint (nothing, if it had none); how many there were. Only for a server
        that alone uses this store, starting up: whatever its reservations belonged to died
        with its last process, but the tokens that process served were still served."""
        with self._db.transaction() as tx:
            # Key rows first, in one order, as admission and settlement lock them.
            tx.all(
                "SELECT id FROM api_keys WHERE id IN (SELECT key_id FROM reservations) "
                f"ORDER BY id{tx.for_update}"
            )
            return self._bill_orphans(tx, "1 = 1", ())

    def bill_stale_reservations(self, *, now: datetime | None = None) -> int:
        """Ends every reservation neither made nor checkpointed within stale_after, of any
        key, as admission does for the key it admits; how many there were. Safe while other
        servers run (theirs are fresh), so a PostgreSQL deployment may call it at start-up
        or now and then: an orphan of a key that is never used again is still billed."""
        cutoff = epoch_or_now(now) - self.stale_after
        stale = "COALESCE(checkpointed_at, created_at) < ?"
        with self._db.transaction() as tx:
            tx.all(
                f"SELECT id FROM api_keys WHERE id IN (SELECT key_id FROM reservations "
                f"WHERE {stale}) ORDER BY id{tx.for_update}",
                (cutoff,),
            )
            return self._bill_orphans(tx, stale, (cutoff,))

    def _bill_orphans(self, tx: Tx, where: str, params: tuple[Any, ...]) -> int:
        """Turns the reservations ``where`` selects (a fixed fragment, never the caller's
        text) into "interrupted" ledger rows; their keys' rows must be locked already."""
        rows = tx.all(f"DELETE FROM reservations WHERE {where} RETURNING {ORPHAN_COLUMNS}", params)
        for row in sorted(rows, key=lambda r: (r[8], r[0])):
            (request_id, key_id, model, endpoint, prompt, cached, completion, spent) = row[:8]
            created, checkpointed, held_tokens, counted_at = row[8:]
            ended = created if checkpointed is None else checkpointed
            orphan = LedgerEntry(
                request_id=request_id,
                key_id=int(key_id),
                model=model or UNKNOWN,
                endpoint=endpoint or UNKNOWN,
                prompt_tokens=int(prompt),
                cached_tokens=int(cached),
                completion_tokens=int(completion),
                cost_pusd=int(spent),
                duration_ms=round((ended - created) * 1000),
                status=INTERRUPTED,
                created_at=from_epoch(ended),
            )
            self._record(tx, orphan)
            used = orphan.prompt_tokens + orphan.completion_tokens
            self._correct_window(tx, orphan.key_id, int(held_tokens), counted_at, used=used)
        return len(rows)

    def _drop_reservation(self, tx: Tx, request_id: str, key_id: int, *, used_tokens: int) -> bool:
        held = tx.one(
            "DELETE FROM reservations WHERE request_id = ? AND key_id = ? "
            "RETURNING tokens, COALESCE(reserved_at, created_at)",
            (request_id, key_id),
        )
        if held is None:
            return False
        self._correct_window(tx, key_id, int(held[0]), held[1], used=used_tokens)
        return True

    @staticmethod
    def _correct_window(tx: Tx, key_id: int, held: int, counted_at: float, *, used: int) -> None:
        # The estimate was counted in the minute it was reserved in: correct that minute (a
        # no-op once it has been purged) and never credit a later one with tokens it never
        # held.
        delta = used - held
        if delta:
            tx.execute(
                "UPDATE rate_windows SET tokens = tokens + ? WHERE key_id = ? AND window_start = ?",
                (delta, key_id, window_start(counted_at)),
            )

    # -- the ledger ---------------------------------------------------------------------

    def settle(self, entry: LedgerEntry) -> bool:
        """Records a finished request: ledger row, daily usage, the key's spending; frees its
        reservation. Idempotent by request_id: a second settle changes nothing and returns
        False. The one exception is an "interrupted" row the store wrote for a request it
        took for dead: the request's own settle replaces it (billed once, in full)."""
        for field_name in ("prompt_tokens", "cached_tokens", "completion_tokens", "cost_pusd"):
            _check_count(getattr(entry, field_name), field_name, 0)
        to_epoch(entry.created_at)  # a naive datetime is refused before anything is written
        key_id = entry.key_id
        with self._db.transaction() as tx:
            if key_id is not None:
                locked = tx.one(f"SELECT id FROM api_keys WHERE id = ?{tx.for_update}", (key_id,))
                if locked is None:
                    raise KeyNotFound(key_id)
            if not self._record(tx, entry):
                return False
            if key_id is not None:
                used = entry.prompt_tokens + entry.completion_tokens
                self._drop_reservation(tx, entry.request_id, key_id, used_tokens=used)
        return True

    def _record(self, tx: Tx, entry: LedgerEntry) -> bool:
        """The ledger row, its day's usage and the key's spending; False when the request
        already has a row that stays (the key's row must be locked already)."""
        values = (
            entry.request_id,
            entry.key_id,
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
            to_epoch(entry.created_at),
        )
        inserted = tx.execute(
            f"INSERT INTO ledger ({LEDGER_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (request_id) DO NOTHING",
            values,
        )
        if inserted == 0:
            if entry.status == INTERRUPTED:
                return False
            row = tx.one(
                f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE request_id = ?", (entry.request_id,)
            )
            previous = None if row is None else _entry(row)
            if previous is None or previous.status != INTERRUPTED:
                return False
            if previous.key_id != entry.key_id:
                return False
            sets = ", ".join(f"{column} = ?" for column in LEDGER_COLUMNS.split(", ")[1:])
            tx.execute(
                f"UPDATE ledger SET {sets} WHERE request_id = ?", (*values[1:], entry.request_id)
            )
            self._add_usage(tx, previous, sign=-1)
        self._add_usage(tx, entry, sign=1)
        return True

    @staticmethod
    def _add_usage(tx: Tx, entry: LedgerEntry, *, sign: int) -> None:
        """Adds (sign 1) or takes back (sign -1) one ledger row's usage and spending."""
        day = day_of(to_epoch(entry.created_at))
        key = NO_KEY if entry.key_id is None else entry.key_id
        tx.execute(
            "INSERT INTO usage_daily (day, key_id, model, requests, prompt_tokens, "
            "cached_tokens, completion_tokens, cost_pusd) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (day, key_id, model) DO UPDATE SET "
            "requests = usage_daily.requests + excluded.requests, "
            "prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, "
            "cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens, "
            "completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, "
            "cost_pusd = usage_daily.cost_pusd + excluded.cost_pusd",
            (
                day,
                key,
                entry.model,
                sign,
                sign * entry.prompt_tokens,
                sign * entry.cached_tokens,
                sign * entry.completion_tokens,
                sign * entry.cost_pusd,
            ),
        )
        if sign < 0:
            # A day that only held the row taken back holds nothing.
            tx.execute(
                "DELETE FROM usage_daily WHERE day = ? AND key_id = ? AND model = ? "
                "AND requests = 0",
                (day, key, entry.model),
            )
        if entry.key_id is not None and entry.cost_pusd:
            tx.execute(
                "UPDATE api_keys SET spent_pusd = spent_pusd + ? WHERE id = ?",
                (sign * entry.cost_pusd, entry.key_id),
            )

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
