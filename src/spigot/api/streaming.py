"""The life of one generation request, shared by chat and legacy completions.

A ``ChunkFormat`` knows one endpoint's wire shapes; everything else is here:
the order of events, usage accounting, the in-band error event, and the
``finally`` that aborts generation and records usage however the request
ended (normal end, client disconnect, engine error, server shutdown).

Usage is counted from every engine output as it arrives; what the client
then sees of an output passes through the request's ``OutputGuard`` (when
the server has a guard policy), which may hold text back, redact it, or end
a choice with ``content_filter``. TTFT and finish reasons are recorded as the
client sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any, Protocol

from starlette.requests import Request

from spigot.api.guarding import OutputGuard
from spigot.api.sse import DONE, data_event
from spigot.api.state import RequestRecord, ServerState
from spigot.engine.protocol import OutputStream
from spigot.engine.types import FinishReason, GenOutput
from spigot.errors import EngineFailure


class ChunkFormat(Protocol):
    def opening(self, choice: int) -> dict[str, Any] | None:
        """A chunk sent for each choice before any text, or None."""

    def content(self, output: GenOutput) -> dict[str, Any]: ...

    def finish(self, output: GenOutput) -> dict[str, Any]: ...

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]: ...


def usage_body(record: RequestRecord) -> dict[str, Any]:
    return {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": record.cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def with_extras(
    chunk: dict[str, Any], choice_part: dict[str, Any], output: GenOutput
) -> dict[str, Any]:
    """An engine elsewhere's fields that spigot does not know, added where they were
    (never over spigot's own). Outputs that passed output rules carry none: text
    the rules have not seen does not reach the client."""
    for extra, into in ((output.chunk_extra, chunk), (output.delta_extra, choice_part)):
        if extra:
            for name, value in extra.items():
                into.setdefault(name, value)
    return chunk


def error_body(message: str) -> dict[str, Any]:
    return EngineFailure(message).to_body()


def _account(record: RequestRecord, output: GenOutput) -> None:
    if output.finished:
        record.add_usage(output.usage, output.choice_index)


def _visible(
    guard: OutputGuard | None, record: RequestRecord, output: GenOutput
) -> GenOutput | None:
    """What the client gets of an output, with TTFT and finish reasons recorded as it sees them."""
    if guard is not None:
        shown = guard.apply(output)
        if shown is None:
            return None
        output = shown
    if output.text:
        record.mark_first_token()
    if output.finish_reason is not None and output.finish_reason not in (
        FinishReason.ERROR,
        FinishReason.ABORT,
    ):
        record.finish_reasons.append(output.finish_reason.value)
    return output


async def _abort_and_account(stream: OutputStream, record: RequestRecord) -> None:
    """Stop what still runs and count what it consumed until it stopped."""
    stream.abort()
    for output in await stream.drain():
        _account(record, output)


async def abandon(state: ServerState, stream: OutputStream, record: RequestRecord) -> None:
    """A started request whose response could not even be set up: stop it and bill it,
    so neither the engine nor the key's reservation is held for nobody."""
    record.status = "error"
    await _abort_and_account(stream, record)
    await state.finish(record)


def _events(fmt: ChunkFormat, output: GenOutput | None) -> Iterator[bytes]:
    if output is None:
        return
    if output.text or output.delta_extra:
        yield data_event(fmt.content(output))
    # An aborted choice gets no finish chunk ("abort" is not a wire reason): the
    # stream ends with an error event instead (shutdown) or nobody is reading.
    if output.finished and output.finish_reason is not FinishReason.ABORT:
        yield data_event(fmt.finish(output))


class StreamedRequest:
    """One streamed request: its SSE events, and the cleanup that must run however it ends.

    ``close`` is idempotent and runs from the events' ``finally`` and again from the
    response once sending is over, so a request whose events never started (the
    client left before the first byte) is still aborted and recorded.
    """

    def __init__(
        self,
        *,
        state: ServerState,
        stream: OutputStream,
        fmt: ChunkFormat,
        record: RequestRecord,
        choices: int,
        include_usage: bool,
        guard: OutputGuard | None = None,
        preamble: Sequence[GenOutput] = (),
    ) -> None:
        self._state = state
        self._stream = stream
        self._fmt = fmt
        self._record = record
        self._choices = choices
        self._include_usage = include_usage
        self._guard = guard
        self._preamble = preamble  # text sent before the model's (an echoed prompt)
        self._recorded = False
        self._closed = False
        # Tracked from here until close: a server shutdown may cut it short.
        self._interruption = state.shutdown.track(stream)
        self._checkpoints = Checkpoints(state, record)

    async def events(self) -> AsyncGenerator[bytes, None]:
        fmt, record, stream, guard = self._fmt, self._record, self._stream, self._guard
        interruption = self._interruption
        try:
            for choice in range(self._choices):
                opening = fmt.opening(choice)
                if opening is not None:
                    yield data_event(opening)
            for output in self._preamble:
                for event in _events(fmt, _visible(guard, record, output)):
                    yield event
            async for output in stream:
                _account(record, output)
                self._checkpoints.step(output)
                if output.error is not None:
                    record.status = "error"
                    await _abort_and_account(stream, record)
                    yield data_event(error_body(output.error))
                    return
                for event in _events(fmt, _visible(guard, record, output)):
                    yield event
            if interruption.error is not None:
                # Cut short by the server (shutdown): billed first, then told in-band.
                record.status = "interrupted"
                self._recorded = True
                await self._state.finish(record)
                yield data_event(interruption.error.to_body())
                return
            # Usage is recorded (and the ledger row committed) before the client can see
            # [DONE]: a client that saw the end of the stream has always been metered.
            self._recorded = True
            if not await self._state.finish(record):
                yield data_event(error_body("The usage of this request could not be recorded."))
                return
            if self._include_usage:
                yield data_event(fmt.usage(usage_body(record)))
            yield DONE
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state.shutdown.untrack(self._interruption)
        if not self._stream.finished:
            if self._record.status == "ok":
                self._record.status = "disconnected"
            await _abort_and_account(self._stream, self._record)
        if not self._recorded:
            self._recorded = True
            await self._state.finish(self._record)


class Checkpoints:
    """A long stream's progress, saved on its reservation every few seconds.

    If the process dies (SIGKILL, a crash) before the stream is settled, the
    next start bills the reservation at these counts (``Store.checkpoint``):
    tokens already served are not given away. The count is the outputs the
    client was sent, one token each at most, so it never bills more than ran.
    """

    EVERY = 1.0  # seconds: a kill loses at most this much of a stream's billing

    def __init__(self, state: ServerState, record: RequestRecord) -> None:
        self._metering = state.metering if record.key_id is not None else None
        self._record = record
        self._served = 0
        self._last = time.monotonic()
        self._task: asyncio.Task[bool] | None = None

    def step(self, output: GenOutput) -> None:
        if self._metering is None or output.finished:
            return
        self._served += 1
        now = time.monotonic()
        # The first output means the prompt was computed: that is worth saving at once.
        due = self._served == 1 or now - self._last >= self.EVERY
        if not due or (self._task is not None and not self._task.done()):
            return
        self._last = now
        record = self._record
        # Not awaited: the stream never waits on the database.
        self._task = asyncio.create_task(
            self._metering.checkpoint(
                record.request_id,
                model=record.model,
                prompt_tokens=record.prompt_tokens,
                cached_tokens=0,
                completion_tokens=self._served,
            )
        )


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(
    *,
    request: Request,
    state: ServerState,
    stream: OutputStream,
    record: RequestRecord,
    choices: int,
    guard: OutputGuard | None = None,
    preamble: Sequence[GenOutput] = (),
) -> list[list[GenOutput]]:
    """All outputs of a non-streamed request as the client may see them, per choice.

    Generation is aborted if the client leaves first.
    """

    interruption = state.shutdown.track(stream)
    checkpoints = Checkpoints(state, record)

    async def gather() -> list[list[GenOutput]]:
        per_choice: list[list[GenOutput]] = [[] for _ in range(choices)]
        for output in preamble:
            shown = _visible(guard, record, output)
            if shown is not None:
                per_choice[shown.choice_index].append(shown)
        async for output in stream:
            _account(record, output)
            checkpoints.step(output)
            if output.error is not None:
                record.status = "error"
                raise EngineFailure(output.error)
            shown = _visible(guard, record, output)
            if shown is not None:
                per_choice[shown.choice_index].append(shown)
        if interruption.error is not None:
            record.status = "interrupted"
            raise interruption.error
        return per_choice

    worker = asyncio.create_task(gather())
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            return worker.result()
        record.status = "disconnected"
        raise ClientDisconnected
    finally:
        state.shutdown.untrack(interruption)
        for task in (worker, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not stream.finished:
            await _abort_and_account(stream, record)
        await state.finish(record)


def finish_reason_of(outputs: list[GenOutput]) -> str:
    """The finish reason of a choice that ran to its end (``collect`` returned)."""
    reason = outputs[-1].finish_reason
    assert reason is not None and reason not in (FinishReason.ABORT, FinishReason.ERROR)
    return reason.value
