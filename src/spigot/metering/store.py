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

The methods live with what they work on: key_store.py (keys), admission.py (admit, reserve),
settlement.py (checkpoint, release, settle, orphans), ledger.py (ledger rows and reports),
windows.py (rate windows), stored_responses.py (the Responses API's stored responses);
Store puts them together on one database.
"""

from __future__ import annotations

from spigot.metering.admission import AdmissionStore
from spigot.metering.db import Database, connect
from spigot.metering.key_store import UNSET, KeyStore, Unset
from spigot.metering.ledger import LedgerStore
from spigot.metering.migrations import migrate
from spigot.metering.settlement import SettlementStore
from spigot.metering.stored_responses import ResponseStore

__all__ = ["DEFAULT_STALE_AFTER", "UNSET", "Store", "Unset", "open_store"]

# A reservation neither made nor checkpointed for this long belongs to a crashed replica.
DEFAULT_STALE_AFTER = 3600.0


class Store(KeyStore, AdmissionStore, SettlementStore, LedgerStore, ResponseStore):
    """One database's keys, reservations, rate windows, ledger and stored responses
    (``stored_responses.py``); migrated on opening."""

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


def open_store(url: str, *, stale_after: float = DEFAULT_STALE_AFTER) -> Store:
    """``postgresql://`` or ``postgres://`` URLs open PostgreSQL; anything else is a SQLite
    path (``sqlite:///`` accepted). The schema is migrated before this returns."""
    db = connect(url)
    try:
        return Store(db, stale_after=stale_after)
    except BaseException:
        db.close()
        raise
