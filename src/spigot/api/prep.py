"""The prep pool: request work that grows with the input, kept off the event loop.

Decoding a body, checking prompts against input rules, rendering a chat
template and tokenizing all take time proportional to what a client sent. On
the event loop, one large request would stall every stream and ``/health``;
here it waits for a worker thread. llama.cpp's tokenizer releases the GIL, and
Python work in a worker yields the GIL to the loop every few milliseconds.

The queue in front of the workers is bounded: past ``max_pending`` jobs a
request gets 503 with ``Retry-After`` at once, instead of queueing work (and
holding its body) behind everybody else's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from spigot.errors import Overloaded

T = TypeVar("T")


class PrepPool:
    def __init__(self, workers: int = 2, max_pending: int = 128) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="spigot-prep")
        self.max_pending = max_pending
        self.pending = 0  # jobs queued or running

    async def run(self, fn: Callable[[], T]) -> T:
        if self.pending >= self.max_pending:
            raise Overloaded(
                "The server is busy preparing other requests; try again shortly.", retry_after=1
            )
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
