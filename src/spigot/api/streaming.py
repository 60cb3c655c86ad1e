"""The life of one generation request, shared by chat and legacy completions.

An ``EventWriter`` knows one endpoint's wire events; everything else is here:
the order of events, usage accounting, the in-band error event, and the
``finally`` that aborts generation and records usage however the request
ended (normal end, client disconnect, engine error, server shutdown).

Usage is counted from every engine output as it arrives; what the client
then sees of an output passes through the request's ``OutputStages``
(``holdback.py``: output rules, which may hold text back, redact it, or end a
choice with ``content_filter``; tool calls parsed out of the text). TTFT and
finish reasons are recorded as the client sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from starlette.requests import Request

from spigot.api.holdback import OutputStages
from spigot.api.state import RequestRecord, ServerState
from spigot.api.wire_events import EventWriter
from spigot.engine.protocol import OutputStream
from spigot.engine.types import FinishReason, GenOutput
from spigot.errors import EngineFailure


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


def _visible(stages: OutputStages, record: RequestRecord, output: GenOutput) -> GenOutput | None:
    """What the client gets of an output, with TTFT and finish reasons recorded as it sees them."""
    if stages:
        shown = stages.apply(output)
        if shown is None:
            return None
        output = shown
    if output.text or output.tool_calls:
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
        writer: EventWriter,
        record: RequestRecord,
        stages: OutputStages,
        preamble: Sequence[GenOutput] = (),
    ) -> None:
        self._state = state
        self._stream = stream
        self._writer = writer
        self._record = record
        self._stages = stages
        self._preamble = preamble  # text sent before the model's (an echoed prompt)
        self._recorded = False
        self._closed = False
        # Tracked from here until close: a server shutdown may cut it short.
        self._interruption = state.shutdown.track(stream)
        self._checkpoints = Checkpoints(state, record)

    async def events(self) -> AsyncGenerator[bytes, None]:
        writer, record, stream = self._writer, self._record, self._stream
        interruption = self._interruption
        try:
            for event in writer.opening():
                yield event
            for output in self._preamble:
                for event in self._shown(output):
                    yield event
            async for output in stream:
                _account(record, output)
                self._checkpoints.step(output)
                if output.error is not None:
                    record.status = "error"
                    await _abort_and_account(stream, record)
                    for event in writer.failure(error_body(output.error)):
                        yield event
                    return
                for event in self._shown(output):
                    yield event
            if interruption.error is not None:
                # Cut short by the server (shutdown): billed first, then told in-band.
                record.status = "interrupted"
                self._recorded = True
                await self._state.finish(record)
                for event in writer.failure(interruption.error.to_body()):
                    yield event
                return
            # Usage is recorded (and the ledger row committed) before the client can see
            # the end: a client that saw the end of the stream has always been metered.
            self._recorded = True
            if not await self._state.finish(record):
                failed = error_body("The usage of this request could not be recorded.")
                for event in writer.failure(failed):
                    yield event
                return
            for event in await writer.closing(usage_body(record)):
                yield event
        finally:
            await self.close()

    def _shown(self, output: GenOutput) -> list[bytes]:
        shown = _visible(self._stages, self._record, output)
        return [] if shown is None else self._writer.output(shown)

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
    stages: OutputStages,
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
            shown = _visible(stages, record, output)
            if shown is not None:
                per_choice[shown.choice_index].append(shown)
        async for output in stream:
            _account(record, output)
            checkpoints.step(output)
            if output.error is not None:
                record.status = "error"
                raise EngineFailure(output.error)
            shown = _visible(stages, record, output)
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
