"""Graceful shutdown at the level of one streamed request, with a stand-in engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from spigot.api.chat import ChatChunks
from spigot.api.holdback import OutputStages
from spigot.api.shutdown import Shutdown
from spigot.api.state import RequestRecord, ServerState
from spigot.api.streaming import StreamedRequest
from spigot.api.wire_events import ChunkEvents
from spigot.engine.stream import RequestStream
from spigot.engine.types import FinishReason, GenOutput, Usage


class AbortingEngine:
    """Delivers a sequence's ABORT output a moment after it is aborted, as the engine does."""

    stream: RequestStream

    def abort(self, request_id: str) -> None:
        last = GenOutput(0, "", finish_reason=FinishReason.ABORT, usage=Usage(3, 1))
        asyncio.get_running_loop().call_soon(self.stream.deliver, request_id, last)


@dataclass
class Sequence:
    request_id: str = "r0"
    choice_index: int = 0


def streamed_request(grace: float) -> tuple[StreamedRequest, RequestStream, ServerState]:
    engine = AbortingEngine()
    stream = RequestStream([Sequence()], engine.abort)  # type: ignore[list-item]
    engine.stream = stream
    state = ServerState(engines={}, router=None, observers=[])  # type: ignore[arg-type]
    state.shutdown = Shutdown(grace=grace)
    record = RequestRecord("req_1", "chat", "m", streamed=True, prompt_tokens=3)
    request = StreamedRequest(
        state=state,
        stream=stream,
        writer=ChunkEvents(ChatChunks("chatcmpl-1", 0, "m", False), 1, include_usage=True),
        record=record,
        stages=OutputStages([]),
    )
    return request, stream, state


async def test_an_interrupted_stream_ends_with_the_error_and_no_abort_reason() -> None:
    request, stream, state = streamed_request(grace=0.01)
    stream.deliver("r0", GenOutput(0, "Hi"))
    state.shutdown.begin()
    events = [event async for event in request.events()]
    assert b'"abort"' not in b"".join(events)  # not a wire finish reason
    assert b"server_shutting_down" in events[-1]
    assert request._record.status == "interrupted"


async def test_a_stream_that_already_ended_is_not_reported_as_interrupted() -> None:
    request, stream, state = streamed_request(grace=0.0)
    done = GenOutput(0, "Hi", finish_reason=FinishReason.STOP, usage=Usage(3, 1))
    stream.deliver("r0", done)
    events = []
    async for event in request.events():
        events.append(event)
        if b'"stop"' in event:  # SIGTERM while the last chunk is being sent
            state.shutdown.begin()
            await asyncio.sleep(0.01)
    assert events[-1] == b"data: [DONE]\n\n"
    assert request._record.status == "ok"
