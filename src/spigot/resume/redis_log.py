"""The event log shared by replicas: one Redis Stream per stream, so a resume may land anywhere.

Keys (the ``{id}`` hash tag keeps one stream's keys in one Redis Cluster slot):

    {prefix}stream:{<id>}            Stream; entry id ``0-<seq+1>``, field ``e`` = the event;
                                     after finish one more entry with field ``end``
    {prefix}stream:{<id>}:meta       hash: owner, next (seq), done, ttl (ms), left (ms)
    {prefix}stream:{<id>}:followers  sorted set: follower -> lease deadline (ms, Redis clock)

Each write is one Lua script, so a reader never sees an event without its seq
or a finish without its end entry, and every time comes from Redis's own clock
(replicas' clocks may disagree). Explicit entry ids make the seq the cursor:
``XREAD BLOCK`` from ``0-<after+1>`` returns exactly the events after ``after``,
replayed or live alike. The producer's writes refresh every key's TTL; follower
heartbeats touch only their lease, so a reader cannot keep a dead producer's
stream alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from spigot.resume.ids import new_stream_id
from spigot.resume.log import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_EVENTS,
    LEASE_HEARTBEATS,
    EventLogUnavailable,
    EventsDropped,
    InvalidLastEventId,
    StreamLost,
    StreamNotFound,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_BATCH = 512  # events per XREAD
SOCKET_TIMEOUT = 10.0  # above any XREAD BLOCK, so only a hung server trips it

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: meta; ARGV: owner, ttl_ms
_OPEN = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'next', 0, 'done', 0, 'ttl', ARGV[2],
           'left', now_ms())
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: meta, events, followers; ARGV: event, max_events. -1 gone, -2 finished, else seq.
_APPEND = """
local m = redis.call('HMGET', KEYS[1], 'next', 'done', 'ttl')
if not m[1] then return -1 end
if m[2] == '1' then return -2 end
local seq = tonumber(m[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '0-' .. (seq + 1), 'e', ARGV[1])
redis.call('HSET', KEYS[1], 'next', seq + 1)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], m[3]) end
return seq
"""

# KEYS: meta, events, followers. The end entry is added without MAXLEN: it drops nothing.
_FINISH = """
local m = redis.call('HMGET', KEYS[1], 'next', 'done', 'ttl')
if not m[1] or m[2] == '1' then return 0 end
redis.call('XADD', KEYS[2], '0-' .. (tonumber(m[1]) + 1), 'end', '1')
redis.call('HSET', KEYS[1], 'done', 1)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], m[3]) end
return 1
"""

# KEYS: meta, events -> nil if gone, else {owner, next, first kept seq}
_INSPECT = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'next')
if not m[1] then return false end
local first = tonumber(m[2])
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '-(%d+)$')) - 1 end
return {m[1], tonumber(m[2]), first}
"""

# KEYS: meta, followers; ARGV: member, lease_ms. The lease never outlives the stream.
_HEARTBEAT = (
    _NOW
    + """
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
)

# KEYS: meta, followers; ARGV: member
_DETACH = (
    _NOW
    + """
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 1 then
  local left = redis.call('HGET', KEYS[1], 'left')
  local now = now_ms()
  if left and now > tonumber(left) then redis.call('HSET', KEYS[1], 'left', now) end
end
return removed
"""
)

# KEYS: meta, events, followers -> -1 gone, -2 attached, else ms since the last follower left.
# A lease that ran out counts as a follower that left at its deadline.
_DETACHED_FOR = (
    _NOW
    + """
local m = redis.call('HMGET', KEYS[1], 'left', 'ttl')
if not m[1] then return -1 end
local now = now_ms()
local left = tonumber(m[1])
local dead = redis.call('ZREVRANGEBYSCORE', KEYS[3], now, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #dead > 0 then
  local at = tonumber(dead[2])
  if at > left then
    left = at
    redis.call('HSET', KEYS[1], 'left', at)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], m[2]) end
if redis.call('ZCARD', KEYS[3]) > 0 then return -2 end
return math.max(0, now - left)
"""
)


class _Keys:
    __slots__ = ("events", "followers", "meta")

    def __init__(self, prefix: str, stream_id: str) -> None:
        self.events = f"{prefix}stream:{{{stream_id}}}"
        self.meta = self.events + ":meta"
        self.followers = self.events + ":followers"

    @property
    def all(self) -> list[str]:
        return [self.meta, self.events, self.followers]


class RedisEventLog:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "spigot:",
        max_events: int = DEFAULT_MAX_EVENTS,
        heartbeat: float = DEFAULT_HEARTBEAT,
        poll: float = 1.0,
    ) -> None:
        """``heartbeat``: seconds between a follower's lease refreshes (the lease lasts
        LEASE_HEARTBEATS of them); ``poll``: how long a follower blocks before checking
        that its stream still exists. Connects lazily: ``ping()`` checks the URL."""
        if max_events < 1 or heartbeat <= 0 or poll <= 0:
            raise ValueError("max_events, heartbeat and poll must be positive")
        self.prefix = prefix
        self.max_events = max_events
        self.heartbeat = heartbeat
        self.poll = poll
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            protocol=2,  # the reply shapes parsed below
            socket_connect_timeout=SOCKET_TIMEOUT,
            socket_timeout=poll + SOCKET_TIMEOUT,  # above XREAD BLOCK: only a hung server
        )
        r = self._redis
        self._open = r.register_script(_OPEN)
        self._append = r.register_script(_APPEND)
        self._finish = r.register_script(_FINISH)
        self._inspect = r.register_script(_INSPECT)
        self._heartbeat = r.register_script(_HEARTBEAT)
        self._detach = r.register_script(_DETACH)
        self._detached_for = r.register_script(_DETACHED_FOR)
        self._followers: set[RedisFollower] = set()
        self._calls: set[asyncio.Future[Any]] = set()

    def keys(self, stream_id: str) -> _Keys:
        return _Keys(self.prefix, stream_id)

    async def _call(self, command: Awaitable[T]) -> T:
        """One Redis command, in a task of its own that the caller's cancellation does not reach.

        redis-py 8 can swallow a CancelledError that lands mid-command, and the
        cancelled task then runs on (a consumer whose client left would keep
        following). Shielded, the caller stops at once and the command finishes in
        the background (an XREAD within ``poll``), leaving its connection clean.
        """
        task = asyncio.ensure_future(command)
        self._calls.add(task)
        task.add_done_callback(self._call_done)
        try:
            return await asyncio.shield(task)
        except RedisError as exc:
            raise EventLogUnavailable() from exc

    def _call_done(self, task: asyncio.Future[Any]) -> None:
        self._calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that left has no use for it

    async def open(self, owner: str, ttl: float) -> str:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        stream_id = new_stream_id()
        created = await self._call(
            self._open(keys=[self.keys(stream_id).meta], args=[owner, _ms(ttl)])
        )
        if not created:  # 144 random bits: this would be a broken random source
            raise RuntimeError("stream id collision")
        return stream_id

    async def append(self, stream_id: str, event: bytes) -> int:
        keys = self.keys(stream_id).all
        seq = int(await self._call(self._append(keys=keys, args=[event, self.max_events])))
        if seq == -1:
            raise StreamLost()
        if seq == -2:
            raise RuntimeError("append to a finished stream")
        return seq

    async def finish(self, stream_id: str) -> None:
        await self._call(self._finish(keys=self.keys(stream_id).all))

    async def owner(self, stream_id: str) -> str | None:
        value = await self._call(self._redis.hget(self.keys(stream_id).meta, "owner"))
        return None if value is None else _text(value)

    async def follow(self, stream_id: str, *, owner: str, after: int = -1) -> RedisFollower:
        if after < -1:
            raise ValueError("after must be -1 (from the start) or a seq")
        keys = self.keys(stream_id)
        found = await self._call(self._inspect(keys=[keys.meta, keys.events]))
        if found is None or _text(found[0]) != owner:
            raise StreamNotFound()
        next_seq, first_seq = int(found[1]), int(found[2])
        if after >= next_seq:
            raise InvalidLastEventId()
        if after + 1 < first_seq:
            raise EventsDropped()
        follower = RedisFollower(self, keys, after)
        await follower.attach()
        return follower

    async def detached_for(self, stream_id: str) -> float:
        ms = int(await self._call(self._detached_for(keys=self.keys(stream_id).all)))
        if ms == -1:
            raise StreamLost()
        return 0.0 if ms == -2 else ms / 1000

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        for follower in list(self._followers):
            await follower.abandon()
        if self._calls:  # let commands whose callers left finish on a live connection
            await asyncio.wait(list(self._calls), timeout=self.poll + 1)
        await self._redis.aclose()


class RedisFollower:
    def __init__(self, log: RedisEventLog, keys: _Keys, after: int) -> None:
        self._log = log
        self._keys = keys
        self._read = after  # the last seq read from Redis (yielded or buffered)
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._ended = False  # the end entry was read
        self._failure: StreamLost | None = None  # raised once the buffer is empty
        self._closed = False
        self._member = secrets.token_urlsafe(12)
        self._beats: asyncio.Task[None] | None = None  # the heartbeat loop
        self._beating: asyncio.Future[Any] | None = None  # its last command

    async def attach(self) -> None:
        """Takes the first lease (visible to the producer at once), then keeps it fresh."""
        await self._beat()
        self._log._followers.add(self)
        self._beats = asyncio.create_task(self._keep_beating())

    def __aiter__(self) -> RedisFollower:
        return self

    async def __anext__(self) -> tuple[int, bytes]:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._failure is not None:
                raise self._failure
            if self._ended or self._closed:
                raise StopAsyncIteration
            try:
                await self._read_more()
            except EventLogUnavailable:
                if self._failure is not None:  # abandoned: the log closed under the read
                    raise self._failure from None
                raise

    async def _read_more(self) -> None:
        r = self._log._redis
        block = max(1, round(self._log.poll * 1000))
        cursor = f"0-{self._read + 1}"
        reply: Any = await self._log._call(
            r.xread({self._keys.events: cursor}, count=READ_BATCH, block=block)
        )
        if not reply:
            if not await self._log._call(r.exists(self._keys.meta)):
                self._failure = StreamLost()
            return
        for entry_id, fields in reply[0][1]:
            seq = int(entry_id.split(b"-")[1]) - 1
            if seq != self._read + 1:
                self._failure = StreamLost("Events this stream still needed were dropped.")
                return
            self._read = seq
            if b"end" in fields:
                self._ended = True
                return
            self._buffer.append((seq, fields[b"e"]))

    async def _beat(self) -> None:
        lease_ms = _ms(self._log.heartbeat * LEASE_HEARTBEATS)
        keys = [self._keys.meta, self._keys.followers]
        beat = asyncio.ensure_future(self._log._heartbeat(keys=keys, args=[self._member, lease_ms]))
        self._beating = beat
        await self._log._call(beat)

    async def _keep_beating(self) -> None:
        warned = False
        while not self._closed:
            await asyncio.sleep(self._log.heartbeat)
            try:
                await self._beat()
            except EventLogUnavailable:
                # The lease runs out unless a later beat gets through; reads report the outage.
                if not warned:
                    log.warning("could not refresh a stream follower's lease", exc_info=True)
                    warned = True

    async def _stop_beating(self) -> None:
        """Ends the heartbeats; returns once none is left in flight to renew the lease."""
        self._log._followers.discard(self)
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None
        if self._beating is not None and not self._beating.done():
            await asyncio.wait([self._beating])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        await self._stop_beating()
        keys = [self._keys.meta, self._keys.followers]
        with contextlib.suppress(EventLogUnavailable):  # then the lease runs out by itself
            await self._log._call(self._log._detach(keys=keys, args=[self._member]))

    async def abandon(self) -> None:
        """The log is closing: stop the lease and fail any further read."""
        self._closed = True
        await self._stop_beating()
        self._buffer.clear()
        self._failure = StreamLost("The server is closing the stream's event log.")

    async def __aenter__(self) -> RedisFollower:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
