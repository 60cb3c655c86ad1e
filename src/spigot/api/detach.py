"""Streams that outlive their connection: ``--on-disconnect detach=SECONDS``.

A streamed request then runs as a producer task that writes each SSE event
to the event log (``spigot.resume``); every HTTP response, the first one and
each resume, is a follower of that log and sends the events with an
``id: <stream>:<seq>`` line. A client that vanishes leaves the producer
running; the same key reconnects with ``Last-Event-ID`` (on the same POST, or
``GET /v1/streams/{id}``) and gets every event after that one, exactly once.
If no follower has been attached for SECONDS the producer aborts generation.

Usage is billed once, by the producer (``StreamedRequest``), however many
times the client reconnects. With the default ``cancel`` none of this runs:
events carry no ``id:`` (the wire contract), and a vanished client's
generation stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from spigot.api.sse import EventStreamResponse, data_event
from spigot.api.streaming import StreamedRequest
from spigot.errors import SpigotError
from spigot.resume import (
    EventLog,
    Follower,
    InvalidLastEventId,
    StreamNotFound,
    is_stream_id,
    parse_last_event_id,
    with_event_id,
)

log = logging.getLogger(__name__)

# A finished stream's events stay readable this long after its last event.
RETAIN_AFTER_FINISH = 60.0


class Detached:
    def __init__(self, events: EventLog, detach_seconds: float) -> None:
        self.events = events
        self.detach_seconds = detach_seconds
        self._producers: set[asyncio.Task[None]] = set()

    @property
    def producing(self) -> int:
        return len(self._producers)

    async def start(
        self, streamed: StreamedRequest, owner: str, headers: dict[str, str] | None
    ) -> EventStreamResponse:
        """Run ``streamed`` as a producer; the response follows it from the first event."""
        try:
            stream_id = await self.events.open(owner, self.detach_seconds + RETAIN_AFTER_FINISH)
            follower = await self.events.follow(stream_id, owner=owner, after=-1)
        except BaseException:
            await streamed.close()  # never started: abort and bill what it used (nothing)
            raise
        task = asyncio.create_task(self._produce(stream_id, streamed))
        self._producers.add(task)
        task.add_done_callback(self._producers.discard)
        return _response(stream_id, follower, headers)

    async def resume(self, owner: str, last_event_id: str) -> EventStreamResponse:
        parsed = parse_last_event_id(last_event_id)
        if parsed is None:
            raise InvalidLastEventId()
        stream_id, seq = parsed
        follower = await self.events.follow(stream_id, owner=owner, after=seq)
        return _response(stream_id, follower, None)

    async def follow_from_start(self, owner: str, stream_id: str) -> EventStreamResponse:
        if not is_stream_id(stream_id):
            raise StreamNotFound()
        follower = await self.events.follow(stream_id, owner=owner, after=-1)
        return _response(stream_id, follower, None)

    async def _produce(self, stream_id: str, streamed: StreamedRequest) -> None:
        producer = asyncio.create_task(self._append_all(stream_id, streamed))
        watchdog = asyncio.create_task(self._until_abandoned(stream_id))
        try:
            await asyncio.wait({producer, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if not producer.done():
                log.info(
                    "stream %s: no client for %.0fs, cancelled", stream_id[:8], self.detach_seconds
                )
        except Exception:
            log.exception("stream %s: producer failed", stream_id[:8])
        finally:
            for task in (producer, watchdog):
                task.cancel()
            for task in (producer, watchdog):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            # Aborts what still runs and bills it, if the events did not get that far.
            await streamed.close()
            completed = (
                producer.done() and not producer.cancelled() and producer.exception() is None
            )
            with contextlib.suppress(Exception):
                if not completed:
                    # A late resume must learn the stream was cut, not see it just stop.
                    await self.events.append(stream_id, data_event(_abandoned(self.detach_seconds)))
                await self.events.finish(stream_id)

    async def _append_all(self, stream_id: str, streamed: StreamedRequest) -> None:
        events = streamed.events()
        try:
            async for event in events:
                await self.events.append(stream_id, event)
        finally:
            await events.aclose()

    async def _until_abandoned(self, stream_id: str) -> None:
        # Polled, not awaited on an event: with Redis the followers may be on
        # another replica, and each poll also tells the log this producer lives.
        poll = min(1.0, self.detach_seconds / 4)
        while True:
            idle = await self.events.detached_for(stream_id)
            if idle >= self.detach_seconds:
                return
            await asyncio.sleep(poll)

    async def close(self, within: float) -> None:
        """At shutdown: producers end (the shutdown grace interrupts them); then the log."""
        if self._producers:
            await asyncio.wait(set(self._producers), timeout=within)
        leftover = set(self._producers)
        for task in leftover:
            task.cancel()
        if leftover:
            # Their finally blocks abort and bill: give them the engine while it runs.
            await asyncio.wait(leftover, timeout=5)
        await self.events.close()


def _abandoned(seconds: float) -> dict[str, object]:
    return SpigotError(
        f"This stream was cancelled: no client followed it for {seconds:g} s.",
        code="stream_abandoned",
    ).to_body()


def _response(
    stream_id: str, follower: Follower, headers: dict[str, str] | None
) -> EventStreamResponse:
    return EventStreamResponse(
        _follow(stream_id, follower),
        headers={**(headers or {}), "x-stream-id": stream_id},
        on_close=follower.aclose,
    )


async def _follow(stream_id: str, follower: Follower) -> AsyncIterator[bytes]:
    try:
        async for seq, event in follower:
            yield with_event_id(event, stream_id, seq)
    except SpigotError as exc:
        # The log failed under us (Redis gone): say so in-band, like an engine error.
        yield data_event(exc.to_body())
    finally:
        await follower.aclose()


async def stream_response(
    detached: Detached | None,
    streamed: StreamedRequest,
    owner: str,
    headers: dict[str, str] | None,
) -> EventStreamResponse:
    """The response of a streamed request: sent as produced, or through the event log."""
    if detached is None:
        return EventStreamResponse(streamed.events(), headers=headers, on_close=streamed.close)
    return await detached.start(streamed, owner, headers)
