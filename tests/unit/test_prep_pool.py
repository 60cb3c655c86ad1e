"""The prep pool runs work off the loop and refuses, rather than queues, past its bound."""

from __future__ import annotations

import asyncio
import threading

import pytest

from spigot.api.prep import PrepPool
from spigot.errors import Overloaded


async def test_work_runs_in_a_worker_thread() -> None:
    pool = PrepPool(workers=1)
    try:
        name = await pool.run(lambda: threading.current_thread().name)
        assert name.startswith("spigot-prep")
    finally:
        pool.close()


async def test_past_max_pending_a_request_is_refused_at_once() -> None:
    pool = PrepPool(workers=1, max_pending=2)
    release = threading.Event()
    try:
        held = [asyncio.create_task(pool.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await pool.run(lambda: None)
        assert refused.value.status == 503 and refused.value.retry_after == 1
        release.set()
        assert await asyncio.gather(*held) == [True, True]
        assert pool.pending == 0
        assert await pool.run(lambda: 7) == 7  # room again
    finally:
        release.set()
        pool.close()
