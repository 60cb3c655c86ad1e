"""The event log of resumable streams, in memory and in a real Redis.

Every log test runs on both backends. Redis: the server named by SPIGOT_TEST_REDIS
(default redis://127.0.0.1:6379/0), each test under its own key prefix, deleted at the
end; the tests fail when that server cannot be reached
(SPIGOT_TEST_REDIS_OPTIONAL=1 skips them instead). "Another replica" is a second
RedisEventLog (its own connections) on the same Redis; in memory it is the same log.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from spigot.resume import (
    EventLog,
    EventLogUnavailable,
    EventsDropped,
    Follower,
    InvalidLastEventId,
    MemoryEventLog,
    StreamLost,
    StreamNotFound,
    event_id,
    new_stream_id,
    open_event_log,
    parse_last_event_id,
    with_event_id,
)
from spigot.resume.redis_log import RedisEventLog

REDIS_URL = os.environ.get("SPIGOT_TEST_REDIS", "redis://127.0.0.1:6379/0")
HEARTBEAT = 0.1  # Redis follower leases last 0.3 s
POLL = 0.2
OWNER = "key:1"


def event(i: int) -> bytes:
    return b'data: {"i":%d}\n\n' % i


class Logs:
    """Makes logs of one backend; ``replica()`` is another server on the same storage."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.prefix = f"spigot-test-{secrets.token_hex(6)}:"
        self.made: list[Any] = []

    def make(self, **options: Any) -> Any:
        if self.backend == "memory":
            options.pop("poll", None)
            log: Any = MemoryEventLog(**options)
        else:
            log = RedisEventLog(
                REDIS_URL, prefix=self.prefix, **{"heartbeat": HEARTBEAT, "poll": POLL, **options}
            )
        self.made.append(log)
        return log

    def replica(self, log: Any) -> Any:
        return log if self.backend == "memory" else self.make(max_events=log.max_events)

    async def redis_keys(self) -> list[bytes]:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            return [k async for k in r.scan_iter(match=self.prefix + "*")]

    async def close(self) -> None:
        for log in self.made:
            await log.close()
        if self.backend == "redis":
            async with aioredis.Redis.from_url(REDIS_URL) as r:
                keys = [k async for k in r.scan_iter(match=self.prefix + "*")]
                if keys:
                    await r.delete(*keys)


async def redis_reachable() -> bool:
    try:
        async with aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as r:
            await r.ping()
        return True
    except (OSError, aioredis.RedisError):
        return False


async def logs_of(backend: str) -> AsyncIterator[Logs]:
    if backend == "redis" and not await redis_reachable():
        if os.environ.get("SPIGOT_TEST_REDIS_OPTIONAL") == "1":
            pytest.skip(f"no Redis at {REDIS_URL}")
        pytest.fail(f"no Redis at {REDIS_URL} (SPIGOT_TEST_REDIS_OPTIONAL=1 skips)")
    made = Logs(backend)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture(params=["memory", "redis"])
async def logs(request: pytest.FixtureRequest) -> AsyncIterator[Logs]:
    async for made in logs_of(request.param):
        yield made


@pytest.fixture
async def redis_logs() -> AsyncIterator[Logs]:
    async for made in logs_of("redis"):
        yield made


@pytest.fixture
async def log(logs: Logs) -> EventLog:
    return logs.make()


async def collect(follower: Follower, within: float = 5.0) -> list[tuple[int, bytes]]:
    async with asyncio.timeout(within), follower:
        return [item async for item in follower]


async def written(log: EventLog, count: int, owner: str = OWNER, ttl: float = 30) -> str:
    stream_id = await log.open(owner, ttl)
    for i in range(count):
        assert await log.append(stream_id, event(i)) == i
    return stream_id


async def attached(log: EventLog, stream_id: str) -> bool:
    return await log.detached_for(stream_id) == 0.0


def expected(start: int, stop: int) -> list[tuple[int, bytes]]:
    return [(i, event(i)) for i in range(start, stop)]


# -- ids -----------------------------------------------------------------------------------


def test_stream_ids_are_long_random_and_url_safe() -> None:
    ids = {new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 24 and i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_an_event_id_round_trips_through_last_event_id() -> None:
    sid = new_stream_id()
    assert with_event_id(b"data: {}\n\n", sid, 7) == f"id: {sid}:7\n".encode() + b"data: {}\n\n"
    assert parse_last_event_id(event_id(sid, 7)) == (sid, 7)
    assert parse_last_event_id(f" {sid}:0\t") == (sid, 0)


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":",
        "abc:1",  # too short to be ours
        "A" * 24,  # no seq
        "A" * 24 + ":",
        "A" * 24 + ":-1",
        "A" * 24 + ":+1",
        "A" * 24 + ":01",
        "A" * 24 + ":1.5",
        "A" * 24 + ": 1",
        "A" * 24 + ":1:2",
        "A" * 24 + ":1\n",
        "A" * 24 + ":" + "9" * 11,
        "A" * 24 + ":١",  # a non-ASCII digit
        "A" * 65 + ":1",
        "A" * 23 + "/:1",
        "A" * 23 + "{:1",
        "A" * 23 + " :1",
        "../../../../etc/passwd:1",
    ],
)
def test_garbage_last_event_ids_are_refused(value: str) -> None:
    assert parse_last_event_id(value) is None


def test_open_event_log_picks_the_backend() -> None:
    assert isinstance(open_event_log(None), MemoryEventLog)
    assert isinstance(open_event_log(REDIS_URL), RedisEventLog)


# -- order, replay and live ----------------------------------------------------------------


async def test_a_follower_gets_every_event_in_order_then_ends_at_finish(log: EventLog) -> None:
    stream_id = await written(log, 50)
    follower = await log.follow(stream_id, owner=OWNER)
    task = asyncio.create_task(collect(follower))
    for i in range(50, 60):
        await log.append(stream_id, event(i))
    await log.finish(stream_id)
    assert await task == expected(0, 60)


async def test_replay_joins_live_without_gap_or_duplicate(logs: Logs) -> None:
    """Followers join (here and on another replica) while 1000 events are appended, from the
    start and from the last event seen; one drops out midway and resumes from its last seq."""
    log = logs.make()
    other = logs.replica(log)
    total = 1000
    stream_id = await log.open(OWNER, 30)
    tasks: dict[str, asyncio.Task[list[tuple[int, bytes]]]] = {}
    starts: dict[str, int] = {}
    resumed: list[tuple[int, bytes]] = []

    async def drop_out_and_resume() -> list[tuple[int, bytes]]:
        first = await other.follow(stream_id, owner=OWNER, after=-1)
        async with first:
            async for seq, data in first:
                resumed.append((seq, data))
                if seq == 600:
                    break
        again = await log.follow(stream_id, owner=OWNER, after=resumed[-1][0])
        return resumed + await collect(again)

    for i in range(total):
        await log.append(stream_id, event(i))
        if i in (0, 333, 777):
            for name, replica, after in (("here", log, -1), ("there", other, i)):
                follower = await replica.follow(stream_id, owner=OWNER, after=after)
                tasks[f"{name}-{i}"] = asyncio.create_task(collect(follower, 20))
                starts[f"{name}-{i}"] = after + 1
        if i == 100:
            tasks["resumed"] = asyncio.create_task(drop_out_and_resume())
            starts["resumed"] = 0
        await asyncio.sleep(0)
    await log.finish(stream_id)
    for name, task in tasks.items():
        assert await task == expected(starts[name], total), name


async def test_resuming_after_a_seq_replays_only_later_events(log: EventLog) -> None:
    stream_id = await written(log, 10)
    await log.finish(stream_id)
    assert await collect(await log.follow(stream_id, owner=OWNER, after=6)) == expected(7, 10)
    assert await collect(await log.follow(stream_id, owner=OWNER, after=9)) == []


async def test_finish_wakes_a_waiting_follower_at_once(logs: Logs) -> None:
    log = logs.make(poll=5.0)
    stream_id = await written(log, 1)
    follower = await log.follow(stream_id, owner=OWNER, after=0)
    task = asyncio.create_task(collect(follower))
    await asyncio.sleep(0.05)
    assert not task.done()
    started = time.monotonic()
    await log.finish(stream_id)
    assert await task == []
    assert time.monotonic() - started < 2.5  # the end entry wakes it, not a poll


async def test_finish_is_idempotent_and_ends_appends(log: EventLog) -> None:
    stream_id = await written(log, 2)
    await log.finish(stream_id)
    await log.finish(stream_id)
    with pytest.raises(RuntimeError):
        await log.append(stream_id, event(2))
    assert await collect(await log.follow(stream_id, owner=OWNER)) == expected(0, 2)


async def test_a_seq_not_yet_sent_is_an_invalid_last_event_id(log: EventLog) -> None:
    stream_id = await log.open(OWNER, 30)
    with pytest.raises(InvalidLastEventId) as refused:
        await log.follow(stream_id, owner=OWNER, after=0)
    assert refused.value.status == 400
    await log.append(stream_id, event(0))
    with pytest.raises(InvalidLastEventId):
        await log.follow(stream_id, owner=OWNER, after=1)
    assert await log.follow(stream_id, owner=OWNER, after=0) is not None


# -- owners and lifetimes ------------------------------------------------------------------


async def test_another_owners_stream_looks_unknown(log: EventLog) -> None:
    stream_id = await written(log, 3)
    assert await log.owner(stream_id) == OWNER
    assert await log.owner(new_stream_id()) is None
    with pytest.raises(StreamNotFound) as unknown:
        await log.follow(new_stream_id(), owner=OWNER)
    with pytest.raises(StreamNotFound) as foreign:
        await log.follow(stream_id, owner="key:2")
    assert type(foreign.value) is type(unknown.value) is StreamNotFound
    assert foreign.value.to_body() == unknown.value.to_body()
    assert foreign.value.status == 404
    # Even for a seq that would be invalid for the owner.
    with pytest.raises(StreamNotFound):
        await log.follow(stream_id, owner="anonymous", after=99)


async def test_a_finished_stream_is_kept_for_its_ttl(logs: Logs) -> None:
    log = logs.make()
    stream_id = await written(log, 3, ttl=0.4)
    await log.finish(stream_id)
    await asyncio.sleep(0.2)
    assert await collect(await log.follow(stream_id, owner=OWNER)) == expected(0, 3)
    await asyncio.sleep(0.4)
    assert await log.owner(stream_id) is None
    with pytest.raises(StreamNotFound):
        await log.follow(stream_id, owner=OWNER)
    if logs.backend == "redis":
        assert await logs.redis_keys() == []  # nothing left behind


async def test_the_producer_keeps_a_stream_alive_and_its_silence_ends_it(log: EventLog) -> None:
    stream_id = await written(log, 1, ttl=0.3)
    follower = await log.follow(stream_id, owner=OWNER, after=0)
    task = asyncio.create_task(collect(follower))
    for i in range(1, 6):  # 0.5 s of appends and polls, each within the ttl
        await asyncio.sleep(0.1)
        await log.append(stream_id, event(i)) if i % 2 else await log.detached_for(stream_id)
    assert not task.done()
    # The producer goes silent (its replica died): the log expires and ends the follower.
    with pytest.raises(StreamLost):
        await task
    with pytest.raises(StreamLost):
        await log.append(stream_id, event(6))
    with pytest.raises(StreamLost):
        await log.detached_for(stream_id)
    await log.finish(stream_id)  # a no-op on a stream that is gone


async def test_the_cap_drops_the_oldest_events_and_never_leaves_a_gap(logs: Logs) -> None:
    log = logs.make(max_events=5)
    stream_id = await written(log, 1)
    slow = await log.follow(stream_id, owner=OWNER)
    assert await anext(slow) == (0, event(0))
    for i in range(1, 20):
        await log.append(stream_id, event(i))
    with pytest.raises(StreamLost):  # it still needed events 1 to 14
        await anext(slow)
    await slow.aclose()
    with pytest.raises(EventsDropped) as dropped:
        await log.follow(stream_id, owner=OWNER, after=13)
    assert dropped.value.status == 404
    await log.finish(stream_id)
    assert await collect(await log.follow(stream_id, owner=OWNER, after=14)) == expected(15, 20)


# -- attached followers --------------------------------------------------------------------


async def test_detached_for_counts_from_the_last_follower_leaving(logs: Logs) -> None:
    log = logs.make()
    other = logs.replica(log)
    stream_id = await written(log, 1)
    await asyncio.sleep(0.2)
    assert await log.detached_for(stream_id) >= 0.15  # nobody came since open
    first = await log.follow(stream_id, owner=OWNER)
    second = await other.follow(stream_id, owner=OWNER)
    assert await attached(log, stream_id)
    await asyncio.sleep(0.5)  # longer than a lease: heartbeats keep them attached
    assert await attached(log, stream_id)
    await first.aclose()
    await first.aclose()
    assert await attached(log, stream_id)
    await second.aclose()
    await asyncio.sleep(0.05)
    assert 0.04 <= await log.detached_for(stream_id) < 0.2  # at once, not after a lease
    await asyncio.sleep(0.2)
    assert 0.2 <= await log.detached_for(stream_id) < 1


async def test_a_consumer_cancelled_at_any_moment_stops_at_once_and_detaches(
    logs: Logs,
) -> None:
    """What the response does when its client leaves: cancel the task reading the follower,
    here at random moments (mid-read, mid-heartbeat) while events stream in. redis-py 8
    can swallow a cancellation that lands mid-command; the log must not."""
    log = logs.make()
    other = logs.replica(log)
    stream_id = await written(log, 1)
    rng = random.Random(13)

    async def produce() -> None:
        for i in range(1, 100_000):
            await log.append(stream_id, event(i))
            await asyncio.sleep(0.001)

    producer = asyncio.create_task(produce())
    for attempt in range(30):
        reader = asyncio.create_task(collect(await other.follow(stream_id, owner=OWNER)))
        await asyncio.sleep(rng.random() * (0.12 if attempt % 5 == 0 else 0.005))
        reader.cancel()
        done, _ = await asyncio.wait([reader], timeout=1)
        assert done and reader.cancelled(), attempt
        await asyncio.sleep(0.01)
        assert 0.005 <= await log.detached_for(stream_id) < 0.2, attempt  # detached on leaving
    producer.cancel()
    await asyncio.wait([producer])
    # The replica's connections are still in order: a new follower gets everything.
    sent = await log.append(stream_id, event(-1))
    await log.finish(stream_id)
    got = await collect(await other.follow(stream_id, owner=OWNER))
    assert [seq for seq, _ in got] == list(range(sent + 1))
    assert got[-1] == (sent, event(-1))


async def test_a_follower_on_a_dead_replica_stops_counting_after_its_lease(
    redis_logs: Logs,
) -> None:
    log = redis_logs.make()
    other = redis_logs.replica(log)
    stream_id = await written(log, 1)
    follower = await other.follow(stream_id, owner=OWNER)
    assert await attached(log, stream_id)
    follower._beats.cancel()  # its server dies: no heartbeat, no detach
    await asyncio.sleep(0.1)
    assert await attached(log, stream_id)  # its 0.3 s lease still holds
    await asyncio.sleep(0.4)
    assert 0 < await log.detached_for(stream_id) < 1


async def test_closing_the_log_ends_its_followers(log: EventLog) -> None:
    stream_id = await written(log, 1)
    follower = await log.follow(stream_id, owner=OWNER)
    task = asyncio.create_task(collect(follower))
    await asyncio.sleep(0.05)
    await log.close()
    with pytest.raises(StreamLost):
        await task


# -- backend specifics ---------------------------------------------------------------------


async def test_memory_keeps_a_bounded_number_of_finished_streams() -> None:
    log = MemoryEventLog(max_finished=2)
    live = await written(log, 1)
    finished = [await written(log, 1) for _ in range(3)]
    for stream_id in finished:
        await log.finish(stream_id)
    assert [await log.owner(s) for s in finished] == [None, OWNER, OWNER]
    assert await log.owner(live) == OWNER  # live streams are never evicted
    assert len(log) == 3


async def test_memory_sweeps_expired_streams_it_is_never_asked_about() -> None:
    log = MemoryEventLog()
    for _ in range(50):
        await written(log, 3, ttl=0.05)
    await asyncio.sleep(0.1)
    await log.open(OWNER, 30)
    assert len(log) == 1


async def test_redis_keys_carry_the_ttl(redis_logs: Logs) -> None:
    log = redis_logs.make()
    stream_id = await written(log, 2, ttl=60)
    follower = await log.follow(stream_id, owner=OWNER)
    keys = log.keys(stream_id)
    async with aioredis.Redis.from_url(REDIS_URL) as r:
        ttls = [await r.pttl(k) for k in keys.all]
        assert await r.hget(keys.meta, "owner") == OWNER.encode()
    assert all(50_000 < t <= 60_000 for t in ttls), ttls
    await follower.aclose()


async def test_an_unreachable_redis_is_event_log_unavailable() -> None:
    log = RedisEventLog("redis://127.0.0.1:1/0")
    try:
        for call in (log.ping(), log.open(OWNER, 30), log.owner(new_stream_id())):
            with pytest.raises(EventLogUnavailable) as down:
                await call
        assert down.value.status == 503
    finally:
        await log.close()
