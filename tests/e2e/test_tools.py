"""Tool calls against the real server and model, through the openai SDK.

The embedded SmolLM2's template knows no tools, so they reach it in the generic
format (docs/tools.md) and its calls are enforced by the grammar: at temperature 1
every call names an allowed function and its arguments match the schema. Schemas
bound every string so that a call fits well inside ``max_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.server import RunningServer, start_server
from tests.e2e.test_structured_output import violations

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
ASK = [
    {"role": "system", "content": "You are a helpful assistant with tools."},
    {"role": "user", "content": "What is the weather in Paris, and what time is it there?"},
]
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 12}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": WEATHER_PARAMS, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.",
                                      "parameters": TIME_PARAMS}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ROOM = 80


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


def ask(client: openai.OpenAI, *, stream: bool, **extra: Any) -> tuple[str | None, list[Any], str]:
    """(content, [(name, arguments)], finish_reason), assembled from the deltas if streamed."""
    args: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": ROOM}
    args.update(extra)
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        return choice.message.content, calls, choice.finish_reason
    text, finish = "", ""
    assembled: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(stream=True, **args):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or ():
            if call.id is not None:
                assert call.index not in assembled and call.type == "function"
                assert call.function is not None and call.function.arguments == ""
                assembled[call.index] = [call.function.name or "", ""]
            else:
                assert call.function is not None and call.function.name is None
            assembled[call.index][1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    calls = [tuple(assembled[i]) for i in sorted(assembled)]
    return (text or None) if calls else text, calls, finish


def assert_valid(calls: list[Any], allowed: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in allowed
        assert violations(json.loads(arguments), SCHEMAS[name]) == [], arguments


def test_named_function_over_fifty_seeds(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}

    def one(seed: int) -> None:
        content, calls, finish = ask(
            client, stream=seed % 2 == 0, tool_choice=choice, temperature=1.0, seed=seed
        )
        assert finish == "tool_calls" and content is None, (seed, content, calls)
        assert len(calls) == 1
        assert_valid(calls, {"get_weather"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(50)))


def test_required_over_fifty_seeds(client: openai.OpenAI) -> None:
    def one(seed: int) -> None:
        parallel = seed % 3 != 0
        content, calls, finish = ask(
            client,
            stream=seed % 2 == 1,
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=1.0,
            seed=seed,
        )
        assert content is None, (seed, content)
        if finish == "length":  # parallel calls may run out of room; each one so far is whole
            calls = calls[:-1]
        else:
            assert finish == "tool_calls", (seed, finish)
            assert parallel or len(calls) == 1
        if calls:
            assert_valid(calls, {"get_weather", "get_time"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(50)))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_calls_equal_the_non_streamed(client: openai.OpenAI, seed: int) -> None:
    args = {"tool_choice": "required", "temperature": 1.0, "seed": seed}
    streamed = ask(client, stream=True, **args)
    whole = ask(client, stream=False, **args)
    assert streamed == whole


def test_none_never_calls(client: openai.OpenAI) -> None:
    for seed in range(8):
        content, calls, finish = ask(
            client, stream=seed % 2 == 0, tool_choice="none", temperature=1.0, seed=seed
        )
        assert calls == [] and finish in ("stop", "length") and isinstance(content, str)


def test_auto_gives_text_or_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(12):
        _, calls, finish = ask(client, stream=seed % 2 == 0, temperature=1.0, seed=seed)
        if calls and finish == "tool_calls":
            assert_valid(calls, {"get_weather", "get_time"})
        else:
            assert finish in ("stop", "length", "tool_calls")


def test_a_conversation_with_calls_and_results_completes(client: openai.OpenAI) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather",
                              "arguments": '{"city":"Paris","unit":"celsius"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_time", "arguments": '{"zone":"CET"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    ]  # fmt: skip
    reply = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=40, temperature=0
    )
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 100  # the tools were rendered


def test_bad_tools_are_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "x"}},
        )
    assert caught.value.body["param"] == "tool_choice"  # type: ignore[index]


class Weather(BaseModel):
    city: str = Field(max_length=16)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


def test_the_sdk_stream_helper_and_parse(client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(
        model=MODEL, messages=ASK, tools=[tool], tool_choice=named, max_tokens=ROOM, seed=4
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert isinstance(call.function.parsed_arguments, Weather)
    parsed = client.chat.completions.parse(
        model=MODEL, messages=ASK, tools=[tool], tool_choice=named, max_tokens=ROOM, seed=5
    )
    call = parsed.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert isinstance(call.function.parsed_arguments, Weather)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    policy = tmp_path_factory.mktemp("guard") / "guard.toml"
    policy.write_text(
        '[[rule]]\nid = "no-secret"\nkind = "phrase"\nphrases = ["SECRETCITY"]\naction = "block"\n'
        'applies_to = ["output", "input"]\n',
        encoding="utf-8",
    )
    srv = start_server("--parallel", "2", "--no-prefix-cache", "--guard", str(Path(policy)))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_an_output_rule_inside_the_arguments_blocks_them(
    guarded: RunningServer, stream: bool
) -> None:
    # The only city the schema allows is the blocked phrase: the rule must catch it
    # inside the arguments, and nothing of it may reach the client.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["SECRETCITY"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    with openai.OpenAI(base_url=guarded.base_url, api_key="unused", max_retries=0) as client:
        args = {"model": MODEL, "messages": ASK, "tools": tools, "tool_choice": "required"}
        if stream:
            chunks = list(client.chat.completions.create(stream=True, max_tokens=ROOM, **args))
            wire = json.dumps([c.model_dump() for c in chunks])
            finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
        else:
            reply = client.chat.completions.create(max_tokens=ROOM, **args)
            wire, finish = reply.model_dump_json(), reply.choices[0].finish_reason
    assert finish == "content_filter"
    assert "SECRET" not in wire


def test_an_input_rule_inside_earlier_call_arguments_refuses_the_request(
    guarded: RunningServer,
) -> None:
    # Arguments of a call in the history are model input like any content: a rule that
    # would refuse the phrase in a message refuses it there too, on both endpoints.
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"SECRETCITY"}'},
    }
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    with openai.OpenAI(base_url=guarded.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as chat_refusal:
            client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8)
        with pytest.raises(openai.BadRequestError) as responses_refusal:
            client.responses.create(
                model=MODEL,
                input=[
                    {"role": "user", "content": "Weather?"},
                    {
                        "type": "function_call",
                        "call_id": "call_1",
                        "name": "get_weather",
                        "arguments": '{"city":"SECRETCITY"}',
                    },
                    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                ],
                max_output_tokens=16,
                store=False,
            )
    for refusal in (chat_refusal.value, responses_refusal.value):
        assert refusal.code == "content_filter", refusal.body
        assert "no-secret" in str(refusal.body)
    # Without the phrase the same conversation is served: the rule, not the shape, refused.
    clean = json.loads(json.dumps(history))
    clean[-2]["tool_calls"][0]["function"]["arguments"] = '{"city":"Paris"}'
    with openai.OpenAI(base_url=guarded.base_url, api_key="unused", max_retries=0) as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=clean, tools=TOOLS, max_tokens=8
        )
    assert reply.choices[0].finish_reason is not None
