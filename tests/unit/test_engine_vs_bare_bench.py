"""benchmarks.engine_vs_bare on the real embedded model: both sides decode and report a time."""

from __future__ import annotations

import asyncio

from benchmarks.engine_vs_bare import compare


def test_engine_and_bare_loop_both_report_every_round() -> None:
    results = asyncio.run(compare([1, 2], tokens=6, rounds=2, threads=2))
    assert set(results) == {1, 2}
    for runs in results.values():
        assert len(runs["engine"]) == len(runs["bare"]) == 2
        assert all(ms > 0 for ms in runs["engine"] + runs["bare"])
