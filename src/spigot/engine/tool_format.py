"""Tools and tool turns for a chat template, in the model's format or a generic one.

A request's conversation reaches an engine as OpenAI chat messages: assistant
turns may carry ``tool_calls`` (``{id, type, function: {name, arguments}}``,
``arguments`` a JSON string) and ``tool`` turns a ``tool_call_id``. A template
that knows tools (its source mentions ``tools``, as Qwen's, Hermes' and
Llama 3.1's do) gets them as they are, with ``arguments`` parsed into objects
(the Hugging Face convention such templates expect) and ``tools`` beside the
messages. Any other template (the embedded SmolLM2's, ChatML) gets plain
turns in the generic format, Hermes/Qwen style:

* the tools, in a system message (after the first system message's text if the
  conversation opens with one)::

      # Tools
      You may call one or more functions to assist with the user query.
      You are provided with function signatures within <tools></tools> XML tags:
      <tools>
      {"type":"function","function":{"name":...,"description":...,"parameters":...}}
      </tools>
      For each function call, return a json object with function name and
      arguments within <tool_call></tool_call> XML tags:
      <tool_call>
      {"name": <function-name>, "arguments": <args-json-object>}
      </tool_call>

* an assistant turn's calls, as the text the model writes for them (below);
* tool results, as user turns ``<tool_response>\\n...\\n</tool_response>`` (one
  turn for consecutive results), so that every template renders them.

Whatever the template, a local model's calls are read back in one format,
``<tool_call>\\n{"name":"f","arguments":{...}}\\n</tool_call>``, calls separated
by a newline: the API's grammar makes the model write exactly that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"

_INSTRUCTIONS = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_SYSTEM_ROLES = ("system", "developer")


def template_knows_tools(source: str) -> bool:
    """Whether a chat template renders ``tools`` itself."""
    return "tools" in source


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object where its JSON string is one, else as sent."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    return f"{OPEN}\n{_compact({'name': name, 'arguments': _arguments(arguments)})}\n{CLOSE}"


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    return _INSTRUCTIONS.format(tools="\n".join(_compact(dict(t)) for t in tools))


def for_template(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    knows_tools: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for a template: as they are where it knows tools, else in
    the generic format (tools then ``None``: they are in the messages)."""
    if knows_tools:
        return [_with_parsed_arguments(m) for m in messages], (
            [dict(t) for t in tools] if tools else None
        )
    return generic_messages(messages, tools), None


def _with_parsed_arguments(message: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                **call,
                "function": {
                    **call["function"],
                    "arguments": _arguments(call["function"]["arguments"]),
                },
            }
            for call in message["tool_calls"]
        ]
    return out


def generic_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Plain system/user/assistant turns that any template renders (module docstring)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            response = f"{RESPONSE_OPEN}\n{message.get('content') or ''}\n{RESPONSE_CLOSE}"
            previous = out[-1] if out else None
            if previous is not None and previous.get("_tool_responses"):
                previous["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
            continue
        plain = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        calls = message.get("tool_calls") or ()
        if calls:
            texts = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            content = plain.get("content") or ""
            plain["content"] = "\n".join([content, *texts] if content else texts)
        if plain.get("content") is None:
            plain["content"] = ""
        out.append(plain)
    for message in out:
        message.pop("_tool_responses", None)
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0]["role"] in _SYSTEM_ROLES:
            first = out[0]["content"]
            out[0]["content"] = f"{first}\n\n{prompt}" if first else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
