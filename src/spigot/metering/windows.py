"""Rate windows: the requests and tokens a key has used in the current minute.

Windows are fixed minutes (``window_start`` is the epoch second a minute starts at), one row
per key and minute in ``rate_windows``. A request counts its estimated tokens in the minute it
was reserved in; its settlement (or its orphan's billing) corrects that same minute to what it
really used. Every function here runs inside a transaction that already holds the key's row.
"""

from __future__ import annotations

from spigot.metering.db import Tx

WINDOW_SECONDS = 60


def window_start(epoch: float) -> int:
    return int(epoch // WINDOW_SECONDS) * WINDOW_SECONDS


def seconds_to_reset(t: float) -> float:
    """Seconds to the end of the minute ``t`` falls in."""
    return window_start(t) + WINDOW_SECONDS - t


def used_in_window(tx: Tx, key_id: int, window: int) -> tuple[int, int]:
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


def count_in_window(tx: Tx, key_id: int, window: int, *, requests: int, tokens: int) -> None:
    tx.execute(
        "INSERT INTO rate_windows (key_id, window_start, requests, tokens) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (key_id, window_start) DO UPDATE SET "
        "requests = rate_windows.requests + excluded.requests, "
        "tokens = rate_windows.tokens + excluded.tokens",
        (key_id, window, requests, tokens),
    )


def correct_window(tx: Tx, key_id: int, held: int, counted_at: float, *, used: int) -> None:
    """Replaces the ``held`` tokens a reservation counted at ``counted_at`` by the ``used``
    ones. The estimate was counted in the minute it was reserved in: that minute is corrected
    (a no-op once it has been purged), never a later one credited with tokens it never held."""
    delta = used - held
    if delta:
        tx.execute(
            "UPDATE rate_windows SET tokens = tokens + ? WHERE key_id = ? AND window_start = ?",
            (delta, key_id, window_start(counted_at)),
        )
