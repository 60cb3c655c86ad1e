"""The ledger: one row per finished request, the daily rollups kept with it, and the reports
read from them.

A ledger row, its day's ``usage_daily`` row and its key's ``spent_pusd`` change together, in
one transaction, so ``spigot usage`` (read from the rollups) always agrees with the ledger.
"""

from __future__ import annotations

from datetime import datetime

from spigot.metering.db import Database, Params, Row, Tx
from spigot.metering.records import (
    INTERRUPTED,
    LedgerEntry,
    UsageBy,
    UsageRow,
    day_of,
    from_epoch,
    to_epoch,
)

NO_KEY = 0  # usage_daily's key_id for traffic without a key
LEDGER_COLUMNS = (
    "request_id, key_id, model, endpoint, prompt_tokens, cached_tokens, completion_tokens, "
    "cost_pusd, ttft_ms, duration_ms, finish_reason, status, created_at, usage_source"
)
_PLACEHOLDERS = ", ".join("?" for _ in LEDGER_COLUMNS.split(", "))
# Everything but request_id, which a replaced row keeps.
_REPLACE = ", ".join(f"{column} = ?" for column in LEDGER_COLUMNS.split(", ")[1:])
# The report's groups: fixed SQL fragments, picked by ``by``.
GROUPS: dict[UsageBy, str] = {"key": "u.key_id, k.name", "model": "u.model", "day": "u.day"}


def entry_from_row(row: Row) -> LedgerEntry:
    """A LedgerEntry from the LEDGER_COLUMNS of one row."""
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
        usage_source=row[13],
    )


def _values(entry: LedgerEntry) -> tuple[object, ...]:
    """The entry's LEDGER_COLUMNS, in order."""
    return (
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
        entry.usage_source,
    )


def record(tx: Tx, entry: LedgerEntry) -> bool:
    """The ledger row, its day's usage and the key's spending; False when the request
    already has a row that stays (the key's row must be locked already).

    The one row that does not stay is an "interrupted" one the store wrote for a request it
    took for dead: the request's own entry replaces it, and the usage it added is taken back.
    """
    values = _values(entry)
    inserted = tx.execute(
        f"INSERT INTO ledger ({LEDGER_COLUMNS}) VALUES ({_PLACEHOLDERS}) "
        "ON CONFLICT (request_id) DO NOTHING",
        values,
    )
    if inserted == 0:
        if entry.status == INTERRUPTED:
            return False
        row = tx.one(
            f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE request_id = ?", (entry.request_id,)
        )
        previous = None if row is None else entry_from_row(row)
        if previous is None or previous.status != INTERRUPTED:
            return False
        if previous.key_id != entry.key_id:
            return False
        tx.execute(
            f"UPDATE ledger SET {_REPLACE} WHERE request_id = ?", (*values[1:], entry.request_id)
        )
        _add_usage(tx, previous, sign=-1)
    _add_usage(tx, entry, sign=1)
    return True


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
            "DELETE FROM usage_daily WHERE day = ? AND key_id = ? AND model = ? AND requests = 0",
            (day, key, entry.model),
        )
    if entry.key_id is not None and entry.cost_pusd:
        tx.execute(
            "UPDATE api_keys SET spent_pusd = spent_pusd + ? WHERE id = ?",
            (sign * entry.cost_pusd, entry.key_id),
        )


def _filters(
    time_column: str, since: float | str | None, key_id: int | None, prefix: str = ""
) -> tuple[str, Params]:
    """A WHERE clause (or none) on a time column and a key, with its parameters."""
    clauses: list[str] = []
    params: list[object] = []
    if since is not None:
        clauses.append(f"{prefix}{time_column} >= ?")
        params.append(since)
    if key_id is not None:
        clauses.append(f"{prefix}key_id = ?")
        params.append(key_id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _usage_row(row: Row, by: UsageBy) -> UsageRow:
    key_id = key_name = model = day = None
    if by == "key":
        key_id = None if row[0] == NO_KEY else int(row[0])
        key_name = row[1]
    elif by == "model":
        model = row[0]
    else:
        day = row[0]
    requests, prompt, cached, completion, spent = (int(value) for value in row[-5:])
    return UsageRow(
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


class LedgerStore:
    """The ledger's reports, methods of ``Store`` (which brings the database)."""

    _db: Database

    def ledger(self, since: datetime | None = None, key_id: int | None = None) -> list[LedgerEntry]:
        """Ledger rows, oldest first; ``since`` is inclusive."""
        where, params = _filters("created_at", None if since is None else to_epoch(since), key_id)
        with self._db.transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {LEDGER_COLUMNS} FROM ledger{where} ORDER BY created_at, id", params
            )
        return [entry_from_row(row) for row in rows]

    def usage(
        self, since: datetime | None = None, key_id: int | None = None, by: UsageBy = "key"
    ) -> list[UsageRow]:
        """Sums from usage_daily grouped by key, model or day. ``since`` counts whole UTC days
        (the day it falls in onwards)."""
        group = GROUPS.get(by)
        if group is None:
            raise ValueError(f"by must be 'key', 'model' or 'day', not {by!r}")
        day = None if since is None else day_of(to_epoch(since))
        where, params = _filters("day", day, key_id, prefix="u.")
        with self._db.transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {group}, SUM(u.requests), SUM(u.prompt_tokens), SUM(u.cached_tokens), "
                "SUM(u.completion_tokens), SUM(u.cost_pusd) "
                f"FROM usage_daily u LEFT JOIN api_keys k ON k.id = u.key_id{where} "
                f"GROUP BY {group} ORDER BY {group}",
                params,
            )
        return [_usage_row(row, by) for row in rows]

    def totals(self, key_id: int | None = None) -> tuple[int, int, int, int]:
        """(requests, prompt tokens, completion tokens, pico-USD) over the whole ledger."""
        where, params = _filters("created_at", None, key_id)
        with self._db.transaction(write=False) as tx:
            row = tx.one(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
                "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost_pusd), 0) "
                f"FROM ledger{where}",
                params,
            )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])
