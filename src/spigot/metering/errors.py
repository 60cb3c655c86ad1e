"""What the metering store raises; the server maps these to HTTP errors, the CLI to messages."""

from __future__ import annotations


class StoreError(Exception):
    """Anything the store refuses or cannot do."""


class DuplicateKeyName(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an API key named {name!r} already exists")
        self.name = name


class KeyNotFound(StoreError, LookupError):
    def __init__(self, id_or_name: int | str) -> None:
        super().__init__(f"no API key {id_or_name!r}")
        self.id_or_name = id_or_name


class DuplicateRequest(StoreError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id!r} already holds a reservation")
        self.request_id = request_id


class ReservationNotFound(StoreError, LookupError):
    """Phase 2 for a request that holds no reservation (never admitted, or already ended)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id!r} holds no reservation")
        self.request_id = request_id


class SchemaTooNew(StoreError):
    """The database was migrated by a newer spigot; this one must not write to it."""


class StoreUnavailable(StoreError):
    """The database could not be reached or stayed locked: a 503, not a 500."""
