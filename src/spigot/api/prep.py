"""The prep pool: request work that grows with the input, kept off the event loop.

Decoding a body, checking prompts against input rules, rendering a chat
template and tokenizing all take time proportional to what a client sent. On
the event loop, one large request would stall every stream and ``/health``;
here it waits for a worker thread. llama.cpp's tokenizer releases the GIL, and
Python work in a worker yields the GIL to the loop every few milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class PrepPool:
    def __init__(self, workers: int = 2) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="spigot-prep")

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
