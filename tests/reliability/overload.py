"""Overload: far more concurrent streams than ``--parallel`` + ``--max-queue``.

Some are served to ``[DONE]``; the rest get 503 with ``Retry-After`` and an OpenAI error
body at once; none hangs; /health answers throughout; every served stream has its
ledger row; afterwards the engine is idle and a new request is served at once.
"""

from __future__ import annotations

import asyncio
import collections
import time

from tests.reliability.harness import (
    Findings,
    HealthProbe,
    Ledger,
    Profile,
    Result,
    Workdir,
    chat_body,
    server,
    stream_chat,
)

PARALLEL = 2
QUEUE = 2


def check_overload(work: Workdir, profile: Profile, stall: float) -> Result:
    found = Findings("overload")
    db = work.db("overload")
    total = profile.overload_streams
    with (
        server(
            "--parallel",
            str(PARALLEL),
            "--max-queue",
            str(QUEUE),
            "--ctx-size",
            "2048",
            "--prices",
            str(work.prices),
            db=db,
        ) as srv,
        HealthProbe(srv.url) as probe,
    ):
        body = chat_body("Write a long story about a lighthouse.", max_tokens=32, ignore_eos=True)
        body["stream"] = True

        async def burst() -> list:
            return await asyncio.gather(
                *[stream_chat(srv.port, body, timeout=180) for _ in range(total)]
            )

        started = time.monotonic()
        outcomes = asyncio.run(burst())
        took = time.monotonic() - started
        statuses = collections.Counter(o.status for o in outcomes)
        endings = collections.Counter(o.ended for o in outcomes)
        served = [o for o in outcomes if o.status == 200]
        refused = [o for o in outcomes if o.status == 503]
        found.numbers.update(
            streams=total,
            served=len(served),
            refused_503=len(refused),
            statuses=dict(statuses),
            endings=dict(endings),
            seconds=round(took, 1),
            worst_health_s=round(probe.worst(), 3),
        )
        found.expect(bool(served), "no stream was served")
        found.expect(
            bool(refused), f"nothing was refused with {total} streams on {PARALLEL}+{QUEUE}"
        )
        found.expect(
            len(served) + len(refused) == total, f"statuses other than 200/503: {dict(statuses)}"
        )
        hung = [o for o in outcomes if o.ended in ("timeout", "open")]
        found.expect(not hung, f"{len(hung)} stream(s) hung")
        found.expect(
            all(o.done for o in served),
            f"served streams that did not end with [DONE]: "
            f"{collections.Counter(o.ended for o in served if not o.done)}",
        )
        no_retry = [o for o in refused if not o.retry_after]
        found.expect(not no_retry, f"{len(no_retry)} 503(s) without Retry-After")
        bad_body = [o for o in refused if not (o.error and "message" in o.error)]
        found.expect(not bad_body, f"{len(bad_body)} 503(s) without an OpenAI error body")
        slow_refusals = [o.seconds for o in refused if o.seconds > 2.0]
        found.expect(not slow_refusals, f"{len(slow_refusals)} refusal(s) took over 2 s")
        found.expect(probe.worst() < stall, f"/health took {probe.worst():.2f} s during the burst")

        stats = srv.wait_idle(30)
        found.expect(
            stats.get("running") == 0 and stats.get("in_flight") == 0,
            f"engine not idle after the burst: {stats}",
        )
        recovery_started = time.monotonic()
        again = asyncio.run(stream_chat(srv.port, body, timeout=60))
        found.numbers["recovery_request_s"] = round(time.monotonic() - recovery_started, 2)
        found.expect(again.done, f"a request after the burst was not served: {again.status}")

        ids = [o.request_id for o in served if o.request_id]
        rows = Ledger(db).wait_rows(ids)
        found.numbers["ledger_rows_for_served"] = len(rows)
        found.expect(len(rows) == len(ids), f"{len(ids) - len(rows)} served stream(s) not billed")
        tracebacks = srv.tracebacks()
        found.expect(not tracebacks, f"server logged errors: {tracebacks[:3]}")
    return found.result(
        f"{total} streams on --parallel {PARALLEL} --max-queue {QUEUE}: {len(served)} served, "
        f"{len(refused)} got 503 (Retry-After on {len(refused) - len(no_retry)}), "
        f"{len(hung)} hung, worst /health {probe.worst():.2f} s, "
        f"next request {found.numbers['recovery_request_s']:.1f} s"
    )
