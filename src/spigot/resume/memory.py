"""The event log of one server: streams in a dict, followers woken by an asyncio.Event.

Everything runs on the server's event loop, so a method's body is atomic up to
its first ``await``; the log needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from types import TracebackType

from spigot.resume.ids import new_stream_id
from spigot.resume.log import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_FINISHED,
    EventsDropped,
    InvalidLastEventId,
    StreamLost,
    StreamNotFound,
)


@dataclass(eq=False)
class _Stream:
    owner: str
    ttl: float
    expires_at: float
    left_at: float  # when the last follower left (open time until one comes)
    events: deque[bytes]
    next_seq: int = 0
    done: bool = False
    gone: bool = False
    followers: int = 0
    # Replaced on every change: a waiter takes the current one, then waits on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def first_seq(self) -> int:
        return self.next_seq - len(self.events)

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class MemoryEventLog:
    def __init__(
        self, *, max_events: int = DEFAULT_MAX_EVENTS, max_finished: int = DEFAULT_MAX_FINISHED
    ) -> None:
        if max_events < 1 or max_finished < 0:
            raise ValueError("max_events must be positive and max_finished not negative")
        self.max_events = max_events
        self.max_finished = max_finished
        self._streams: dict[str, _Stream] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # oldest finish first

    async def open(self, owner: str, ttl: float) -> str:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        now = time.monotonic()
        self._sweep(now)
        stream_id = new_stream_id()
        self._streams[stream_id] = _Stream(
            owner=owner,
            ttl=ttl,
            expires_at=now + ttl,
            left_at=now,
            events=deque(maxlen=self.max_events),
        )
        return stream_id

    async def append(self, stream_id: str, event: bytes) -> int:
        stream = self._live(stream_id)
        if stream is None:
            raise StreamLost()
        if stream.done:
            raise RuntimeError("append to a finished stream")
        seq = stream.next_seq
        stream.events.append(event)  # the deque's maxlen drops the oldest
        stream.next_seq += 1
        stream.expires_at = time.monotonic() + stream.ttl
        stream.wake()
        return seq

    async def finish(self, stream_id: str) -> None:
        stream = self._live(stream_id)
        if stream is None or stream.done:
            return
        stream.done = True
        stream.expires_at = time.monotonic() + stream.ttl
        stream.wake()
        self._finished[stream_id] = None
        while len(self._finished) > self.max_finished:
            oldest, _ = self._finished.popitem(last=False)
            self._drop(oldest)

    async def owner(self, stream_id: str) -> str | None:
        stream = self._live(stream_id)
        return None if stream is None else stream.owner

    async def follow(self, stream_id: str, *, owner: str, after: int = -1) -> MemoryFollower:
        if after < -1:
            raise ValueError("after must be -1 (from the start) or a seq")
        stream = self._live(stream_id)
        if stream is None or stream.owner != owner:
            raise StreamNotFound()
        if after >= stream.next_seq:
            raise InvalidLastEventId()
        if after + 1 < stream.first_seq:
            raise EventsDropped()
        return MemoryFollower(self, stream_id, stream, after)

    async def detached_for(self, stream_id: str) -> float:
        stream = self._live(stream_id)
        if stream is None:
            raise StreamLost()
        now = time.monotonic()
        stream.expires_at = max(stream.expires_at, now + stream.ttl)
        return 0.0 if stream.followers else now - stream.left_at

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        for stream_id in list(self._streams):
            self._drop(stream_id)
        self._finished.clear()

    def __len__(self) -> int:
        """Streams held, expired ones included until the next sweep."""
        return len(self._streams)

    def _live(self, stream_id: str) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is not None and time.monotonic() >= stream.expires_at:
            self._drop(stream_id)
            return None
        return stream

    def _sweep(self, now: float) -> None:
        for stream_id in [s for s, st in self._streams.items() if now >= st.expires_at]:
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        self._finished.pop(stream_id, None)
        if stream is not None:
            stream.gone = True
            stream.events.clear()
            stream.wake()


class MemoryFollower:
    def __init__(self, log: MemoryEventLog, stream_id: str, stream: _Stream, after: int) -> None:
        self._log = log
        self._stream_id = stream_id
        self._stream = stream
        self._cursor = after
        self._closed = False
        stream.followers += 1

    def __aiter__(self) -> MemoryFollower:
        return self

    async def __anext__(self) -> tuple[int, bytes]:
        stream = self._stream
        while True:
            if self._closed:
                raise StopAsyncIteration
            if stream.gone:
                raise StreamLost()
            seq = self._cursor + 1
            if seq < stream.next_seq:
                if seq < stream.first_seq:
                    raise StreamLost("Events this stream still needed were dropped.")
                self._cursor = seq
                return seq, stream.events[seq - stream.first_seq]
            if stream.done:
                raise StopAsyncIteration
            # Wake on the next change, or at expiry (a producer that stopped calling).
            timeout = stream.expires_at - time.monotonic()
            if timeout <= 0:
                self._log._live(self._stream_id)  # drops it if still expired
                continue
            changed = stream.changed
            # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancellation that
            # arrives as the event is set, and the consumer would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.followers -= 1
        # (a finished stream's followers may outlive it: counting on is harmless)
        if not self._stream.followers:
            self._stream.left_at = time.monotonic()

    async def __aenter__(self) -> MemoryFollower:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
