"""The Responses API end to end: the real server and model, driven by the openai SDK.

Events are parsed by the SDK's own types (and re-validated strictly), in order, with
consecutive sequence numbers; usage equals chat's for the same messages; stored responses
chain through ``previous_response_id``, are read and deleted, and stay with their key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import BaseModel

from tests.e2e.server import RunningServer, spigot, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
QUESTION = "Hi!"  # the model answers in about ten tokens and stops
SETTINGS: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_output_tokens": 100}


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


def _strict(event: BaseModel) -> None:
    # The SDK parses leniently: validate the wire dict against the event's own type.
    type(event).model_validate(event.model_dump(mode="json", exclude_unset=True))


def _chat_usage(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> Any:
    done = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=max_tokens,
    )
    return done.usage, done.choices[0].message.content


# -- streamed events ----------------------------------------------------------------------


def test_stream_events_come_in_order_with_consecutive_sequence_numbers(
    client: openai.OpenAI,
) -> None:
    events = list(client.responses.create(input=QUESTION, stream=True, **SETTINGS))
    for event in events:
        _strict(event)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    expected_head = [
        ResponseCreatedEvent,
        ResponseInProgressEvent,
        ResponseOutputItemAddedEvent,
        ResponseContentPartAddedEvent,
    ]
    assert [type(e) for e in events[:4]] == expected_head
    deltas = [e for e in events[4:-4] if isinstance(e, ResponseTextDeltaEvent)]
    assert len(deltas) == len(events) - 8 and deltas
    expected_tail = [
        ResponseTextDoneEvent,
        ResponseContentPartDoneEvent,
        ResponseOutputItemDoneEvent,
        ResponseCompletedEvent,
    ]
    assert [type(e) for e in events[-4:]] == expected_tail
    created, final = events[0], events[-1]
    assert isinstance(created, ResponseCreatedEvent) and isinstance(final, ResponseCompletedEvent)
    assert created.response.status == "in_progress" and created.response.output == []
    assert final.response.id == created.response.id and final.response.id.startswith("resp_")
    text = "".join(d.delta for d in deltas)
    done = events[-4]
    assert isinstance(done, ResponseTextDoneEvent) and done.text == text
    assert final.response.output_text == text and text.strip()
    item = final.response.output[0]
    assert item.type == "message" and item.id == deltas[0].item_id and item.status == "completed"
    assert final.response.status == "completed" and final.response.usage is not None
    assert final.response.usage.output_tokens == len(deltas) or final.response.usage.output_tokens


def test_stream_helper_and_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(input=QUESTION, **SETTINGS) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text and text.strip()
    assert final.status == "completed"


def test_non_streamed_equals_streamed(client: openai.OpenAI) -> None:
    whole = client.responses.create(input=QUESTION, **SETTINGS)
    Response.model_validate(whole.model_dump(mode="json", exclude_unset=True))
    events = list(client.responses.create(input=QUESTION, stream=True, **SETTINGS))
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent)
    assert whole.output_text == final.response.output_text
    assert whole.usage == final.response.usage
    assert whole.object == "response" and whole.temperature == 0 and whole.max_output_tokens == 100


def test_usage_equals_chats_for_the_same_messages(client: openai.OpenAI) -> None:
    reply = client.responses.create(input=QUESTION, instructions="Be brief.", **SETTINGS)
    usage, text = _chat_usage(
        client,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        100,
    )
    assert reply.usage is not None
    assert reply.usage.input_tokens == usage.prompt_tokens
    assert reply.usage.output_tokens == usage.completion_tokens
    assert reply.usage.total_tokens == usage.total_tokens
    assert reply.output_text == text


def test_small_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    story = "Write a long story about a lighthouse keeper."
    events = list(
        client.responses.create(
            model=MODEL, input=story, temperature=0, max_output_tokens=16, stream=True
        )
    )
    final = events[-1]
    assert isinstance(final, ResponseIncompleteEvent)
    assert final.response.status == "incomplete"
    assert final.response.incomplete_details is not None
    assert final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.usage is not None and final.response.usage.output_tokens == 16
    first_item = final.response.output[0]
    assert first_item.type == "message" and first_item.status == "incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    whole = client.responses.create(model=MODEL, input=story, temperature=0, max_output_tokens=16)
    assert whole.status == "incomplete" and whole.output_text == final.response.output_text


# -- stored responses ---------------------------------------------------------------------


def test_previous_response_id_carries_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(
        input="My name is Ada.", instructions="Answer in one sentence.", **SETTINGS
    )
    second = client.responses.create(
        input="What is my name?", previous_response_id=first.id, **SETTINGS
    )
    third = client.responses.create(
        input="Say it again.", previous_response_id=second.id, **SETTINGS
    )
    assert first.usage and second.usage and third.usage
    # Instructions are not carried over (OpenAI documents the same).
    assert second.instructions is None and second.previous_response_id == first.id
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    usage, text = _chat_usage(client, history, 100)
    assert second.usage.input_tokens == usage.prompt_tokens and second.output_text == text
    alone, _ = _chat_usage(client, history[2:], 100)
    # The new input alone, plus the first exchange: more than the first's output alone.
    assert second.usage.input_tokens >= alone.prompt_tokens + first.usage.output_tokens
    chain = [
        *history,
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Say it again."},
    ]
    usage, text = _chat_usage(client, chain, 100)
    assert third.usage.input_tokens == usage.prompt_tokens and third.output_text == text


def test_get_and_delete(client: openai.OpenAI) -> None:
    made = client.responses.create(input=QUESTION, metadata={"k": "v"}, **SETTINGS)
    assert made.store is True and made.metadata == {"k": "v"}
    read = client.responses.retrieve(made.id)
    assert read.model_dump() == made.model_dump()
    items = client.responses.input_items.list(made.id)
    assert [i.type for i in items.data] == ["message"]
    client.responses.delete(made.id)  # the SDK returns None for the deleted body
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(made.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(input="Hi", previous_response_id=made.id, **SETTINGS)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    made = client.responses.create(input=QUESTION, store=False, **SETTINGS)
    assert made.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


# -- refused ------------------------------------------------------------------------------

REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
    (
        {
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "https://x/y.png"}],
                }
            ]
        },
        "input[0].content[0].type",
    ),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_output_tokens": 8}, "max_output_tokens"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options"),
    ({"previous_response_id": "resp_never"}, "previous_response_id"),
]


@pytest.mark.parametrize(("extra", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_unsupported_fields_are_refused_by_name(
    server: RunningServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "input": "hi", **extra}
    reply = httpx.post(f"{server.base_url}/responses", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"].startswith(param) and error["type"] == "invalid_request_error"


def test_harmless_values_are_accepted(client: openai.OpenAI) -> None:
    reply = client.responses.create(
        input=QUESTION,
        reasoning={"effort": None},
        truncation="disabled",
        include=[],
        service_tier="auto",
        tool_choice="auto",
        **SETTINGS,
    )
    assert reply.status == "completed"


# -- structured output ----------------------------------------------------------------------


class Answer(BaseModel):
    city: str
    country: str


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(
        model=MODEL,
        input="Name a big city and its country.",
        text_format=Answer,
        temperature=0,
        max_output_tokens=60,
    )
    assert isinstance(parsed.output_parsed, Answer)


# -- tool calls ------------------------------------------------------------------------------

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_named_tool_choice_gives_a_function_call(client: openai.OpenAI) -> None:
    ask = "What is the weather in Paris?"
    choice: Any = {"type": "function", "name": "get_weather"}
    made = client.responses.create(
        input=ask,
        tools=[WEATHER],
        tool_choice=choice,
        **SETTINGS,
    )
    (call,) = made.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(orjson.loads(call.arguments)) == {"city"}
    events = list(
        client.responses.create(
            input=ask,
            tools=[WEATHER],
            tool_choice=choice,
            stream=True,
            **SETTINGS,
        )
    )
    for event in events:
        _strict(event)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent)
    streamed = final.response.output[0]
    assert streamed.type == "function_call" and streamed.arguments == call.arguments
    # The answer goes back as a function_call_output, after the call itself.
    output: Any = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."}
    answer = client.responses.create(
        input=[output],
        previous_response_id=made.id,
        tools=[WEATHER],
        tool_choice="none",
        **SETTINGS,
    )
    assert answer.output[0].type == "message" and answer.output_text.strip()


# -- keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str, str]]:
    db = str(tmp_path_factory.mktemp("responses") / "keys.db")
    first = spigot("keys", "create", "--name", "first", "--db", db).strip()
    second = spigot("keys", "create", "--name", "second", "--db", db).strip()
    server = start_server("--db", db, "--parallel", "2", "--ctx-size", "2048")
    try:
        yield server, first, second
    finally:
        server.stop()


def test_another_key_cannot_see_a_response(keyed: tuple[RunningServer, str, str]) -> None:
    server, first, second = keyed
    mine = openai.OpenAI(base_url=server.base_url, api_key=first, max_retries=0)
    theirs = openai.OpenAI(base_url=server.base_url, api_key=second, max_retries=0)
    made = mine.responses.create(input=QUESTION, **SETTINGS)
    assert mine.responses.retrieve(made.id).id == made.id
    foreign = httpx.get(
        f"{server.base_url}/responses/{made.id}", headers={"authorization": f"Bearer {second}"}
    )
    unknown = httpx.get(
        f"{server.base_url}/responses/resp_{'0' * 24}",
        headers={"authorization": f"Bearer {second}"},
    )
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["message"].replace(made.id, "ID") == unknown.json()["error"][
        "message"
    ].replace(f"resp_{'0' * 24}", "ID")
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(made.id)
    with pytest.raises(openai.BadRequestError):
        theirs.responses.create(input="Hi", previous_response_id=made.id, **SETTINGS)
    assert mine.responses.retrieve(made.id).id == made.id  # still there


def test_without_a_database_nothing_is_stored(tmp_path: Path) -> None:
    server = start_server("--no-metering", "--parallel", "1", "--ctx-size", "2048")
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
            made = client.responses.create(input=QUESTION, **SETTINGS)
            assert made.store is False
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(input=QUESTION, store=True, **SETTINGS)
            assert refused.value.body["param"] == "store"  # type: ignore[index]
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(made.id)
    finally:
        server.stop()
