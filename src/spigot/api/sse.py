"""Server-sent events: framing, and a response that notices a client leaving.

Framing follows the OpenAI wire contract: every event is one
``data: <compact JSON>`` line and a blank line; no ``event:``, ``id:`` or
``retry:`` fields; the stream ends with ``data: [DONE]``.

``EventStreamResponse`` listens to the ASGI receive channel for
``http.disconnect`` while the body is produced, and cancels the body the
moment the client goes, even while the body is waiting on a long prefill and
has nothing to send. The body's ``finally`` blocks then abort generation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


def data_event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class EventStreamResponse(Response):
    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # Not Response.__init__: the body is produced while sending.
        self.status_code = 200
        self.background = None
        self._body = body
        self._event_headers = {**SSE_HEADERS, **(headers or {})}
        # Runs however sending ends, even if the body never started.
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            done = await self._send(receive, send)
        finally:
            if self._on_close is not None:
                await asyncio.shield(self._on_close())
        if done:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, receive: Receive, send: Send) -> bool:
        """Send the events until they end (True) or the client leaves (False)."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.encode(), v.encode()) for k, v in self._event_headers.items()],
            }
        )
        sender = asyncio.create_task(self._send_body(send))
        listener = asyncio.create_task(self._wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                task.cancel()
            for task in (sender, listener):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
        return sender in done and sender.exception() is None

    async def _send_body(self, send: Send) -> None:
        try:
            async for data in self._body:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
