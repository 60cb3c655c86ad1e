"""Resumable streams: an event log a detached producer writes and reconnecting clients follow.

``open_event_log(None)`` is the memory log of one server; with a Redis URL the
log is shared by every replica using that Redis. See ``spigot.resume.log`` for
the semantics both implement.
"""

from __future__ import annotations

from spigot.resume.ids import (
    event_id,
    is_stream_id,
    new_stream_id,
    parse_last_event_id,
    with_event_id,
)
from spigot.resume.log import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_FINISHED,
    EventLog,
    EventLogUnavailable,
    EventsDropped,
    Follower,
    InvalidLastEventId,
    StreamLost,
    StreamNotFound,
)
from spigot.resume.memory import MemoryEventLog

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_FINISHED",
    "EventLog",
    "EventLogUnavailable",
    "EventsDropped",
    "Follower",
    "InvalidLastEventId",
    "MemoryEventLog",
    "StreamLost",
    "StreamNotFound",
    "event_id",
    "is_stream_id",
    "new_stream_id",
    "open_event_log",
    "parse_last_event_id",
    "with_event_id",
]


def open_event_log(
    redis_url: str | None = None, *, max_events: int = DEFAULT_MAX_EVENTS
) -> EventLog:
    """The memory log, or the Redis log at ``redis_url`` (imported only then)."""
    if redis_url is None:
        return MemoryEventLog(max_events=max_events)
    from spigot.resume.redis_log import RedisEventLog

    return RedisEventLog(redis_url, max_events=max_events)
