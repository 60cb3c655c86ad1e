"""API keys, the usage ledger, budgets and rate limits, in SQLite or PostgreSQL.

``open_store(url)`` is the entry point; see store.py for the life of a request.
"""

from spigot.metering.errors import (
    DuplicateKeyName,
    DuplicateRequest,
    KeyNotFound,
    ReservationNotFound,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from spigot.metering.money import Price, cost, parse_usd, usd
from spigot.metering.records import Admission, ApiKey, LedgerEntry, UsageRow
from spigot.metering.store import UNSET, Store, open_store

__all__ = [
    "UNSET",
    "Admission",
    "ApiKey",
    "DuplicateKeyName",
    "DuplicateRequest",
    "KeyNotFound",
    "LedgerEntry",
    "Price",
    "ReservationNotFound",
    "SchemaTooNew",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UsageRow",
    "cost",
    "open_store",
    "parse_usd",
    "usd",
]
