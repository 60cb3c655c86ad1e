"""The outputs of one API request, merged from its sequences: an ``OutputStream``.

Engines deliver each sequence's outputs on the event loop (``deliver``); the
API layer iterates them in arrival order. How a sequence is stopped is the
engine's business: it passes the ``abort`` function.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable

from spigot.engine.types import GenOutput, GenRequest

log = logging.getLogger(__name__)


class RequestStream:
    """An ``OutputStream`` over sequences that engines feed from the event loop."""

    def __init__(
        self,
        requests: Iterable[GenRequest],
        abort: Callable[[str], None],
        *,
        started: bool = True,
    ) -> None:
        """``started``: the sequences run already (a local engine); otherwise the engine
        calls ``mark_started`` or ``refuse`` once it knows."""
        requests = list(requests)
        self._abort = abort
        self._open = {r.request_id for r in requests}
        self._by_choice = {r.choice_index: r.request_id for r in requests}
        self._buffer: deque[GenOutput] = deque()
        self._wakeup = asyncio.Event()
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if started:
            self._started.set_result(None)

    # -- the engine's side ---------------------------------------------------------

    def deliver(self, request_id: str, output: GenOutput) -> None:
        self._buffer.append(output)
        if output.finished:
            self._open.discard(request_id)
        self._wakeup.set()

    def mark_started(self) -> None:
        if not self._started.done():
            self._started.set_result(None)

    def refuse(self, error: BaseException) -> None:
        """The request could not start: ``ready`` raises ``error``."""
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # retrieved: nobody may be waiting yet

    # -- the API's side ------------------------------------------------------------

    async def ready(self) -> None:
        await asyncio.shield(self._started)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenOutput:
        while not self._buffer:
            if not self._open:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._buffer.popleft()

    @property
    def finished(self) -> bool:
        return not self._open and not self._buffer

    @property
    def running(self) -> bool:
        return bool(self._open)

    def abort(self) -> None:
        for request_id in list(self._open):
            self._abort(request_id)

    def abort_choice(self, choice_index: int) -> None:
        request_id = self._by_choice.get(choice_index)
        if request_id in self._open:
            self._abort(request_id)

    async def drain(self, within: float = 10.0) -> list[GenOutput]:
        outputs: list[GenOutput] = []
        try:
            async with asyncio.timeout(within):
                async for output in self:
                    outputs.append(output)
        except TimeoutError:
            log.warning("sequences %s did not report after abort", sorted(self._open))
            self._open.clear()
        return outputs
