"""API keys, the usage ledger, budgets and rate limits, in SQLite or PostgreSQL.

``open_store(url)`` is the entry point; see store.py for the life of a request.
"""

from spigot.metering.checks import MAX_BIGINT, check_key_name, key_id_of
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
from spigot.metering.records import (
    USAGE_SOURCES,
    Admission,
    ApiKey,
    LedgerEntry,
    UsageRow,
    UsageSource,
)
from spigot.metering.store import UNSET, Store, Unset, open_store

__all__ = [
    "MAX_BIGINT",
    "UNSET",
    "USAGE_SOURCES",
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
    "Unset",
    "UsageRow",
    "UsageSource",
    "check_key_name",
    "cost",
    "key_id_of",
    "open_store",
    "parse_usd",
    "usd",
]
