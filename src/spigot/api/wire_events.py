"""What a streamed request sends, as an endpoint's ``EventWriter`` says it.

``StreamedRequest`` decides when things happen (outputs arrive, the request is
recorded, an engine fails); the writer decides the bytes. Chat and legacy
completions share one writer over their chunk shapes (``ChunkFormat``): an
opening chunk per choice, content and finish chunks, the usage chunk when
asked, ``[DONE]``. The Responses API has its own (named events with sequence
numbers, no ``[DONE]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from spigot.api.sse import DONE, data_event
from spigot.engine.types import FinishReason, GenOutput


class EventWriter(Protocol):
    def opening(self) -> list[bytes]:
        """Events before any output."""

    def output(self, output: GenOutput) -> list[bytes]:
        """Events for one output the client may see (text, tool calls, an ending)."""

    async def closing(self, usage: dict[str, Any]) -> list[bytes]:
        """The last events of a stream that ran to its end (usage recorded); may await
        (the Responses API stores the response before the client sees its end)."""

    def failure(self, error: dict[str, Any]) -> list[bytes]:
        """The last events of a stream cut short (``error``: an OpenAI error body)."""


class ChunkFormat(Protocol):
    def opening(self, choice: int) -> dict[str, Any] | None:
        """A chunk sent for each choice before any text, or None."""

    def content(self, output: GenOutput) -> dict[str, Any]: ...

    def finish(self, output: GenOutput) -> dict[str, Any]: ...

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]: ...


def has_content(output: GenOutput) -> bool:
    return bool(output.text or output.tool_calls or output.delta_extra)


class ChunkEvents:
    """Chat and legacy completion chunks as data-only events, ending in ``[DONE]``."""

    def __init__(self, fmt: ChunkFormat, choices: int, include_usage: bool) -> None:
        self._fmt = fmt
        self._choices = choices
        self._include_usage = include_usage

    def opening(self) -> list[bytes]:
        chunks = (self._fmt.opening(choice) for choice in range(self._choices))
        return [data_event(chunk) for chunk in chunks if chunk is not None]

    def output(self, output: GenOutput) -> list[bytes]:
        return list(self._output(output))

    def _output(self, output: GenOutput) -> Iterator[bytes]:
        if has_content(output):
            yield data_event(self._fmt.content(output))
        # An aborted choice gets no finish chunk ("abort" is not a wire reason): the
        # stream ends with an error event instead (shutdown) or nobody is reading.
        if output.finished and output.finish_reason is not FinishReason.ABORT:
            yield data_event(self._fmt.finish(output))

    async def closing(self, usage: dict[str, Any]) -> list[bytes]:
        if self._include_usage:
            return [data_event(self._fmt.usage(usage)), DONE]
        return [DONE]

    def failure(self, error: dict[str, Any]) -> list[bytes]:
        return [data_event(error)]
