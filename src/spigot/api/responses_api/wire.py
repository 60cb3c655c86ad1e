"""The ``POST /v1/responses`` body: the fields spigot honours, each other known one refused.

A Responses body shares no sampling fields with chat beyond ``model``,
``temperature``, ``top_p``, ``stream`` and ``user``: it has no ``n``, ``stop``,
``logit_bias`` or penalties, so it does not inherit ``SamplingRequest``; it
only has what the shared pipeline asks of a body (``GenerationBody``).

Refused with a 400 naming the parameter (never accepted and ignored): built-in
tools (web search, file search, computer use, code interpreter, MCP, image
generation...), image, file and audio input, ``conversation``, ``background``,
``prompt`` templates, reasoning effort, logprobs (``include``,
``top_logprobs``), ``truncation: "auto"``, service tiers other than the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from spigot.api.structured import TextFormat
from spigot.api.unsupported import Unsupported
from spigot.errors import InvalidRequest, UnsupportedParameter

# OpenAI's own floor: "Invalid 'max_output_tokens': integer below minimum value."
MIN_OUTPUT_TOKENS = 16
TEXT_PARTS = ("input_text", "output_text")
MESSAGE_ROLES = ("user", "system", "developer", "assistant")


class _Wire(BaseModel):
    # spigot.api.schemas' config: strict types, unknown fields dropped as read.
    model_config = ConfigDict(extra="ignore", strict=True)


class InputPart(_Wire):
    # Any type parses, so that an image or file part is refused by name (``check``).
    type: str
    text: str | None = None


class InputItem(_Wire):
    """One input item: a message (``type`` may be left out), a ``function_call`` the
    model made earlier, or a ``function_call_output``. Output items of an earlier
    response, sent back as input, parse as these (their extra fields are dropped)."""

    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None

    def text(self) -> str:
        return _joined(self.content)

    def output_text(self) -> str:
        return _joined(self.output)

    def stored(self) -> dict[str, Any]:
        """The item as kept with a stored response and replayed by ``previous_response_id``."""
        if self.type == "message":
            return {"type": "message", "role": self.role, "content": self.text()}
        if self.type == "function_call":
            return {
                "type": "function_call",
                "call_id": self.call_id,
                "name": self.name,
                "arguments": self.arguments,
            }
        return {
            "type": "function_call_output",
            "call_id": self.call_id,
            "output": self.output_text(),
        }


def _joined(content: str | list[InputPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


class FunctionTool(_Wire):
    """A function tool in the Responses API's flat shape (chat nests it under ``function``)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def echoed(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": True if self.strict is None else self.strict,
        }


class NamedToolChoice(_Wire):
    type: str
    name: str | None = None


class TextConfig(_Wire):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesStreamOptions(_Wire):
    include_obfuscation: bool | None = None


class ResponsesRequest(_Wire):
    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=MIN_OUTPUT_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    # Hints spigot has no use for, accepted as OpenAI-compatible servers do.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @property
    def include_usage(self) -> bool:
        return True  # every Responses stream ends with the usage in its last event

    @property
    def items(self) -> list[InputItem]:
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [InputItem(role="user", content=self.input)]
        return list(self.input)

    @property
    def named_tool(self) -> str | None:
        choice = self.tool_choice
        return choice.name if isinstance(choice, NamedToolChoice) else None

    def check(self) -> None:
        """Rules across fields and inside lists: 400 naming the parameter."""
        if self.input is None and self.previous_response_id is None:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input")
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                _check_item(item, f"input[{i}]")
        for i, tool in enumerate(self.tools or ()):
            if tool.type != "function":
                raise UnsupportedParameter(
                    f"Tools of type '{tool.type}' are not supported by this server; only "
                    "'function' tools are.",
                    param=f"tools[{i}].type",
                )
            if not tool.name:
                raise InvalidRequest(
                    f"Missing required parameter: 'tools[{i}].name'.", param=f"tools[{i}].name"
                )
        self._check_tool_choice()
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise UnsupportedParameter(
                "Unsupported parameter: 'text.verbosity' other than 'medium' is not supported "
                "by this server.",
                param="text.verbosity",
            )
        if self.stream_options is not None:
            if not self.stream:
                raise InvalidRequest(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    param="stream_options",
                )
            if self.stream_options.include_obfuscation:
                raise UnsupportedParameter(
                    "Stream obfuscation is not supported by this server: set "
                    "'stream_options.include_obfuscation' to false or leave it out.",
                    param="stream_options.include_obfuscation",
                )

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        names = {tool.name for tool in self.tools or ()}
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise InvalidRequest(
                    f"Invalid value for 'tool_choice': '{choice}'. Supported values are: "
                    "'none', 'auto' and 'required'.",
                    param="tool_choice",
                )
            if choice == "required" and not names:
                raise InvalidRequest(
                    "Tool choice 'required' needs at least one tool in 'tools'.",
                    param="tool_choice",
                )
        elif choice is not None:
            if choice.type != "function":
                raise UnsupportedParameter(
                    f"Unsupported parameter: 'tool_choice' of type '{choice.type}' is not "
                    "supported by this server; only function tools are.",
                    param="tool_choice",
                )
            if choice.name not in names:
                raise InvalidRequest(
                    f"Tool choice '{choice.name}' not found in 'tools' parameter.",
                    param="tool_choice",
                )


def _check_item(item: InputItem, where: str) -> None:
    if item.type == "message":
        if item.role not in MESSAGE_ROLES:
            raise InvalidRequest(
                f"Invalid value for '{where}.role': {item.role!r}. Supported values are: "
                + ", ".join(f"'{role}'" for role in MESSAGE_ROLES)
                + ".",
                param=f"{where}.role",
            )
        if item.content is None:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.content'.", param=f"{where}.content"
            )
        _check_parts(item.content, f"{where}.content")
    elif item.type == "function_call":
        for name in ("call_id", "name", "arguments"):
            if getattr(item, name) is None:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.{name}'.", param=f"{where}.{name}"
                )
    elif item.type == "function_call_output":
        for name in ("call_id", "output"):
            if getattr(item, name) is None:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.{name}'.", param=f"{where}.{name}"
                )
        _check_parts(item.output, f"{where}.output")
    else:
        raise UnsupportedParameter(
            f"Input items of type '{item.type}' are not supported by this server; only "
            "'message', 'function_call' and 'function_call_output' are.",
            param=f"{where}.type",
        )


def _check_parts(content: str | list[InputPart] | None, where: str) -> None:
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS:
            raise UnsupportedParameter(
                f"Content parts of type '{part.type}' are not supported by this model; only "
                "'input_text' and 'output_text' parts are.",
                param=f"{where}[{j}].type",
            )
        if part.text is None:
            raise InvalidRequest(
                f"Missing required parameter: '{where}[{j}].text'.", param=f"{where}[{j}].text"
            )


def _off(value: Any, body: Mapping[str, Any]) -> bool:
    return value is None or value is False or value == [] or value == {}


def _no_reasoning(value: Any, body: Mapping[str, Any]) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, dict)
        and value.get("effort") in (None, "none")
        and value.get("summary") is None
        and value.get("generate_summary") is None
    )


# Known Responses fields spigot does not honour; each entry's harmless values are its "off".
RESPONSES: dict[str, Unsupported] = {
    "background": Unsupported(_off, "background responses"),
    "background_options": Unsupported(_off, "background responses"),
    "conversation": Unsupported(_off, "conversations"),
    "prompt": Unsupported(_off, "prompt templates"),
    "reasoning": Unsupported(_no_reasoning, "reasoning effort and summaries"),
    "include": Unsupported(_off, "additional output data"),
    "top_logprobs": Unsupported(lambda v, b: v in (None, 0), "token logprobs"),
    "truncation": Unsupported(lambda v, b: v in (None, "disabled"), "automatic truncation"),
    "service_tier": Unsupported(lambda v, b: v in (None, "auto", "default"), "service tiers"),
    "max_tool_calls": Unsupported(_off, "built-in tool call limits"),
    "context_management": Unsupported(_off, "context management"),
    "moderation": Unsupported(_off, "moderation"),
    "prompt_cache_retention": Unsupported(_off, "prompt cache retention"),
    "prompt_cache_options": Unsupported(_off, "prompt cache options"),
    "image": Unsupported(_off, "image options"),
    "access_programs": Unsupported(_off, "access programs"),
}

# The echo of a format when none was asked.
TEXT_DEFAULT: dict[str, Any] = {"format": {"type": "text"}, "verbosity": "medium"}
