"""Output items from engine outputs, and the streamed events that tell them.

``OutputItems`` turns one choice's outputs into items, and says each change as
an event payload: a message item opens at the first text (item added, its
``output_text`` part added), grows by ``output_text.delta`` and closes with
``output_text.done``, ``content_part.done`` and ``output_item.done``; a tool
call opens a ``function_call`` item (``call_id`` and ``name``, arguments "")
that grows by ``function_call_arguments.delta`` and closes with
``.done`` and ``output_item.done``. An item closes when the next one opens or
the choice ends. The non-streamed response uses the same class and drops the
events, so both give the same items.

``ResponseEvents`` is the ``EventWriter``: ``response.created`` and
``response.in_progress`` first, the items' events, then one of
``response.completed``, ``response.incomplete`` (``max_output_tokens``,
``content_filter``) or ``response.failed``. Each is framed ``event: <type>``
plus ``data: <json>`` with ``sequence_number`` from 0, and there is no
``[DONE]`` (the SDK's parser goes by the ``type`` in the data).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from spigot.api.responses_api.items import response_object, usage_of
from spigot.api.state import new_id
from spigot.engine.types import FinishReason, GenOutput, ToolCallDelta

Payload = dict[str, Any]
# The final response object, handed over before the client sees it (to be stored).
Keep = Callable[[dict[str, Any]], Awaitable[None]]

# Finish reasons that leave a response (and its last item) incomplete, and why.
INCOMPLETE = {
    FinishReason.LENGTH: "max_output_tokens",
    FinishReason.CONTENT_FILTER: "content_filter",
}


class OutputItems:
    """One choice's output items, built as outputs arrive."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.finish_reason: FinishReason | None = None
        self._open: dict[str, Any] | None = None  # the item still growing
        self._call_index: int | None = None  # its ToolCallDelta.index, for a call

    def feed(self, output: GenOutput) -> list[Payload]:
        events: list[Payload] = []
        if output.text:
            events += self._text(output.text)
        for delta in output.tool_calls:
            events += self._call(delta)
        if output.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
            return events  # cut short: the stream ends with response.failed, or unread
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            if not self.items:
                # Nothing was said: still one (empty) message, as clients read output[0].
                events += self._open_message()
            events += self._close(
                "incomplete" if output.finish_reason in INCOMPLETE else "completed"
            )
        return events

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _text(self, text: str) -> list[Payload]:
        events: list[Payload] = []
        if self._open is None or self._open["type"] != "message":
            events += self._close("completed")
            events += self._open_message()
        assert self._open is not None
        part = self._open["content"][0]
        part["text"] += text
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": self._open["id"],
                "output_index": self._index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
        )
        return events

    def _open_message(self) -> list[Payload]:
        item: dict[str, Any] = {
            "id": new_id("msg_"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._open = item
        self.items.append(item)
        part: dict[str, Any] = {
            "type": "output_text",
            "text": "",
            "annotations": [],
            "logprobs": [],
        }
        added = {
            "type": "response.output_item.added",
            "output_index": self._index,
            "item": _copy(item),
        }
        item["content"].append(part)
        return [
            added,
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": self._index,
                "content_index": 0,
                "part": _copy(part),
            },
        ]

    def _call(self, delta: ToolCallDelta) -> list[Payload]:
        events: list[Payload] = []
        if self._open is None or self._call_index != delta.index:
            events += self._close("completed")
            item = {
                "id": new_id("fc_"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": delta.id or new_id("call_"),
                "name": delta.name or "",
                "arguments": "",
            }
            self._open, self._call_index = item, delta.index
            self.items.append(item)
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": self._index,
                    "item": _copy(item),
                }
            )
        if delta.arguments:
            self._open["arguments"] += delta.arguments
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": self._open["id"],
                    "output_index": self._index,
                    "delta": delta.arguments,
                }
            )
        return events

    def _close(self, status: str) -> list[Payload]:
        item, self._open, self._call_index = self._open, None, None
        if item is None:
            return []
        item["status"] = status
        index, item_id = self._index, item["id"]
        events: list[Payload] = []
        if item["type"] == "message":
            part = item["content"][0]
            common = {"item_id": item_id, "output_index": index, "content_index": 0}
            events.append(
                {
                    "type": "response.output_text.done",
                    **common,
                    "text": part["text"],
                    "logprobs": [],
                }
            )
            events.append({"type": "response.content_part.done", **common, "part": _copy(part)})
        else:
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item_id,
                    "output_index": index,
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
        events.append(
            {"type": "response.output_item.done", "output_index": index, "item": _copy(item)}
        )
        return events


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    # Events carry the item as it was then; later deltas must not change a sent event.
    return orjson.loads(orjson.dumps(item))


class ResponseShape:
    """One response's fixed parts (id, time, model, echoed settings) and its objects."""

    def __init__(self, response_id: str, created_at: int, model: str, settings: dict[str, Any]):
        self.response_id = response_id
        self.created_at = created_at
        self.model = model
        self.settings = settings

    def snapshot(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return response_object(
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            settings=self.settings,
            status=status,
            output=output,
            **extra,
        )

    def final(self, items: OutputItems, chat_usage: dict[str, Any]) -> dict[str, Any]:
        reason = INCOMPLETE.get(items.finish_reason) if items.finish_reason else None
        return self.snapshot(
            "incomplete" if reason else "completed",
            items.items,
            usage=usage_of(chat_usage),
            incomplete_reason=reason,
            completed_at=None if reason else int(time.time()),
        )


def failed_error(error: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI error body as a response's ``error``. The code is "server_error" (the
    SDK's ResponseError knows a fixed set); spigot's own code stays in the message."""
    inner = error.get("error", error)
    message = str(inner.get("message") or "The server had an error.")
    if inner.get("code"):
        message = f"{message} ({inner['code']})"
    return {"code": "server_error", "message": message}


class ResponseEvents:
    """The ``EventWriter`` of one streamed response."""

    def __init__(self, shape: ResponseShape, keep: Keep) -> None:
        self._shape = shape
        self._keep = keep
        self._items = OutputItems()
        self._sequence = 0

    def _frame(self, payload: Payload) -> bytes:
        payload["sequence_number"] = self._sequence
        self._sequence += 1
        kind: str = payload["type"]
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _lifecycle(self, kind: str, response: dict[str, Any]) -> bytes:
        return self._frame({"type": kind, "response": response})

    def opening(self) -> list[bytes]:
        start = self._shape.snapshot("in_progress", [])
        return [
            self._lifecycle("response.created", start),
            self._lifecycle("response.in_progress", start),
        ]

    def output(self, output: GenOutput) -> list[bytes]:
        return [self._frame(payload) for payload in self._items.feed(output)]

    async def closing(self, usage: dict[str, Any]) -> list[bytes]:
        final = self._shape.final(self._items, usage)
        await self._keep(final)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [self._lifecycle(kind, final)]

    def failure(self, error: dict[str, Any]) -> list[bytes]:
        failed = self._shape.snapshot("failed", self._items.items, error=failed_error(error))
        return [self._lifecycle("response.failed", failed)]
