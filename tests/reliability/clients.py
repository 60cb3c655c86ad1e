"""Slow and vanishing clients.

Each round runs, side by side: a slow reader (a tiny receive window, a pause per event),
a normal stream beside it, clients that vanish mid-stream with a TCP reset or a FIN, one
that resets during prefill, a non-streamed request whose client resets, a client that
half-closes after sending (it must still get its whole answer), and one that vanishes
halfway through its body. Afterwards the engine is idle (nothing left generating for
a client that is gone), every request that reached the engine has one ledger row with
the right status, and the log has no tracebacks or ERROR lines for any of it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tests.reliability.harness import (
    Conn,
    Findings,
    HealthProbe,
    Ledger,
    Profile,
    Result,
    StreamOutcome,
    Workdir,
    chat_body,
    request_bytes,
    server,
    stream_chat,
)

LONG = chat_body("Tell me everything about the sea.", max_tokens=400, ignore_eos=True)
LONG_STREAM = {**LONG, "stream": True}


async def reset_during_prefill(port: int) -> StreamOutcome:
    """A long prompt; the client resets as soon as the response has started."""
    body = {**chat_body("word " * 1500, max_tokens=50), "stream": True}
    out = StreamOutcome()
    conn = await Conn.open(port)
    await conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), port=port)
    await conn.read_head()
    out.status, out.request_id = conn.status, conn.headers.get("x-request-id")
    conn.reset()
    out.ended = "reset"
    return out


async def reset_non_streamed(port: int) -> StreamOutcome:
    out = StreamOutcome()
    conn = await Conn.open(port)
    await conn.request("POST", "/v1/chat/completions", json.dumps(LONG).encode(), port=port)
    await asyncio.sleep(1.5)
    conn.reset()
    out.ended = "reset"
    return out


async def half_close(port: int, stream: bool) -> StreamOutcome:
    """Sends the request, shuts down its sending side, then reads the whole answer."""
    body = chat_body("Say hello.", max_tokens=8, stream=stream)
    out = StreamOutcome()
    conn = await Conn.open(port)
    try:
        async with asyncio.timeout(60):
            await conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), port=port)
            conn.half_close()
            await conn.read_head()
            out.status, out.request_id = conn.status, conn.headers.get("x-request-id")
            if stream:
                async for event in conn.events():
                    out.events += 1
                    if event.done:
                        out.done = True
            else:
                answer = json.loads(await conn.body())
                out.done = bool(answer.get("choices"))
            out.ended = "done" if out.done else "closed"
    except TimeoutError:
        out.ended = "timeout"
    except Exception as exc:  # no answer at all is what this case is about
        out.ended = f"closed ({type(exc).__name__})"
    finally:
        conn.writer.transport.abort()
    return out


async def vanish_mid_body(port: int) -> StreamOutcome:
    body = json.dumps(chat_body("x" * 100_000, max_tokens=4)).encode()
    conn = await Conn.open(port)
    await conn.send(
        request_bytes("POST", "/v1/chat/completions", body, port=port)[: len(body) // 2]
    )
    await asyncio.sleep(0.3)
    conn.reset()
    return StreamOutcome(ended="reset")


async def one_round(port: int) -> dict[str, StreamOutcome]:
    normal_body = chat_body("Count to twenty.", max_tokens=48, ignore_eos=True, stream=True)
    slow_body = chat_body("Count to forty.", max_tokens=48, ignore_eos=True, stream=True)
    jobs: dict[str, Any] = {
        "slow_reader": stream_chat(port, slow_body, read_delay=0.15, rcvbuf=2048, timeout=120),
        "normal_beside_slow": stream_chat(port, normal_body, timeout=120),
        "reset_mid_stream": stream_chat(port, LONG_STREAM, stop_after_events=4, vanish="reset"),
        "fin_mid_stream": stream_chat(port, LONG_STREAM, stop_after_events=4, vanish="close"),
        "reset_in_prefill": reset_during_prefill(port),
        "reset_non_streamed": reset_non_streamed(port),
        "half_close_stream": half_close(port, stream=True),
        "half_close_json": half_close(port, stream=False),
        "vanish_mid_body": vanish_mid_body(port),
    }
    results = await asyncio.gather(*jobs.values())
    return dict(zip(jobs, results, strict=True))


# What each case's ledger row must say (None: it must have none; "any": one, any status).
EXPECTED_STATUS = {
    "slow_reader": "ok",
    "normal_beside_slow": "ok",
    "reset_mid_stream": "disconnected",
    "fin_mid_stream": "disconnected",
    "reset_in_prefill": "disconnected",
    "half_close_stream": "ok",
    "half_close_json": "ok",
}


def check_clients(work: Workdir, profile: Profile, stall: float) -> Result:
    found = Findings("clients")
    db = work.db("clients")
    ledger = Ledger(db)
    rounds: list[dict[str, Any]] = []
    with (
        server("--parallel", "4", "--max-queue", "16", "--ctx-size", "4096", db=db) as srv,
        HealthProbe(srv.url) as probe,
    ):
        for round_no in range(profile.client_rounds):
            before = len(ledger.rows())
            started = time.monotonic()
            outcomes = asyncio.run(one_round(srv.port))
            idle_started = time.monotonic()
            stats = srv.wait_idle(15)
            idle_after = time.monotonic() - idle_started
            found.expect(
                stats.get("running") == 0
                and stats.get("waiting") == 0
                and stats.get("in_flight") == 0,
                f"round {round_no}: engine still busy 15 s after the clients left: {stats}",
            )
            summary = {
                name: {"status": o.status, "ended": o.ended, "events": o.events}
                for name, o in outcomes.items()
            }
            rounds.append(
                {
                    "round": round_no,
                    "seconds": round(idle_started - started, 1),
                    "idle_after_s": round(idle_after, 2),
                    "clients": summary,
                }
            )
            for name in (
                "slow_reader",
                "normal_beside_slow",
                "half_close_stream",
                "half_close_json",
            ):
                outcome = outcomes[name]
                found.expect(
                    outcome.done,
                    f"round {round_no}: {name} got no complete answer ({outcome.ended})",
                )
            slow, normal = outcomes["slow_reader"], outcomes["normal_beside_slow"]
            found.expect(
                normal.seconds < slow.seconds,
                f"round {round_no}: the normal stream ({normal.seconds:.1f} s) waited for the slow "
                f"reader ({slow.seconds:.1f} s)",
            )
            ids = {name: o.request_id for name, o in outcomes.items() if o.request_id}
            rows = {row["request_id"]: row for row in ledger.wait_rows(list(ids.values()))}
            for name, expected in EXPECTED_STATUS.items():
                request_id = ids.get(name)
                if request_id is None:
                    found.expect(False, f"round {round_no}: {name} got no x-request-id")
                    continue
                row = rows.get(request_id)
                if found.expect(row is not None, f"round {round_no}: {name} has no ledger row"):
                    assert row is not None
                    found.expect(
                        row["status"] == expected,
                        f"round {round_no}: {name}'s row says {row['status']!r}, not {expected!r}",
                    )
            # The non-streamed reset and the prefill reset: billed, under ids we never saw.
            time.sleep(1.0)
            added = len(ledger.rows()) - before
            known = len(ids)
            found.numbers[f"round{round_no}_ledger_rows"] = added
            found.expect(
                added == known + 1,
                f"round {round_no}: {added} ledger rows for {known} answered requests plus one "
                "non-streamed reset (expected exactly one each; the half-sent body none)",
            )
        found.numbers["rounds"] = rounds
        found.numbers["worst_health_s"] = round(probe.worst(), 3)
        found.expect(probe.worst() < stall, f"/health took {probe.worst():.2f} s")
        tracebacks = srv.tracebacks()
        found.numbers["log_errors"] = len(tracebacks)
        found.expect(not tracebacks, f"server logged errors for client behaviour: {tracebacks[:3]}")
    last = rounds[-1] if rounds else {}
    return found.result(
        f"{len(rounds)} round(s) of 9 client behaviours; engine idle "
        f"{last.get('idle_after_s', '-')} s after they left; worst /health "
        f"{probe.worst():.2f} s; {len(found.failures)} failure(s)"
    )
