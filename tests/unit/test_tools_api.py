"""Tools through the real app over the scripted engine: validation, rendering, grammars,
the wire shapes of calls, output rules inside arguments, an engine elsewhere's payload."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llguidance import LLMatcher

from spigot.api.tools import OPEN, ToolDefinition, tool_constraint, tool_request
from spigot.engine.llamacpp.chat_template import CHATML_TEMPLATE, ChatTemplate
from spigot.engine.tool_format import for_template, generic_messages
from spigot.engine.types import GenRequest, Prompt, SamplingParams
from spigot.guard import Policy
from spigot.upstream.payload import body_of
from tests.unit.fake_engine import ScriptedEngine
from tests.unit.test_api_with_fake_engine import chunks, events, serve
from tests.unit.test_structured import accepts

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
]  # fmt: skip


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "scripted", "messages": ASK, "tools": [WEATHER_TOOL, TIME_TOOL], **extra}


def constraint_of(tools: list[dict[str, Any]], choice: Any, parallel: bool | None = None) -> Any:
    request = tool_request([ToolDefinition.model_validate(t) for t in tools], choice, parallel)
    assert request is not None
    return tool_constraint(request)


# -- grammars ---------------------------------------------------------------------------


def test_required_grammar_allows_exactly_calls_of_declared_tools() -> None:
    c = constraint_of([WEATHER_TOOL, TIME_TOOL], "required")
    assert c.trigger is None
    assert accepts(c.grammar, CALL_TEXT)
    assert accepts(
        c.grammar, CALL_TEXT + '\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    )
    assert not accepts(c.grammar, CALL_TEXT.replace('"Paris"', "1"))  # the schema holds
    assert not accepts(c.grammar, CALL_TEXT.replace('{"city"', '{ "city"'))  # compact
    assert not accepts(c.grammar, "Sure. " + CALL_TEXT)
    one = constraint_of([WEATHER_TOOL, TIME_TOOL], "required", parallel=False)
    assert not accepts(one.grammar, CALL_TEXT + "\n" + CALL_TEXT)
    assert c.openai == {
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": True,
    }


def test_named_and_auto_grammars() -> None:
    named = constraint_of(
        [WEATHER_TOOL, TIME_TOOL], {"type": "function", "function": {"name": "get_time"}}
    )
    assert accepts(named.grammar, '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>')
    assert not accepts(named.grammar, CALL_TEXT)
    auto = constraint_of([WEATHER_TOOL], "auto")
    assert auto.trigger == OPEN and accepts(auto.grammar, CALL_TEXT)
    assert constraint_of([WEATHER_TOOL], "none") is None


def test_refs_in_parameters_resolve_in_their_own_schema() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"c": {"type": "string", "enum": ["a", "b"]}},
        "properties": {"x": {"$ref": "#/$defs/c"}}, "required": ["x"],
        "additionalProperties": False}}}  # fmt: skip
    c = constraint_of([tool], "required")
    assert accepts(c.grammar, '<tool_call>\n{"name":"f","arguments":{"x":"a"}}\n</tool_call>')
    assert not accepts(c.grammar, '<tool_call>\n{"name":"f","arguments":{"x":"c"}}\n</tool_call>')
    assert not LLMatcher.validate_grammar_with_warnings(c.grammar)[0]


# -- validation -----------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True,
      "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f",
      "parameters": {"type": "object",
                     "properties": {"a": {"type": "string", "format": "nonsense-x"}}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"ignore_eos": True, "tool_choice": "required"}, "ignore_eos"),
    ({"min_tokens": 3, "response_format": {"type": "json_object"}, "tools": None}, "min_tokens"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), BAD)
async def test_mistakes_are_400_naming_the_field(extra: dict[str, Any], param: str) -> None:
    async with serve(ScriptedEngine()) as client:
        reply = await client.post("/v1/chat/completions", json=body(**extra))
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()


# -- rendering ------------------------------------------------------------------------------


def test_generic_history_renders_with_chatml() -> None:
    template = ChatTemplate(CHATML_TEMPLATE, bos_token="", eos_token="")
    turns = generic_messages(HISTORY, [WEATHER_TOOL, TIME_TOOL])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    text = template.render(turns)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER_TOOL, separators=(",", ":")) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call><|im_end|>'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nnoon\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text
    # Without a system message the tools get one of their own.
    assert generic_messages(ASK, [TIME_TOOL])[0]["role"] == "system"


def test_a_template_that_knows_tools_gets_them_as_they_are() -> None:
    turns, tools = for_template(HISTORY, [WEATHER_TOOL], knows_tools=True)
    assert tools == [WEATHER_TOOL]
    assert turns[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert turns[3] == HISTORY[3]


async def test_the_engine_gets_the_messages_and_tools() -> None:
    engine = ScriptedEngine(pieces=["ok"])
    async with serve(engine) as client:
        reply = await client.post("/v1/chat/completions", json=body(messages=HISTORY))
    assert reply.status_code == 200, reply.text
    messages, tools = engine.chats[-1]
    assert tools == [WEATHER_TOOL, TIME_TOOL]
    assert messages[2]["tool_calls"] == HISTORY[2]["tool_calls"] and messages[2]["content"] == ""
    assert messages[3]["tool_call_id"] == "call_1"


# -- the wire -------------------------------------------------------------------------------


def call_pieces(request: GenRequest) -> list[str]:
    return ["Sure", "!\n", *[CALL_TEXT[i : i + 3] for i in range(0, len(CALL_TEXT), 3)]]


async def test_streamed_calls_are_openais_chunks_and_match_the_message() -> None:
    engine = ScriptedEngine(pieces=call_pieces)
    async with serve(engine) as client:
        streamed = chunks(events(await client.post("/v1/chat/completions", json=body(stream=True))))
        whole = (await client.post("/v1/chat/completions", json=body())).json()
    assert engine.constraints[-1].trigger == OPEN
    deltas = [c["choices"][0]["delta"] for c in streamed if c["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0] == [{"index": 0, "id": calls[0][0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]  # fmt: skip
    assert all(
        set(c[0]) == {"index", "function"} and set(c[0]["function"]) == {"arguments"}
        for c in calls[1:]
    )
    arguments = "".join(c[0]["function"]["arguments"] for c in calls)
    assert arguments == '{"city":"Paris"}'
    assert "".join(d.get("content") or "" for d in deltas) == "Sure!\n"
    assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] == "Sure!\n"
    assert [(c["type"], c["function"]) for c in message["tool_calls"]] == [
        ("function", {"name": "get_weather", "arguments": arguments})
    ]


async def test_only_calls_give_null_content() -> None:
    engine = ScriptedEngine(pieces=[CALL_TEXT])
    async with serve(engine) as client:
        whole = (
            await client.post("/v1/chat/completions", json=body(tool_choice="required"))
        ).json()
    assert engine.constraints[-1].trigger is None
    assert whole["choices"][0]["message"]["content"] is None


async def test_none_shows_tools_and_parses_nothing() -> None:
    engine = ScriptedEngine(pieces=[CALL_TEXT])
    async with serve(engine) as client:
        whole = (await client.post("/v1/chat/completions", json=body(tool_choice="none"))).json()
    assert engine.constraints == [] and engine.chats[-1][1] == [WEATHER_TOOL, TIME_TOOL]
    assert whole["choices"][0]["message"]["content"] == CALL_TEXT
    assert "tool_calls" not in whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "stop"


async def test_an_engine_elsewhere_gets_a_call_checked_whole() -> None:
    loose = '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>'
    engine = ScriptedEngine.remote(
        "scripted", pieces=["x ", loose, " <tool_call>{bad}</tool_call>"]
    )
    async with serve(engine) as client:
        whole = (await client.post("/v1/chat/completions", json=body())).json()
    message = whole["choices"][0]["message"]
    assert message["content"] == "x  <tool_call>{bad}</tool_call>"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo"}'


async def test_an_output_rule_inside_the_arguments_blocks_them() -> None:
    rules = Policy.from_toml(
        '[[rule]]\nid = "no-paris"\nkind = "phrase"\nphrases = ["Paris"]\naction = "block"\n'
    )
    engine = ScriptedEngine(pieces=call_pieces)
    async with serve(engine, guard=rules) as client:
        streamed = chunks(events(await client.post("/v1/chat/completions", json=body(stream=True))))
        whole = (await client.post("/v1/chat/completions", json=body())).json()
    raw = json.dumps(streamed)
    assert "Paris" not in raw and "Par" not in raw
    assert streamed[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert whole["choices"][0]["finish_reason"] == "content_filter"
    assert "Par" not in json.dumps(whole["choices"])


def test_upstream_payload_carries_tools_and_choice() -> None:
    prompt = Prompt(token_count=3, messages=tuple(ASK), count_exact=False, tools=(WEATHER_TOOL,))
    none = body_of(GenRequest("r", prompt, SamplingParams(max_tokens=5)), "m")
    assert none["tools"] == [WEATHER_TOOL] and none["tool_choice"] == "none"
    constraint = constraint_of([WEATHER_TOOL], "required", parallel=False)
    params = SamplingParams(max_tokens=5, constraint=constraint)
    forced = body_of(GenRequest("r", prompt, params), "m")
    assert forced["tool_choice"] == "required" and forced["parallel_tool_calls"] is False
