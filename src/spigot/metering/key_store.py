"""API keys in the store: made, found, changed, revoked, and a secret's key found.

Keys are never deleted, only revoked: ledger rows keep pointing at them, and a database that
ever had a key keeps requiring one (``has_keys``). Looking a key up takes a name or an id in
one argument; ``checks.key_id_of`` decides which a string is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import Literal, TypeAlias

from spigot.metering.checks import MAX_BIGINT, check_key_name, check_limit, key_id_of
from spigot.metering.db import Conflict, Database, Row, Tx
from spigot.metering.errors import DuplicateKeyName, KeyNotFound
from spigot.metering.keys import hash_secret, hashes_match, key_prefix, new_secret
from spigot.metering.records import ApiKey, epoch_or_now, from_epoch, to_epoch

KEY_COLUMNS = (
    "id, name, key_prefix, created_at, expires_at, revoked_at, budget_pusd, spent_pusd, "
    "rpm, tpm, max_concurrent, models, admin"
)

# What update_key may write: column names come from this fixed set, never from the caller.
Column = Literal[
    "name", "budget_pusd", "rpm", "tpm", "max_concurrent", "models", "expires_at", "admin"
]
ColumnValue: TypeAlias = str | int | float | None


class _Unset(Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""``update_key``'s "not given": None already means "no limit"."""

Unset: TypeAlias = Literal[_Unset.UNSET]


def _opt_time(value: float | None) -> datetime | None:
    return None if value is None else from_epoch(value)


def key_from_row(row: Row) -> ApiKey:
    """An ApiKey from the KEY_COLUMNS of one row."""
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


def models_text(models: Iterable[str] | str | None) -> str | None:
    """The ``models`` column: a sorted JSON list, or None for every model."""
    if models is None:
        return None
    names = models.split(",") if isinstance(models, str) else list(models)
    cleaned = [name.strip() for name in names if name.strip()]
    if not cleaned:
        raise ValueError("models must name at least one model (None allows every model)")
    return json.dumps(sorted(set(cleaned)))


def _expiry(value: datetime | None) -> float | None:
    return None if value is None else to_epoch(value)


def find_key(tx: Tx, id_or_name: int | str, *, lock: bool = False) -> ApiKey | None:
    """By id, or by name; a string ``key_id_of`` reads is tried as a name first (no name is
    one, so that finds nothing) and then as an id."""
    suffix = tx.for_update if lock else ""
    by_id = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?{suffix}"
    if isinstance(id_or_name, int):
        key_id: int | None = id_or_name
        row = None
    else:
        row = tx.one(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?{suffix}", (id_or_name,))
        key_id = key_id_of(id_or_name)
    # Past a BIGINT no key can match (and the drivers refuse the value).
    if row is None and key_id is not None and 0 <= key_id <= MAX_BIGINT:
        row = tx.one(by_id, (key_id,))
    return None if row is None else key_from_row(row)


def lock_key(tx: Tx, key_id: int) -> ApiKey:
    """The key's row, locked for the rest of the transaction: admission and settlement take
    this lock first, so replicas decide one at a time for a key. Raises KeyNotFound."""
    row = tx.one(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?{tx.for_update}", (key_id,))
    if row is None:
        raise KeyNotFound(key_id)
    return key_from_row(row)


def lock_key_row(tx: Tx, key_id: int) -> bool:
    """``lock_key`` without reading the key (False when there is none): for writes that need
    the lock order but not the limits."""
    return tx.one(f"SELECT id FROM api_keys WHERE id = ?{tx.for_update}", (key_id,)) is not None


class KeyStore:
    """The key methods of ``Store`` (which brings the database)."""

    _db: Database

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
            check_key_name(name),
            check_limit(budget_pusd, "budget_pusd", 0),
            check_limit(rpm, "rpm"),
            check_limit(tpm, "tpm"),
            check_limit(max_concurrent, "max_concurrent"),
            models_text(models),
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
        return key_from_row(row), secret

    def get_key(self, id_or_name: int | str) -> ApiKey | None:
        """By id, or by name (a string of ASCII digits is an id: no name is one)."""
        with self._db.transaction(write=False) as tx:
            return find_key(tx, id_or_name)

    def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._db.transaction(write=False) as tx:
            rows = tx.all(f"SELECT {KEY_COLUMNS} FROM api_keys{where} ORDER BY id")
        return [key_from_row(row) for row in rows]

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
        changes: dict[Column, ColumnValue] = {}
        if name is not UNSET:
            changes["name"] = check_key_name(name)
        if budget_pusd is not UNSET:
            changes["budget_pusd"] = check_limit(budget_pusd, "budget_pusd", 0)
        if rpm is not UNSET:
            changes["rpm"] = check_limit(rpm, "rpm")
        if tpm is not UNSET:
            changes["tpm"] = check_limit(tpm, "tpm")
        if max_concurrent is not UNSET:
            changes["max_concurrent"] = check_limit(max_concurrent, "max_concurrent")
        if models is not UNSET:
            changes["models"] = models_text(models)
        if expires_at is not UNSET:
            changes["expires_at"] = _expiry(expires_at)
        if admin is not UNSET:
            changes["admin"] = bool(admin)
        new_name = name if isinstance(name, str) else ""
        try:
            with self._db.transaction() as tx:
                key = find_key(tx, id_or_name, lock=True)
                if key is None:
                    raise KeyNotFound(id_or_name)
                if not changes:
                    return key
                if "name" in changes:
                    other = tx.one(
                        "SELECT id FROM api_keys WHERE name = ? AND id <> ?", (new_name, key.id)
                    )
                    if other is not None:
                        raise DuplicateKeyName(new_name)
                sets = ", ".join(f"{column} = ?" for column in changes)
                row = tx.one(
                    f"UPDATE api_keys SET {sets} WHERE id = ? RETURNING {KEY_COLUMNS}",
                    (*changes.values(), key.id),
                )
        except Conflict:
            raise DuplicateKeyName(new_name) from None
        assert row is not None
        return key_from_row(row)

    def revoke_key(self, id_or_name: int | str, *, now: datetime | None = None) -> bool:
        """True when the key was live and is now revoked; False when unknown or already
        revoked. Revoking is final: requests in flight finish and are still settled."""
        with self._db.transaction() as tx:
            key = find_key(tx, id_or_name, lock=True)
            if key is None:
                return False
            changed = tx.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (epoch_or_now(now), key.id),
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
        return key_from_row(row[1:])
