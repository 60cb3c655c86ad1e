"""Stream ids and SSE event ids: ``id: <stream_id>:<seq>``.

A stream id is the only secret that guards a detached stream between its
owner's reconnects (the owner check is the second lock), so it comes from
``secrets`` and is long enough that guessing one is hopeless: 18 random bytes,
24 URL-safe characters.
"""

from __future__ import annotations

import re
import secrets

STREAM_ID_BYTES = 18
MAX_SEQ = 10**9  # far above any stream's event count; keeps a parsed seq a small int

# token_urlsafe's alphabet; the lengths leave room for other id sizes later.
_STREAM_ID = r"[A-Za-z0-9_-]{16,64}"
_LAST_EVENT_ID = re.compile(rf"({_STREAM_ID}):(0|[1-9][0-9]{{0,9}})")
_STREAM_ID_ONLY = re.compile(_STREAM_ID)


def new_stream_id() -> str:
    return secrets.token_urlsafe(STREAM_ID_BYTES)


def event_id(stream_id: str, seq: int) -> str:
    return f"{stream_id}:{seq}"


def with_event_id(event: bytes, stream_id: str, seq: int) -> bytes:
    """An already framed event (``data: ...\\n\\n``) with its ``id:`` line in front."""
    return b"id: " + event_id(stream_id, seq).encode("ascii") + b"\n" + event


def is_stream_id(value: str) -> bool:
    """Whether ``value`` could be a stream id (garbage never reaches the log)."""
    return _STREAM_ID_ONLY.fullmatch(value) is not None


def parse_last_event_id(value: str) -> tuple[str, int] | None:
    """``(stream_id, seq)`` from a ``Last-Event-ID`` header, or None if it is not one of ours.

    Strict: exactly what ``event_id`` writes (surrounding whitespace aside), so a
    garbage header never reaches the log.
    """
    match = _LAST_EVENT_ID.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    seq = int(match[2])
    if seq >= MAX_SEQ:
        return None
    return match[1], seq
