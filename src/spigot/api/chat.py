"""POST /v1/chat/completions"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api import unsupported
from spigot.api.generation import JobContext, Prepared, serve_generation
from spigot.api.guarding import guard_messages
from spigot.api.holdback import OutputStage
from spigot.api.output_constraint import output_constraint, tool_call_stages
from spigot.api.schemas import ChatCompletionRequest
from spigot.api.state import resolve_max_tokens
from spigot.api.streaming import finish_reason_of, with_extras
from spigot.api.tools import ToolRequest
from spigot.api.wire_events import ChunkEvents
from spigot.engine.protocol import Engine, OutputStream, PromptError
from spigot.engine.types import GenOutput, GenRequest, TokenLogprob, ToolCallDelta
from spigot.errors import InvalidRequest

router = APIRouter()


def _logprob_entry(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                **_logprob_entry(e.token, e.token_bytes, e.logprob),
                "top_logprobs": [_logprob_entry(*alt) for alt in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def tool_call_deltas(deltas: Iterable[ToolCallDelta]) -> list[dict[str, Any]]:
    """A chunk's ``delta.tool_calls`` as OpenAI sends them: a call's first entry has its
    id, type, name and ``"arguments": ""``; argument fragments follow in entries of the
    same index (one per call in a chunk, after its first entry when both are here)."""
    entries: list[dict[str, Any]] = []
    fragments: dict[int, dict[str, Any]] = {}
    for d in deltas:
        if d.name is not None:
            entries.append(
                {
                    "index": d.index,
                    "id": d.id,
                    "type": "function",
                    "function": {"name": d.name, "arguments": ""},
                }
            )
        if not d.arguments:
            continue
        fragment = fragments.get(d.index)
        if fragment is None:
            fragment = fragments[d.index] = {"index": d.index, "function": {"arguments": ""}}
            entries.append(fragment)
        fragment["function"]["arguments"] += d.arguments
    return entries


def tool_calls_message(outputs: Iterable[GenOutput]) -> list[dict[str, Any]]:
    """The non-streamed message's ``tool_calls``, assembled from a choice's deltas."""
    calls: dict[int, dict[str, Any]] = {}
    for output in outputs:
        for d in output.tool_calls:
            call = calls.setdefault(
                d.index, {"id": d.id, "type": "function", "function": {"name": d.name}}
            )
            function = call["function"]
            function["arguments"] = function.get("arguments", "") + d.arguments
    return [calls[i] for i in sorted(calls)]


class ChatChunks:
    """chat.completion.chunk shapes for one response."""

    def __init__(self, completion_id: str, created: int, model: str, with_logprobs: bool) -> None:
        self._head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._with_logprobs = with_logprobs

    def _chunk(
        self, choice: int, delta: dict[str, Any], logprobs: Any, reason: str | None
    ) -> dict[str, Any]:
        return {
            **self._head,
            "choices": [
                {"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            ],
            "usage": None,
        }

    def opening(self, choice: int) -> dict[str, Any]:
        return self._chunk(choice, {"role": "assistant", "content": ""}, None, None)

    def content(self, output: GenOutput) -> dict[str, Any]:
        logprobs = chat_logprobs(output.logprobs) if self._with_logprobs else None
        delta: dict[str, Any] = {"content": output.text} if output.text else {}
        if output.tool_calls:
            delta["tool_calls"] = tool_call_deltas(output.tool_calls)
        chunk = self._chunk(output.choice_index, delta, logprobs, None)
        return with_extras(chunk, delta, output)

    def finish(self, output: GenOutput) -> dict[str, Any]:
        assert output.finish_reason is not None
        return self._chunk(output.choice_index, {}, None, output.finish_reason.value)

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}


class ChatJob:
    """POST /v1/chat/completions over the shared pipeline (``generation.py``)."""

    endpoint = "chat"
    id_prefix = "chatcmpl"

    def __init__(self, body: ChatCompletionRequest, engine: Engine, context: JobContext) -> None:
        self._body = body
        self._engine = engine
        self._context = context
        self.n = self.sequences = body.choices
        self.wants_logprobs = bool(body.logprobs)
        self._tools: ToolRequest | None = body.tool_request()

    def prepare(self) -> Prepared:
        body, engine, context = self._body, self._engine, self._context
        state = context.state
        messages = [m.plain() for m in body.messages]
        guard_messages(
            state.guard, state.guard_counters, context.request_id, messages, param="messages"
        )
        tools = self._tools
        try:
            prompt = engine.prepare_chat(messages, tools.tools if tools else None)
        except PromptError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
        constraint = output_constraint(
            engine, tools, body.response_format, format_param="response_format"
        )
        max_tokens, given = resolve_max_tokens(
            engine, prompt, body.requested_max_tokens, param="messages"
        )
        requests = [
            GenRequest(
                engine.new_request_id(),
                prompt,
                body.to_sampling_params(
                    max_tokens=max_tokens,
                    max_tokens_given=given,
                    vocab_size=engine.vocab_size,
                    logprobs=body.logprobs_count,
                    choice=i,
                    constraint=constraint,
                ),
                i,
                cache_scope=context.cache_scope,
                trace_id=context.request_id,
            )
            for i in range(self.n)
        ]
        return Prepared(requests, (prompt.token_count,), max_tokens * self.n)

    def preamble(self) -> Sequence[GenOutput]:
        return ()

    def output_stages(self, stream: OutputStream) -> Sequence[OutputStage]:
        return tool_call_stages(self._engine, self._tools, self.sequences)

    def events(
        self, completion_id: str, created: int, model: str, include_usage: bool
    ) -> ChunkEvents:
        chunks = ChatChunks(completion_id, created, model, self.wants_logprobs)
        return ChunkEvents(chunks, self.sequences, include_usage)

    async def body(
        self,
        per_choice: list[list[GenOutput]],
        completion_id: str,
        created: int,
        model: str,
        usage: dict[str, Any],
    ) -> dict[str, Any]:
        choices = []
        for i, outputs in enumerate(per_choice):
            logprobs = [e for o in outputs for e in o.logprobs]
            content: str | None = "".join(o.text for o in outputs)
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if calls := tool_calls_message(outputs):
                message["content"] = content or None
                message["tool_calls"] = calls
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": chat_logprobs(logprobs) if self.wants_logprobs else None,
                    "finish_reason": finish_reason_of(outputs),
                }
            )
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
        }


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    return await serve_generation(request, ChatCompletionRequest, unsupported.CHAT, ChatJob)
