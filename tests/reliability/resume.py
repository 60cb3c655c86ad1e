"""Resuming a stream across reconnects (``--on-disconnect detach=SECONDS``).

Every streamed event carries ``id: <stream>:<seq>``. A client reads a few events and
vanishes (TCP reset); the generation goes on; the client reconnects with
``Last-Event-ID`` (on the same POST; ``GET /v1/streams/{id}`` as the fallback), reads a
few more, vanishes again, and reconnects once more to the end. What it read, put
together, must be exactly the uninterrupted answer (greedy decoding, no prefix cache,
so the same request gives the same text), every event exactly once and in order, and
the request must be billed once. Another key cannot resume the stream.

In the full form the same runs across two replicas sharing Redis and PostgreSQL: the
client reconnects to the other replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from tests.reliability.harness import (
    Findings,
    Ledger,
    Profile,
    Result,
    Server,
    StreamOutcome,
    Workdir,
    chat_body,
    create_key,
    serve_options,
    stream_chat,
)
from tests.reliability.shutdown import database

REDIS = "redis://127.0.0.1:6379/15"
TOKENS = 80


def body() -> dict[str, Any]:
    return {
        **chat_body("Describe a walk through a forest.", max_tokens=TOKENS, ignore_eos=True),
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def seq_of(event_id: str) -> int:
    return int(event_id.rpartition(":")[2])


async def resume(port: int, headers: dict[str, str], last_id: str, **kw: Any) -> StreamOutcome:
    """Reconnect: the same POST with Last-Event-ID; if refused, GET /v1/streams/{id}."""
    with_id = {**headers, "last-event-id": last_id}
    out = await stream_chat(port, body(), with_id, **kw)
    if out.status == 200:
        return out
    stream_id = last_id.rpartition(":")[0]
    return await stream_chat(
        port, body(), with_id, method="GET", path=f"/v1/streams/{stream_id}", **kw
    )


def check_resume(work: Workdir, profile: Profile, backend: str = "memory") -> Result:
    name = "resume" if backend == "memory" else "resume-replicas"
    found = Findings(name)
    if "--on-disconnect" not in serve_options():
        found.expect(False, "this server has no --on-disconnect (resumable streams not built)")
        return found.result("resumable streams are not available")
    with contextlib.ExitStack() as stack:
        if backend == "memory":
            db = work.db(name)
            extra: tuple[str, ...] = ()
        else:
            db = stack.enter_context(database(work, "postgres", name))
            # A Redis database of its own, emptied first: other runs' streams are not ours.
            import redis

            client = redis.Redis.from_url(REDIS)
            client.flushdb()
            stack.callback(client.flushdb)
            extra = ("--redis", REDIS)
        secret = create_key(db, "owner")
        other = create_key(db, "stranger")
        headers = {"authorization": f"Bearer {secret}"}
        args = (
            "--parallel",
            "2",
            "--ctx-size",
            "2048",
            "--no-prefix-cache",
            "--on-disconnect",
            "detach=30",
            *extra,
        )
        first = Server.start(*args, db=db)
        stack.callback(first.stop)
        second = first
        if backend != "memory":
            second = Server.start(*args, db=db)
            stack.callback(second.stop)
        ledger = Ledger(db)

        reference = asyncio.run(stream_chat(first.port, body(), headers, timeout=120))
        found.expect(reference.done, f"the uninterrupted stream failed: {reference.ended}")
        found.expect(
            len(reference.ids) == reference.events,
            f"{reference.events - len(reference.ids)} of {reference.events} events have no id:",
        )
        rows_before = len(ledger.rows())

        async def interrupted() -> tuple[list[StreamOutcome], str]:
            parts = [
                await stream_chat(first.port, body(), headers, stop_after_events=8, vanish="reset")
            ]
            if not parts[0].ids:
                return parts, "no event ids"
            await asyncio.sleep(0.5)
            parts.append(
                await resume(
                    second.port, headers, parts[-1].ids[-1], stop_after_events=8, vanish="reset"
                )
            )
            if not parts[-1].ids:
                return parts, f"the first reconnect got {parts[-1].status} {parts[-1].error}"
            await asyncio.sleep(1.0)
            parts.append(await resume(first.port, headers, parts[-1].ids[-1], timeout=120))
            return parts, ""

        parts, problem = asyncio.run(interrupted())
        found.expect(not problem, problem or "")
        ids = [i for part in parts for i in part.ids]
        seqs = [seq_of(i) for i in ids]
        text = "".join(part.text for part in parts)
        found.numbers.update(
            connections=len(parts),
            events=len(ids),
            reference_events=len(reference.ids),
            statuses=[p.status for p in parts],
        )
        if not problem:
            found.expect(
                parts[-1].done, f"the last reconnect did not reach [DONE]: {parts[-1].ended}"
            )
            found.expect(len(set(ids)) == len(ids), "an event arrived twice")
            found.expect(seqs == sorted(seqs), "events arrived out of order")
            found.expect(
                seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else False,
                "events are missing between reconnects",
            )
            found.expect(
                text == reference.text,
                f"the resumed text differs from the uninterrupted one "
                f"({len(text)} vs {len(reference.text)} chars)",
            )
            stranger = asyncio.run(
                resume(second.port, {"authorization": f"Bearer {other}"}, ids[0], timeout=30)
            )
            found.expect(
                stranger.status == 404, f"another key resuming the stream got {stranger.status}"
            )
            deadline = time.monotonic() + 10
            while len(ledger.rows()) <= rows_before and time.monotonic() < deadline:
                time.sleep(0.2)
            added = ledger.rows()[rows_before:]
            found.numbers["ledger_rows_added"] = len(added)
            found.expect(len(added) == 1, f"one resumed stream wrote {len(added)} ledger rows")
            if added:
                found.expect(
                    added[0]["completion_tokens"] == TOKENS,
                    f"billed {added[0]['completion_tokens']} completion tokens, not {TOKENS}",
                )
    where = "one server" if backend == "memory" else "two replicas (Redis, PostgreSQL)"
    return found.result(
        f"{len(parts)} connections on {where}: {len(ids)} events vs {len(reference.ids)} "
        f"uninterrupted, text {'identical' if text == reference.text else 'different'}"
    )
