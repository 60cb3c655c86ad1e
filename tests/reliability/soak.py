"""Soak: 16 concurrent streams with random disconnects for minutes, watching for drift.

Every 2 seconds the server's RSS and open descriptors (/proc/<pid>/status and fd) and
the latency of /health are sampled. Pass: the medians of the last window are within
tolerance of the first window's (the windows are the first and last minute, or the
first and last quarter of a run shorter than four minutes):

    RSS          last <= first x 1.10 + 16 MB      (no leak beyond allocator noise)
    descriptors  last <= first + 8                 (no socket or file left behind)
    /health      last <= first x 2 + 50 ms         (no slow build-up on the event loop)

and nothing else goes wrong: no 5xx, no stream hangs, every request that got an id has
one ledger row, and the engine is idle at the end.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import Any

import httpx

from tests.reliability.harness import (
    Findings,
    Ledger,
    Profile,
    Result,
    Server,
    Workdir,
    chat_body,
    median,
    server,
    stream_chat,
)

SAMPLE_EVERY = 2.0
RSS_FACTOR, RSS_SLACK_MB = 1.10, 16.0
FD_SLACK = 8
LATENCY_FACTOR, LATENCY_SLACK_S = 2.0, 0.05
VANISH_SHARE = 0.3


async def worker(port: int, until: float, rng: random.Random, log: list[Any]) -> None:
    while time.monotonic() < until:
        body = {
            **chat_body(
                rng.choice(["Tell a story.", "List some animals.", "Explain rain.", "Hello!"]),
                max_tokens=rng.randint(8, 96),
                ignore_eos=rng.random() < 0.5,
            ),
            "stream": True,
        }
        vanish = rng.random() < VANISH_SHARE
        out = await stream_chat(
            port,
            body,
            timeout=120,
            stop_after_events=rng.randint(1, 12) if vanish else None,
            vanish=rng.choice(["reset", "close"]),
        )
        log.append((vanish, out))
        if out.status == 503:
            await asyncio.sleep(float(out.retry_after or 1))


async def sampler(srv: Server, until: float, samples: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.monotonic()
        while time.monotonic() < until:
            at = time.monotonic()
            try:
                reply = await client.get(f"{srv.url}/health")
                latency = time.monotonic() - at
                ok = reply.status_code == 200
            except httpx.HTTPError:
                latency, ok = 10.0, False
            samples.append(
                {
                    "t": round(at - started, 1),
                    "rss_mb": round(srv.rss_mb(), 1),
                    "fds": srv.fds(),
                    "health_s": round(latency, 4),
                    "ok": ok,
                }
            )
            await asyncio.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - at)))


def windows(samples: list[dict[str, Any]], seconds: float) -> tuple[list, list]:
    span = min(60.0, seconds / 4)
    end = samples[-1]["t"] if samples else 0
    return (
        [s for s in samples if s["t"] <= span],
        [s for s in samples if s["t"] >= end - span],
    )


def check_soak(work: Workdir, profile: Profile, seconds: int | None = None) -> Result:
    found = Findings("soak")
    duration = seconds or profile.soak_seconds
    streams = profile.soak_streams
    db = work.db("soak")
    with server(
        "--parallel",
        "8",
        "--max-queue",
        "32",
        "--ctx-size",
        "4096",
        "--prices",
        str(work.prices),
        db=db,
    ) as srv:
        samples: list[dict[str, Any]] = []
        outcomes: list[Any] = []

        async def run() -> None:
            until = time.monotonic() + duration
            rng = random.Random(13)
            tasks = [
                worker(srv.port, until, random.Random(rng.random()), outcomes)
                for _ in range(streams)
            ]
            await asyncio.gather(sampler(srv, until, samples), *tasks)

        asyncio.run(run())
        cut = [o for vanished, o in outcomes if not vanished and o.status == 200 and not o.done]
        outcomes = [o for _, o in outcomes]
        found.expect(
            not cut, f"{len(cut)} stream(s) ended without [DONE] though their client stayed"
        )
        first, last = windows(samples, duration)

        def med(window: list, key: str) -> float:
            return median([float(s[key]) for s in window])

        rss = (med(first, "rss_mb"), med(last, "rss_mb"))
        fds = (med(first, "fds"), med(last, "fds"))
        health = (med(first, "health_s"), med(last, "health_s"))
        endings = collections.Counter(o.ended for o in outcomes)
        statuses = collections.Counter(o.status for o in outcomes)
        found.numbers.update(
            seconds=duration,
            streams=streams,
            requests=len(outcomes),
            statuses=dict(statuses),
            endings=dict(endings),
            window_s=round(min(60.0, duration / 4)),
            rss_mb_first_last=rss,
            fds_first_last=fds,
            health_s_first_last=health,
            health_worst_s=max((s["health_s"] for s in samples), default=0),
            samples=samples,
        )
        found.expect(
            rss[1] <= rss[0] * RSS_FACTOR + RSS_SLACK_MB,
            f"RSS grew from {rss[0]:.0f} to {rss[1]:.0f} MB",
        )
        found.expect(
            fds[1] <= fds[0] + FD_SLACK, f"descriptors grew from {fds[0]:.0f} to {fds[1]:.0f}"
        )
        found.expect(
            health[1] <= health[0] * LATENCY_FACTOR + LATENCY_SLACK_S,
            f"/health median latency grew from {health[0] * 1000:.0f} to {health[1] * 1000:.0f} ms",
        )
        found.expect(all(s["ok"] for s in samples), "/health failed during the soak")
        fives = sum(n for status, n in statuses.items() if status >= 500 and status != 503)
        found.expect(fives == 0, f"{fives} 5xx answers (other than 503)")
        hung = endings.get("timeout", 0) + endings.get("open", 0)
        found.expect(hung == 0, f"{hung} stream(s) hung")
        found.expect(statuses.get(200, 0) > 0, "nothing was served")
        stats = srv.wait_idle(30)
        found.expect(
            stats.get("running") == 0 and stats.get("in_flight") == 0,
            f"engine not idle after the soak: {stats}",
        )
        ids = [o.request_id for o in outcomes if o.status == 200 and o.request_id]
        rows = Ledger(db).wait_rows(ids, timeout=20)
        found.numbers["ledger_rows"] = len(rows)
        found.expect(
            len(rows) == len(ids), f"{len(ids) - len(rows)} request(s) without a ledger row"
        )
        tracebacks = srv.tracebacks()
        found.expect(not tracebacks, f"server logged errors: {tracebacks[:3]}")
    vanished = endings.get("reset", 0) + endings.get("closed", 0)
    return found.result(
        f"{duration} s at {streams} streams: {len(outcomes)} requests ({vanished} vanished, "
        f"{statuses.get(503, 0)} got 503); RSS {rss[0]:.0f} -> {rss[1]:.0f} MB, fds "
        f"{fds[0]:.0f} -> {fds[1]:.0f}, /health {health[0] * 1000:.1f} -> "
        f"{health[1] * 1000:.1f} ms (first vs last {found.numbers['window_s']} s medians)"
    )
