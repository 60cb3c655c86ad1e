"""Graceful shutdown for long-lived streams.

On SIGTERM the server stops accepting connections and refuses new requests
(503 ``server_shutting_down``); running requests get ``grace`` seconds to end
on their own. Those still running then are interrupted: generation is
aborted, the request is billed for what it consumed, and a stream ends with
an in-band error event (a non-streamed request gets the 503), so a client
always learns that its answer was cut, and no served token goes unbilled.
"""

from __future__ import annotations

import asyncio
import logging

from spigot.engine.protocol import OutputStream
from spigot.errors import ShuttingDown, SpigotError

log = logging.getLogger(__name__)


class Interruption:
    """One running request's handle: set when the server cut it short."""

    __slots__ = ("_stream", "error")

    def __init__(self, stream: OutputStream) -> None:
        self.error: SpigotError | None = None
        self._stream = stream

    def interrupt(self, error: SpigotError) -> None:
        # A request whose every sequence already ended is complete: let it say so.
        if self.error is None and self._stream.running:
            self.error = error
            self._stream.abort()


class Shutdown:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self._live: set[Interruption] = set()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise _shutting_down()

    def track(self, stream: OutputStream) -> Interruption:
        handle = Interruption(stream)
        self._live.add(handle)
        if self.draining and self.grace <= 0:
            handle.interrupt(_shutting_down())
        return handle

    def untrack(self, handle: Interruption) -> None:
        self._live.discard(handle)

    @property
    def running(self) -> int:
        return len(self._live)

    def begin(self) -> None:
        """Start draining (on the event loop); later calls change nothing."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "shutting down: %d request(s) running, %.0fs to finish", len(self._live), self.grace
        )
        asyncio.get_running_loop().call_later(self.grace, self.interrupt_all)

    def interrupt_all(self) -> None:
        if self._live:
            log.warning("grace period over: interrupting %d request(s)", len(self._live))
        for handle in list(self._live):
            handle.interrupt(_shutting_down())


def _shutting_down() -> ShuttingDown:
    return ShuttingDown(
        "The server is shutting down; this request was cut short. Retry it.", retry_after=1
    )
