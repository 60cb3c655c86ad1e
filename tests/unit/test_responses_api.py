"""The Responses API over a scripted engine: its events, endings, storage and refusals,
deterministically (tests/e2e/test_responses_api.py runs the real model and SDK)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from spigot.api.responses_api.events import OutputItems
from spigot.engine.types import FinishReason, GenOutput, ToolCallDelta, Usage
from spigot.metering import open_store
from tests.unit.fake_engine import ScriptedEngine
from tests.unit.test_api_with_fake_engine import OUTPUT_RULES, serve

BODY: dict[str, Any] = {"model": "scripted", "input": "hello there"}


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    """``event: <type>`` / ``data: <json>`` frames; each data's type equals its event line."""
    events = []
    for frame in raw.split(b"\n\n"):
        if not frame:
            continue
        kind, data = frame.split(b"\n")
        assert kind.startswith(b"event: ") and data.startswith(b"data: ")
        event = orjson.loads(data[len(b"data: ") :])
        assert event["type"] == kind[len(b"event: ") :].decode()
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


TEXT_OPEN = ["created", "in_progress", "output_item.added", "content_part.added"]
TEXT_CLOSE = ["output_text.done", "content_part.done", "output_item.done"]


async def test_streamed_events_in_order() -> None:
    async with serve(ScriptedEngine()) as client:
        reply = await client.post("/v1/responses", json={**BODY, "stream": True})
    assert reply.status_code == 200 and b"[DONE]" not in reply.content
    events = parse_events(reply.content)
    assert kinds(events) == [*TEXT_OPEN, *["output_text.delta"] * 3, *TEXT_CLOSE, "completed"]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["id"].startswith("resp_")
    assert final["output"][0]["content"][0]["text"] == "user: hello there"
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 3
    # Nothing is stored without a database, and the response says so.
    assert final["store"] is False


async def test_length_is_incomplete_with_its_reason() -> None:
    engine = ScriptedEngine(pieces=["a"] * 40)
    async with serve(engine) as client:
        body = {**BODY, "stream": True, "max_output_tokens": 16}
        events = parse_events((await client.post("/v1/responses", json=body)).content)
        whole = (await client.post("/v1/responses", json={**BODY, "max_output_tokens": 16})).json()
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
    assert whole["status"] == "incomplete" and whole["usage"]["output_tokens"] == 16


async def test_engine_failure_ends_with_response_failed() -> None:
    async with serve(ScriptedEngine(fail_after=2)) as client:
        reply = await client.post("/v1/responses", json={**BODY, "stream": True})
    events = parse_events(reply.content)
    assert kinds(events)[:6] == [*TEXT_OPEN, "output_text.delta", "output_text.delta"]
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "scripted engine failure" in failed["error"]["message"]


async def test_output_rule_block_is_incomplete_content_filter() -> None:
    engine = ScriptedEngine(pieces=["it", " was", " never", " said", " at", " all"])
    async with serve(engine, guard=OUTPUT_RULES) as client:
        events = parse_events(
            (await client.post("/v1/responses", json={**BODY, "stream": True})).content
        )
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "content_filter"}
    assert "never said" not in final["output"][0]["content"][0]["text"]


async def test_stored_chain_and_owners(tmp_path: Any) -> None:
    store = open_store(str(tmp_path / "r.db"))
    _, mine = store.create_key("mine")
    _, theirs = store.create_key("theirs")
    async with serve(ScriptedEngine(), store=store, secret=mine) as client:
        first = (
            await client.post("/v1/responses", json={**BODY, "instructions": "be kind"})
        ).json()
        assert first["store"] is True
        second = (
            await client.post(
                "/v1/responses",
                json={**BODY, "input": "again", "previous_response_id": first["id"]},
            )
        ).json()
        # The fake model echoes its prompt: the chain is there, the instructions are not.
        text = second["output"][0]["content"][0]["text"]
        assert text == "user: hello there assistant: system: be kind user: hello there user: again"
        assert (await client.get(f"/v1/responses/{first['id']}")).json() == first
        other = {"authorization": f"Bearer {theirs}"}
        foreign = await client.get(f"/v1/responses/{first['id']}", headers=other)
        assert foreign.status_code == 404
        refused = await client.post(
            "/v1/responses",
            json={**BODY, "previous_response_id": first["id"]},
            headers=other,
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "previous_response_id"
        assert (
            await client.delete(f"/v1/responses/{first['id']}", headers=other)
        ).status_code == 404
        deleted = await client.delete(f"/v1/responses/{first['id']}")
        assert deleted.json() == {"id": first["id"], "object": "response.deleted", "deleted": True}
        # The chain through a deleted response is broken: refused, naming the field.
        broken = await client.post(
            "/v1/responses", json={**BODY, "previous_response_id": second["id"]}
        )
        assert broken.status_code == 400 and first["id"] in broken.json()["error"]["message"]
    store.close()


async def test_store_true_without_a_database_is_refused() -> None:
    async with serve(ScriptedEngine()) as client:
        reply = await client.post("/v1/responses", json={**BODY, "store": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "store"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2, "tools": [{"type": "computer_use_preview"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
            "tools[0].parameters",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"text": {"verbosity": "high"}}, "text.verbosity"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"input": None}, "input"),
    ],
)
async def test_refused_by_name(extra: dict[str, Any], param: str) -> None:
    async with serve(ScriptedEngine()) as client:
        reply = await client.post("/v1/responses", json={**BODY, **extra})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_output_items_text_then_tool_calls() -> None:
    items = OutputItems()
    events = items.feed(GenOutput(0, "Let me look."))
    events += items.feed(GenOutput(0, "", tool_calls=[ToolCallDelta(0, "call_1", "get", "")]))
    events += items.feed(GenOutput(0, "", tool_calls=[ToolCallDelta(0, arguments='{"a":')]))
    events += items.feed(GenOutput(0, "", tool_calls=[ToolCallDelta(0, arguments="1}")]))
    usage = Usage(3, 4)
    events += items.feed(GenOutput(0, "", finish_reason=FinishReason.TOOL_CALLS, usage=usage))
    assert [e["type"].removeprefix("response.") for e in events] == [
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        *TEXT_CLOSE,
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
    ]
    message, call = items.items
    assert message["content"][0]["text"] == "Let me look." and message["status"] == "completed"
    assert call["call_id"] == "call_1" and call["name"] == "get" and call["arguments"] == '{"a":1}'
    assert call["status"] == "completed" and call["id"].startswith("fc_")
    assert [e["output_index"] for e in events] == [0] * 6 + [1] * 5
    # The added event shows the call as it began, not as it ended.
    assert events[6]["item"]["arguments"] == ""


def test_output_items_empty_output_is_one_empty_message() -> None:
    items = OutputItems()
    events = items.feed(GenOutput(0, "", finish_reason=FinishReason.STOP, usage=Usage(1, 0)))
    assert [e["type"].removeprefix("response.") for e in events] == [
        "output_item.added",
        "content_part.added",
        *TEXT_CLOSE,
    ]
    assert items.items[0]["content"][0]["text"] == "" and items.items[0]["status"] == "completed"


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CALL = ["<tool_call>", '\n{"name":"get_weather",', '"arguments":{"city":"Oslo"}}', "\n</tool_call>"]


async def test_a_tool_call_is_a_function_call_item() -> None:
    engine = ScriptedEngine(pieces=CALL, finish_reason=FinishReason.TOOL_CALLS)
    body = {**BODY, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    async with serve(engine) as client:
        events = parse_events(
            (await client.post("/v1/responses", json={**body, "stream": True})).content
        )
        whole = (await client.post("/v1/responses", json=body)).json()
    names = kinds(events)
    assert names[:3] == ["created", "in_progress", "output_item.added"]
    assert names[-3:] == ["function_call_arguments.done", "output_item.done", "completed"]
    added, done = events[2]["item"], events[-2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == ""
    assert added["name"] == "get_weather" and added["call_id"] == done["call_id"]
    assert done["arguments"] == '{"city":"Oslo"}' and done["status"] == "completed"
    (item,) = whole["output"]
    assert item["type"] == "function_call" and item["arguments"] == '{"city":"Oslo"}'
    assert whole["tools"][0]["strict"] is True and whole["tool_choice"] == "required"


async def test_function_call_output_is_sent_back_as_a_tool_message() -> None:
    engine = ScriptedEngine()
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    async with serve(engine) as client:
        reply = await client.post(
            "/v1/responses", json={**BODY, "input": items, "tools": [WEATHER_TOOL]}
        )
    assert reply.status_code == 200, reply.text
    ((messages, tools),) = engine.chats
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert messages == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert tools is not None and tools[0]["function"]["name"] == "get_weather"
