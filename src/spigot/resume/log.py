"""The event log behind resumable streams: what a producer writes and consumers follow.

With ``--on-disconnect detach=SECONDS`` a streamed completion is split in two:

    producer task   open() -> append(event)... -> finish()      (whatever the ending)
                    polls detached_for() and aborts generation once no consumer
                    has been attached for SECONDS
    consumer        follow(stream_id, owner=..., after=seq) -> Follower
                    (the first request follows with after=-1; a reconnect with
                    ``Last-Event-ID: <stream_id>:<seq>`` follows with after=seq)

Events are opaque bytes, already framed (``data: {...}\\n\\n``); the log numbers
them 0, 1, 2, ... A follower yields every event with a seq above ``after``
exactly once, in order, first those already written, then live ones as they are
appended, and ends after ``finish``. Replay and live reading are the same read
from one cursor, so there is no boundary where an event could be missed or sent
twice. A follower never skips silently: if events it still needs are gone
(dropped at the cap, or the log expired) it raises ``StreamLost``.

Lifetimes: ``ttl`` counts from the producer's last sign of life (open, append,
finish, detached_for): a finished stream is kept ``ttl`` seconds for late
resumes, and a stream whose producer died (its replica crashed) disappears
``ttl`` seconds later, which also ends its followers with ``StreamLost``.
Followers do not extend a stream's life, so a dead producer cannot be kept
alive by a reader.

The cap: a stream keeps at most ``max_events`` events; beyond that the oldest
are dropped. Followers that are caught up never notice; a resume from before
the oldest kept event is refused (``EventsDropped``, 404), and a follower that
fell more than ``max_events`` behind gets ``StreamLost`` rather than a gap. The
memory log also bounds how many finished streams it keeps (oldest go first);
live streams are bounded by admission (each holds a generation slot).

Attached consumers: a ``Follower`` counts as attached from ``follow()`` until
its ``aclose()``, on any replica (Redis: a lease refreshed by heartbeats, so a
replica that dies without closing stops counting one lease later, and the
producer then sees it as gone since the lease's end).

Cancellation: cancelling the task that iterates a follower stops it at once,
in both logs (the Redis log runs each command in a shielded task of its own,
because redis-py 8 can swallow a cancellation that lands mid-command).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol

from spigot.errors import InvalidRequest, NotFound, Overloaded, SpigotError

DEFAULT_MAX_EVENTS = 16384  # a full 8k-token context is ~8.2k events, one per token
DEFAULT_MAX_FINISHED = 256  # memory log: finished streams kept for late resumes
DEFAULT_HEARTBEAT = 1.0  # Redis: seconds between a follower's lease refreshes
LEASE_HEARTBEATS = 3  # a lease outlives this many missed heartbeats


class StreamNotFound(NotFound):
    """Unknown, expired, or another owner's stream: the same answer for all three,
    so a stream id leaks nothing about streams one does not own."""

    default_code = "stream_not_found"

    def __init__(self, message: str = "No resumable stream matches the Last-Event-ID.") -> None:
        super().__init__(message)


class EventsDropped(StreamNotFound):
    """The stream is there but the events after ``Last-Event-ID`` are no longer all kept."""

    default_code = "stream_events_dropped"

    def __init__(self) -> None:
        super().__init__("The events after this Last-Event-ID are no longer kept.")


class InvalidLastEventId(InvalidRequest):
    """A well-formed id naming an event the stream has not produced yet."""

    default_code = "invalid_last_event_id"

    def __init__(self) -> None:
        super().__init__("Last-Event-ID names an event this stream has not sent.")


class StreamLost(SpigotError):
    """Raised while following (sent in-band): the log expired or dropped events
    the follower still needed, so it cannot go on without a gap."""

    default_code = "stream_lost"

    def __init__(self, message: str = "The stream's event log is gone.") -> None:
        super().__init__(message)


class EventLogUnavailable(Overloaded):
    """The shared log (Redis) cannot be reached; any method may raise it."""

    default_code = "event_log_unavailable"

    def __init__(self, message: str = "The stream event log is unavailable.") -> None:
        super().__init__(message, retry_after=1)


class Follower(Protocol):
    """One consumer: iterates ``(seq, event)`` and counts as attached until ``aclose()``.

    ``aclose()`` is idempotent and must run however the consumer ends (use
    ``async with``, or call it from the response's close hook).
    """

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]: ...

    async def __anext__(self) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Follower: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class EventLog(Protocol):
    async def open(self, owner: str, ttl: float) -> str:
        """A new stream for ``owner`` (tenant scope, e.g. ``key:12``); returns its secret id."""
        ...

    async def append(self, stream_id: str, event: bytes) -> int:
        """Adds one framed event; returns its seq. StreamLost if the stream expired."""
        ...

    async def finish(self, stream_id: str) -> None:
        """No more events; followers end once they have read them. Idempotent; a no-op
        on a stream that is already gone."""
        ...

    async def owner(self, stream_id: str) -> str | None:
        """The stream's owner, or None if unknown or expired."""
        ...

    async def follow(self, stream_id: str, *, owner: str, after: int = -1) -> Follower:
        """Checks everything a resume can fail on, before any response is sent:
        StreamNotFound (unknown, expired, other owner), EventsDropped,
        InvalidLastEventId (``after`` beyond the last event). The returned
        follower is attached until closed."""
        ...

    async def detached_for(self, stream_id: str) -> float:
        """Seconds since the last follower left (since open if none ever came); 0.0
        while one is attached. For the producer, which polls it: each call also
        tells the log the producer is alive. StreamLost if the stream is gone."""
        ...

    async def ping(self) -> None:
        """EventLogUnavailable unless the log can be used (a startup check)."""
        ...

    async def close(self) -> None:
        """Ends every follower of this instance with StreamLost and frees connections."""
        ...
