"""Stored responses (the Responses API's ``store``): kept per owner, read back, chained, deleted.

A response is kept with the request's input items (its ``instructions`` apart: a later
``previous_response_id`` does not carry them over, as OpenAI documents) and the whole
response object, whose ``output`` holds the output items. Every read names the owner (the
key's scope), so a response of another key is exactly as absent as one never made.

Kept in the metering database because that is the one database a server has (SQLite, or
the PostgreSQL that replicas share, so any replica reads what another stored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spigot.metering.db import Database, Row, Tx

# A chain longer than this is refused rather than read into one prompt.
MAX_CHAIN = 1000
_COLUMNS = "id, owner, previous_id, created_at, input, response"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    owner: str
    previous_id: str | None
    created_at: float
    input_items: list[dict[str, Any]]
    response: dict[str, Any]

    @property
    def output_items(self) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = self.response.get("output") or []
        return output


class ChainBroken(LookupError):
    """A response of the chain is missing (never made, deleted, or another owner's)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


def _from_row(row: Row) -> StoredResponse:
    return StoredResponse(
        id=row[0],
        owner=row[1],
        previous_id=row[2],
        created_at=float(row[3]),
        input_items=json.loads(row[4]),
        response=json.loads(row[5]),
    )


def _one(tx: Tx, owner: str, response_id: str) -> StoredResponse | None:
    row = tx.one(
        f"SELECT {_COLUMNS} FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
    )
    return None if row is None else _from_row(row)


class ResponseStore:
    """The ``responses`` table; a Store mixin (one transaction per method, thread-safe)."""

    _db: Database

    def save_response(self, stored: StoredResponse) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                f"INSERT INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.owner,
                    stored.previous_id,
                    stored.created_at,
                    json.dumps(stored.input_items, separators=(",", ":")),
                    json.dumps(stored.response, separators=(",", ":")),
                ),
            )

    def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        with self._db.transaction(write=False) as tx:
            return _one(tx, owner, response_id)

    def response_chain(self, owner: str, response_id: str) -> list[StoredResponse]:
        """The response and every one before it, oldest first; ``ChainBroken`` naming the
        first one missing. One transaction: a concurrent delete cannot tear the chain."""
        chain: list[StoredResponse] = []
        with self._db.transaction(write=False) as tx:
            next_id: str | None = response_id
            while next_id is not None:
                if len(chain) >= MAX_CHAIN:
                    raise ChainBroken(next_id)
                found = _one(tx, owner, next_id)
                if found is None:
                    raise ChainBroken(next_id)
                chain.append(found)
                next_id = found.previous_id
        chain.reverse()
        return chain

    def delete_response(self, owner: str, response_id: str) -> bool:
        with self._db.transaction() as tx:
            return (
                tx.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
                > 0
            )
