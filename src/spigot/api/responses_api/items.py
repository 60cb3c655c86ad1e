"""Items as chat messages, and the response object with the request's settings echoed.

The engine renders conversations in chat's shape, so every item becomes an
OpenAI chat message: a message keeps its role and text; ``function_call``
items become an assistant message's ``tool_calls`` (consecutive calls share
one message, as the model emitted them together); a ``function_call_output``
becomes a ``tool`` message answering its ``call_id``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from spigot.api.responses_api.wire import TEXT_DEFAULT, ResponsesRequest


def chat_messages(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored-shape items (``InputItem.stored`` or output items) as chat messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])}
            )
    return messages


def _text(content: Any) -> str:
    """A message's text: a string, or its text parts joined (output items keep parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content)


def usage_of(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat's usage (``streaming.usage_body``) in the Responses API's names; same counts."""
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        },
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


def settings_echo(body: ResponsesRequest, *, stored: bool) -> dict[str, Any]:
    """The request's settings as every response object repeats them (defaults filled in,
    as OpenAI's objects carry them)."""
    text = dict(TEXT_DEFAULT)
    if body.text is not None:
        if body.text.format is not None:
            text["format"] = body.text.format.model_dump(by_alias=True, exclude_none=True)
        if body.text.verbosity is not None:
            text["verbosity"] = body.text.verbosity
    choice: Any = body.tool_choice
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        choice = {"type": "function", "name": choice.name}
    return {
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "metadata": body.metadata or {},
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": body.safety_identifier,
        "service_tier": "default",
        "store": stored,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": text,
        "tool_choice": choice,
        "tools": [tool.echoed() for tool in body.tools or ()],
        "top_logprobs": 0,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "user": body.user,
    }


def response_object(
    *,
    response_id: str,
    created_at: int,
    model: str,
    settings: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    error: dict[str, Any] | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": completed_at,
        "model": model,
        "output": output,
        "usage": usage,
        **settings,
        "error": error,
        "incomplete_details": None if incomplete_reason is None else {"reason": incomplete_reason},
    }
