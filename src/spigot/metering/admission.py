"""Admission: may a request start, and may it spend what it may cost?

Two phases, so that the work that grows with a prompt (templating, tokenizing) is done only
for requests already admitted: ``admit`` (the key is live, concurrency, requests per minute)
holds a reservation row with nothing reserved yet; ``reserve`` (tokens per minute, budget),
once the prompt is counted, sets the row's amount or drops it. ``admit`` given an amount or
tokens is both phases in one transaction.

Each decision is made on the key's locked row, in the transaction that writes it, so replicas
sharing a database never both spend the last of a budget or the last request of a minute.
"""

from __future__ import annotations

from datetime import datetime

from spigot.metering.checks import check_count
from spigot.metering.db import Conflict, Database, Tx
from spigot.metering.errors import DuplicateRequest, ReservationNotFound
from spigot.metering.key_store import lock_key
from spigot.metering.records import Admission, ApiKey, Reason, epoch_or_now, from_epoch
from spigot.metering.settlement import STALE, bill_orphans
from spigot.metering.windows import (
    correct_window,
    count_in_window,
    seconds_to_reset,
    used_in_window,
    window_start,
)

Refusal = tuple[Reason, float | None]  # why, and the seconds after which a retry may pass


def spend_refusal(
    key: ApiKey, t: float, used_tokens: int, tokens: int, reserved: int, reserve: int
) -> Refusal | None:
    """Tokens per minute, then budget: why ``tokens`` and ``reserve`` cannot be spent now."""
    tpm = key.tpm
    if tpm is not None and used_tokens + tokens > tpm:
        # Larger than a whole minute's allowance: waiting will not help.
        return "tpm", None if tokens > tpm else seconds_to_reset(t)
    if key.budget_pusd is not None:
        committed = key.spent_pusd + reserved
        # Nothing left (even for a zero estimate), or the estimate does not fit.
        if committed >= key.budget_pusd or committed + reserve > key.budget_pusd:
            return "budget", None
    return None


def answer(
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
    reset = seconds_to_reset(t)
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


def _held(tx: Tx, key_id: int) -> tuple[int, int]:
    """Sequences running and pico-USD reserved by the key's open reservations."""
    held = tx.one(
        "SELECT COALESCE(SUM(sequences), 0), COALESCE(SUM(amount_pusd), 0) "
        "FROM reservations WHERE key_id = ?",
        (key_id,),
    )
    return (int(held[0]), int(held[1])) if held else (0, 0)


class AdmissionStore:
    """The admission methods of ``Store`` (which brings the database and stale_after)."""

    _db: Database
    stale_after: float

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
                check_count(reserve_pusd or 0, "reserve_pusd", 0),
                check_count(tokens or 0, "tokens", 0),
            )
        check_count(sequences, "sequences", 1)
        t = epoch_or_now(now)
        try:
            with self._db.transaction() as tx:
                locked = lock_key(tx, key_id)
                return self._admit_locked(
                    tx, locked, request_id, spend, sequences, model, endpoint, t
                )
        except Conflict:
            raise DuplicateRequest(request_id) from None

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
        bill_orphans(tx, f"key_id = ? AND {STALE}", (key.id, t - self.stale_after))
        in_flight, reserved = _held(tx, key.id)
        used_requests, used_tokens = used_in_window(tx, key.id, window)

        def decided(reason: Reason | None, retry_after: float | None = None) -> Admission:
            return answer(key, t, used_requests, used_tokens, reason, retry_after, 1, tokens)

        if key.revoked:
            return decided("revoked")
        if key.expired(from_epoch(t)):
            return decided("expired")
        if key.max_concurrent is not None:
            if sequences > key.max_concurrent:
                # Alone larger than the key may run: waiting will not help.
                return decided("sequences")
            if in_flight + sequences > key.max_concurrent:
                return decided("concurrency")
        if key.rpm is not None and used_requests >= key.rpm:
            return decided("rpm", seconds_to_reset(t))
        if spend is not None:
            refused = spend_refusal(key, t, used_tokens, tokens, reserved, reserve)
            if refused is not None:
                return decided(*refused)

        tx.execute(
            "INSERT INTO reservations (request_id, key_id, amount_pusd, tokens, created_at, "
            "sequences, reserved_at, model, endpoint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, key.id, reserve, tokens, t, sequences, t, model, endpoint),
        )
        count_in_window(tx, key.id, window, requests=1, tokens=tokens)
        return decided(None)

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
        check_count(reserve_pusd, "reserve_pusd", 0)
        check_count(tokens, "tokens", 0)
        t = epoch_or_now(now)
        with self._db.transaction() as tx:
            owner = tx.one("SELECT key_id FROM reservations WHERE request_id = ?", (request_id,))
            if owner is None:
                raise ReservationNotFound(request_id)
            key = lock_key(tx, int(owner[0]))  # key row first, as everywhere
            # Read again under the lock: a settle, release or purge may have ended it since.
            mine = tx.one(
                "SELECT tokens, COALESCE(reserved_at, created_at) FROM reservations "
                "WHERE request_id = ?",
                (request_id,),
            )
            if mine is None:
                raise ReservationNotFound(request_id)
            # Reserved before (phase 2 again): give back what that counted, then decide anew.
            correct_window(tx, key.id, int(mine[0]), mine[1], used=0)
            window = window_start(t)
            others = tx.one(
                "SELECT COALESCE(SUM(amount_pusd), 0) FROM reservations "
                "WHERE key_id = ? AND request_id <> ?",
                (key.id, request_id),
            )
            reserved = int(others[0]) if others else 0
            used_requests, used_tokens = used_in_window(tx, key.id, window)

            refused: Refusal | None
            if key.revoked:
                refused = ("revoked", None)
            elif key.expired(from_epoch(t)):
                refused = ("expired", None)
            else:
                refused = spend_refusal(key, t, used_tokens, tokens, reserved, reserve_pusd)
            if refused is not None:
                tx.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
                return answer(key, t, used_requests, used_tokens, *refused, 0, tokens)
            tx.execute(
                "UPDATE reservations SET amount_pusd = ?, tokens = ?, reserved_at = ? "
                "WHERE request_id = ?",
                (reserve_pusd, tokens, t, request_id),
            )
            count_in_window(tx, key.id, window, requests=0, tokens=tokens)
            return answer(key, t, used_requests, used_tokens, None, None, 0, tokens)
