"""How an admitted request's reservation ends: progress checkpointed while it runs, then a
ledger row (settle), no row (release), or, when its server died, an "interrupted" ledger row
that bills its last checkpoint (an orphan, found at start-up or once stale).

Every write that ends a reservation locks its key's row first, in the order admission does,
and gives the tokens it counted in its minute back down to those it used.
"""

from __future__ import annotations

from datetime import datetime

from spigot.metering.checks import check_count
from spigot.metering.db import Database, Params, Tx
from spigot.metering.errors import KeyNotFound
from spigot.metering.key_store import lock_key_row
from spigot.metering.ledger import record
from spigot.metering.records import INTERRUPTED, LedgerEntry, epoch_or_now, from_epoch, to_epoch
from spigot.metering.windows import correct_window

UNKNOWN = "unknown"  # model/endpoint of a reservation made before they were recorded
# What an orphaned reservation becomes a ledger row from (see bill_orphans).
ORPHAN_COLUMNS = (
    "request_id, key_id, model, endpoint, prompt_tokens, cached_tokens, completion_tokens, "
    "cost_pusd, created_at, checkpointed_at, tokens, COALESCE(reserved_at, created_at)"
)
# A reservation neither made nor checkpointed within stale_after belongs to a dead server.
STALE = "COALESCE(checkpointed_at, created_at) < ?"
COUNTS = ("prompt_tokens", "cached_tokens", "completion_tokens", "cost_pusd")


def bill_orphans(tx: Tx, where: str, params: Params) -> int:
    """Turns the reservations ``where`` selects (a fixed fragment, never the caller's text)
    into "interrupted" ledger rows billing their last checkpoints, counted as "partial"; how
    many there were. Their keys' rows must be locked already."""
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
            # Whatever counted the tokens, the stream was cut short: what was served until
            # its last checkpoint.
            usage_source="partial",
        )
        record(tx, orphan)
        used = orphan.prompt_tokens + orphan.completion_tokens
        correct_window(tx, int(key_id), int(held_tokens), counted_at, used=used)
    return len(rows)


def drop_reservation(tx: Tx, request_id: str, key_id: int, *, used_tokens: int) -> bool:
    """Deletes the request's reservation and corrects its minute to ``used_tokens``; False
    when it held none (the key's row must be locked already)."""
    held = tx.one(
        "DELETE FROM reservations WHERE request_id = ? AND key_id = ? "
        "RETURNING tokens, COALESCE(reserved_at, created_at)",
        (request_id, key_id),
    )
    if held is None:
        return False
    correct_window(tx, key_id, int(held[0]), held[1], used=used_tokens)
    return True


def lock_key_ids(tx: Tx, where: str = "", params: Params = ()) -> None:
    """Locks the rows of the keys whose reservations ``where`` selects (a fixed fragment), in
    id order: the order admission and settlement lock them in, so none deadlock."""
    selected = f" WHERE {where}" if where else ""
    tx.all(
        f"SELECT id FROM api_keys WHERE id IN (SELECT key_id FROM reservations{selected}) "
        f"ORDER BY id{tx.for_update}",
        params,
    )


class SettlementStore:
    """The methods of ``Store`` that end reservations (``Store`` brings the database)."""

    _db: Database
    stale_after: float

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
        counts = (prompt_tokens, cached_tokens, completion_tokens, cost_pusd)
        for name, value in zip(COUNTS, counts, strict=True):
            check_count(value, name, 0)
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) > prompt_tokens ({prompt_tokens})")
        t = epoch_or_now(now)
        # Only the reservation's own row is written: no key lock is needed, and none is
        # waited for (admission and settlement lock the key row, then this row).
        with self._db.transaction() as tx:
            changed = tx.execute(
                "UPDATE reservations SET prompt_tokens = ?, cached_tokens = ?, "
                "completion_tokens = ?, cost_pusd = ?, checkpointed_at = ? WHERE request_id = ?",
                (*counts, t, request_id),
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
            key_id = int(owner[0])
            lock_key_row(tx, key_id)  # same lock order as admit and settle: key row first
            return drop_reservation(tx, request_id, key_id, used_tokens=0)

    def settle(self, entry: LedgerEntry) -> bool:
        """Records a finished request: ledger row, daily usage, the key's spending; frees its
        reservation. Idempotent by request_id: a second settle changes nothing and returns
        False. The one exception is an "interrupted" row the store wrote for a request it
        took for dead: the request's own settle replaces it (billed once, in full)."""
        for name in COUNTS:
            check_count(getattr(entry, name), name, 0)
        to_epoch(entry.created_at)  # a naive datetime is refused before anything is written
        key_id = entry.key_id
        with self._db.transaction() as tx:
            if key_id is not None and not lock_key_row(tx, key_id):
                raise KeyNotFound(key_id)
            if not record(tx, entry):
                return False
            if key_id is not None:
                used = entry.prompt_tokens + entry.completion_tokens
                drop_reservation(tx, entry.request_id, key_id, used_tokens=used)
        return True

    def clear_reservations(self) -> int:
        """Ends every open reservation, each billed as an "interrupted" ledger row for its
        last checkpoint (nothing, if it had none); how many there were. Only for a server
        that alone uses this store, starting up: whatever its reservations belonged to died
        with its last process, but the tokens that process served were still served."""
        with self._db.transaction() as tx:
            lock_key_ids(tx)
            return bill_orphans(tx, "1 = 1", ())

    def bill_stale_reservations(self, *, now: datetime | None = None) -> int:
        """Ends every reservation neither made nor checkpointed within stale_after, of any
        key, as admission does for the key it admits; how many there were. Safe while other
        servers run (theirs are fresh), so a PostgreSQL deployment may call it at start-up
        or now and then: an orphan of a key that is never used again is still billed."""
        cutoff = (epoch_or_now(now) - self.stale_after,)
        with self._db.transaction() as tx:
            lock_key_ids(tx, STALE, cutoff)
            return bill_orphans(tx, STALE, cutoff)
