"""POST /v1/chat/completions"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api import unsupported
from spigot.api.detach import stream_response
from spigot.api.generation import Prepared, cache_scope, start_generation
from spigot.api.guarding import check_logprobs, guard_inputs, output_guard
from spigot.api.metering import authorize
from spigot.api.responses import json_response
from spigot.api.schemas import ChatCompletionRequest
from spigot.api.state import (
    ServerState,
    check_choices,
    new_id,
    parse_body,
    resolve_max_tokens,
)
from spigot.api.streaming import StreamedRequest, abandon, collect, finish_reason_of, usage_body
from spigot.api.streams import resume_if_asked
from spigot.engine.chat_template import ChatTemplateError
from spigot.engine.types import GenOutput, GenRequest, TokenLogprob
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
        return self._chunk(output.choice_index, {"content": output.text}, logprobs, None)

    def finish(self, output: GenOutput) -> dict[str, Any]:
        assert output.finish_reason is not None
        return self._chunk(output.choice_index, {}, None, output.finish_reason.value)

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.spigot
    key = await authorize(request)
    if (resumed := await resume_if_asked(request, state, key)) is not None:
        return resumed
    body = await parse_body(request, ChatCompletionRequest, unsupported.CHAT)
    body.check()
    engine = state.engine_for(body.model)
    n = body.choices
    check_choices(engine, n)
    check_logprobs(state.guard, bool(body.logprobs), param="logprobs")
    request_id = request.state.request_id
    scope = cache_scope(key)

    def prepare() -> Prepared:
        messages = [m.for_template() for m in body.messages]
        contents = guard_inputs(
            state.guard,
            state.guard_counters,
            request_id,
            [m["content"] for m in messages],
            param="messages",
        )
        for message, content in zip(messages, contents, strict=True):
            message["content"] = content
        try:
            prompt = tuple(engine.chat_tokens(messages))
        except ChatTemplateError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
        max_tokens = resolve_max_tokens(
            engine, len(prompt), body.requested_max_tokens, param="messages"
        )
        requests = [
            GenRequest(
                engine.new_request_id(),
                prompt,
                body.to_sampling_params(
                    max_tokens=max_tokens,
                    vocab_size=engine.vocab_size,
                    logprobs=body.logprobs_count,
                    choice=i,
                ),
                i,
                cache_scope=scope,
            )
            for i in range(n)
        ]
        return Prepared(requests, len(prompt), max_tokens * n)

    started = await start_generation(
        request,
        key=key,
        engine=engine,
        endpoint="chat",
        streamed=bool(body.stream),
        n=n,
        sequences=n,
        prepare=prepare,
    )
    stream, record, headers = started.stream, started.record, started.headers
    completion_id = new_id("chatcmpl")
    created = int(time.time())
    try:
        # Output rules may run plug-in code: a failure must not leave the request running.
        guard = output_guard(state.guard, state.guard_counters, record.request_id, stream, n)
    except BaseException:
        await abandon(state, stream, record)
        raise
    if body.stream:
        fmt = ChatChunks(completion_id, created, engine.model_id, bool(body.logprobs))
        streamed = StreamedRequest(
            state=state,
            stream=stream,
            fmt=fmt,
            record=record,
            choices=n,
            include_usage=body.include_usage,
            guard=guard,
        )
        return await stream_response(state.detached, streamed, scope, headers)

    per_choice = await collect(
        request=request, state=state, stream=stream, record=record, choices=n, guard=guard
    )
    choices = []
    for i, outputs in enumerate(per_choice):
        logprobs = [e for o in outputs for e in o.logprobs]
        choices.append(
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": "".join(o.text for o in outputs),
                    "refusal": None,
                },
                "logprobs": chat_logprobs(logprobs) if body.logprobs else None,
                "finish_reason": finish_reason_of(outputs),
            }
        )
    return json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": engine.model_id,
            "choices": choices,
            "usage": usage_body(record),
        },
        headers=headers,
    )
