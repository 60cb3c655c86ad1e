"""Tools in chat completions: the wire fields, their checks, and the grammar of a call.

A request's ``tools`` are shown to the model (the engine renders them, with the
model's template or the generic format of ``spigot.engine.tool_format``), and
``tool_choice`` says what the model may answer:

    none       tools are shown, no call is parsed out: the reply is text
    auto       text, or calls: once the model writes ``<tool_call>`` the rest must
               be calls (a lazy grammar, ``Constraint.trigger``)
    required   one call (one or more with ``parallel_tool_calls``), nothing else
    {function} one call of that function

Every local model writes calls in one format (Hermes/Qwen style), whatever its
template: ``<tool_call>\\n{"name":"f","arguments":{...}}\\n</tool_call>``, calls
separated by one newline. The grammar fixes the key order and compact JSON (no
free whitespace: a small model free to add it loops on newlines), and each
function's ``arguments`` follow its ``parameters`` schema: checked here with the
same gates as ``response_format`` (``spigot.api.structured``), OpenAI's strict
rules where ``strict: true``. ``spigot.api.tool_calls`` parses calls out of the
streamed text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from llguidance import LLMatcher
from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from spigot.api.structured import check_enforceable, check_strict_schema
from spigot.engine.types import Constraint
from spigot.errors import InvalidRequest

# Also spelled in spigot.engine.tool_format (the API may not import it); a unit
# test keeps the two the same.
OPEN = "<tool_call>"
CLOSE = "</tool_call>"
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# What a function without ``parameters`` takes: nothing (OpenAI's reading).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# Compact JSON inside each call, as structured.py asks of response formats.
_COMPACT = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
}

ChoiceMode = Literal["none", "auto", "required", "named"]


class _Wire(BaseModel):
    # spigot.api.schemas._Wire's config, repeated: schemas imports this module.
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionDefinition(_Wire):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise PydanticCustomError(
                "string_pattern_mismatch",
                "string does not match pattern. Expected a string that matches the "
                "pattern '^[a-zA-Z0-9_-]{1,64}$'.",
            )
        return name


class ToolDefinition(_Wire):
    # Any type parses, so that another type is refused by name (``tool_request``).
    type: str
    function: FunctionDefinition | None = None


# A string, or an object: checked by ``tool_request`` so that every mistake is a
# 400 naming ``tool_choice`` (pydantic would name a union member).
ToolChoice = str | dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A request's tools as the engine gets them, and what the model may answer."""

    tools: tuple[dict[str, Any], ...]  # OpenAI tool objects, for the chat template
    functions: tuple[FunctionDefinition, ...]
    choice: ChoiceMode
    named: str | None  # the one function a named choice allows
    parallel: bool
    wire_choice: Any  # tool_choice as sent (or "auto"), for an engine elsewhere

    @property
    def constrained(self) -> bool:
        return self.choice != "none"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)

    def openai(self) -> dict[str, Any]:
        return {
            "tools": list(self.tools),
            "tool_choice": self.wire_choice,
            "parallel_tool_calls": self.parallel,
        }


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def tool_request(
    tools: Sequence[ToolDefinition] | None, choice: ToolChoice | None, parallel: bool | None
) -> ToolRequest | None:
    """The tools and choice of a request (400 naming the bad field), None without tools."""
    functions: list[FunctionDefinition] = []
    for i, tool in enumerate(tools or ()):
        if tool.type != "function":
            raise _bad(
                f"Invalid value for 'tools[{i}].type': only 'function' tools are supported "
                f"by this server (got '{tool.type}').",
                f"tools[{i}].type",
            )
        if tool.function is None:
            raise _bad(
                f"Missing required parameter: 'tools[{i}].function'.", f"tools[{i}].function"
            )
        if tool.function.name in (f.name for f in functions):
            raise _bad(
                f"Invalid 'tools': the function name '{tool.function.name}' is declared twice.",
                f"tools[{i}].function.name",
            )
        functions.append(tool.function)
    mode, named = _choice(choice, {f.name for f in functions})
    if not functions:
        if mode in ("required", "named"):
            raise _bad(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                "'tools' are specified.",
                "tool_choice",
            )
        return None
    wire = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions]
    return ToolRequest(
        tools=tuple(wire),
        functions=tuple(functions),
        choice=mode,
        named=named,
        parallel=True if parallel is None else parallel,
        wire_choice="auto" if choice is None else choice,
    )


def _choice(choice: ToolChoice | None, names: set[str]) -> tuple[ChoiceMode, str | None]:
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice in ("none", "auto", "required"):
            return choice, None  # type: ignore[return-value]
        raise _bad(
            f"Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a "
            f"function, got '{choice[:100]}'.",
            "tool_choice",
        )
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise _bad(
            "Invalid value for 'tool_choice': an object must be "
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    if name not in names:
        raise _bad(
            f"Invalid value for 'tool_choice': no function named '{name[:100]}' is in 'tools'.",
            "tool_choice",
        )
    return "named", name


def check_history(messages: Sequence[Mapping[str, Any]]) -> None:
    """Tool turns answer a call made before them; 400 naming the message otherwise."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if message["role"] != "assistant":
                raise _bad(
                    f"Invalid 'messages[{i}].tool_calls': only assistant messages make tool calls.",
                    f"messages[{i}].tool_calls",
                )
            called.add(call["id"])
        if message["role"] != "tool":
            continue
        call_id = message.get("tool_call_id")
        if call_id is None:
            raise _bad(
                f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                f"messages[{i}].tool_call_id",
            )
        if call_id not in called:
            raise _bad(
                f"Invalid parameter: messages with role 'tool' must be a response to a "
                f"preceding message with 'tool_calls'; 'messages[{i}].tool_call_id' "
                f"({call_id[:100]!r}) answers no earlier call.",
                f"messages[{i}].tool_call_id",
            )


# -- the grammar ----------------------------------------------------------------------


def tool_constraint(request: ToolRequest) -> Constraint | None:
    """The grammar the calls must match (None for ``none``); 400 for a ``parameters``
    schema that cannot be enforced. CPU work: the prep pool runs it."""
    if not request.constrained:
        return None
    allowed = [
        (i, f)
        for i, f in enumerate(request.functions)
        if request.named is None or f.name == request.named
    ]
    schemas = []
    for i, function in allowed:
        schema = function.parameters if function.parameters is not None else NO_PARAMETERS
        param = f"tools[{i}].function.parameters"
        if function.strict:
            check_strict_schema(schema, param=param, name=function.name, what="function")
        check_enforceable(schema, param=param, name=function.name, what="function")
        schemas.append((function.name, schema))
    many = request.parallel and request.choice != "named"
    try:
        grammar = _grammar(calls_lark(schemas, many=many))
    except ValueError as exc:
        raise _bad(f"The tools cannot be enforced: {str(exc)[:1000]}", "tools") from None
    trigger = OPEN if request.choice == "auto" else None
    return Constraint(grammar=grammar, trigger=trigger, openai=request.openai())


def calls_lark(schemas: Sequence[tuple[str, Any]], *, many: bool) -> str:
    """The lark grammar of the calls: each function's object with its own ``%json``
    rule for the arguments, so each schema keeps its own root for ``$ref``."""
    rules = []
    for k, (name, schema) in enumerate(schemas):
        body = {k: v for k, v in schema.items() if k != "x-guidance"}
        body["x-guidance"] = _COMPACT
        head = orjson.dumps(f'{{"name":"{name}","arguments":').decode()
        rules.append(f'f{k}: {head} a{k} "}}"\na{k}: %json {orjson.dumps(body).decode()}')
    start = 'start: call ("\\n" call)*' if many else "start: call"
    alternatives = " | ".join(f"f{k}" for k in range(len(schemas)))
    call = (
        f"call: {orjson.dumps(OPEN + chr(10)).decode()} ({alternatives}) "
        + orjson.dumps(chr(10) + CLOSE).decode()
    )
    return "\n".join([start, call, *rules]) + "\n"


@functools.lru_cache(maxsize=64)
def _grammar(lark: str) -> str:
    """Compiled once per tool set: clients send the same tools request after request."""
    grammar = LLMatcher.grammar_from_lark(lark)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(messages[0] if messages else "the grammar is not valid")
    return grammar
