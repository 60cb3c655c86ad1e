"""POST /v1/completions (legacy text completions)"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
from spigot.api.schemas import CompletionRequest
from spigot.api.state import (
    ServerState,
    check_choices,
    new_id,
    parse_body,
    resolve_max_tokens,
)
from spigot.api.streaming import StreamedRequest, abandon, collect, finish_reason_of, usage_body
from spigot.api.streams import resume_if_asked
from spigot.engine.async_engine import AsyncEngine
from spigot.engine.types import GenOutput, GenRequest, TokenLogprob
from spigot.errors import InvalidRequest

router = APIRouter()


@dataclass(slots=True)
class _Prompt:
    token_ids: tuple[int, ...]
    text: str  # what the model sees (after input rules), and what echo sends


class LogprobsWriter:
    """Legacy ``logprobs`` objects; ``text_offset`` runs over each choice's whole text."""

    def __init__(self, choices: int) -> None:
        self._offsets = [0] * choices

    def build(self, choice: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        at = self._offsets[choice]
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        self._offsets[choice] = at
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tok: lp for tok, _, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


class CompletionChunks:
    """text_completion chunk shapes for one response."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        logprobs: LogprobsWriter | None,
    ) -> None:
        self._head = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
        }
        self._logprobs = logprobs

    def _chunk(self, choice: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        return {
            **self._head,
            "choices": [
                {"text": text, "index": choice, "logprobs": logprobs, "finish_reason": reason}
            ],
            "usage": None,
        }

    def opening(self, choice: int) -> dict[str, Any] | None:
        return None  # an echoed prompt is sent as the first text (see ``StreamedRequest``)

    def content(self, output: GenOutput) -> dict[str, Any]:
        logprobs = None
        if self._logprobs is not None:
            logprobs = self._logprobs.build(output.choice_index, output.logprobs)
        return self._chunk(output.choice_index, output.text, logprobs, None)

    def finish(self, output: GenOutput) -> dict[str, Any]:
        assert output.finish_reason is not None
        return self._chunk(output.choice_index, "", None, output.finish_reason.value)

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}


def _prepare_prompts(
    engine: AsyncEngine, body: CompletionRequest, state: ServerState, request_id: str
) -> list[_Prompt]:
    tokens: list[tuple[int, ...] | None] = []
    texts: list[str] = []
    for i, p in enumerate(body.prompts()):
        if isinstance(p, str):
            tokens.append(None)
            texts.append(p)
            continue
        bad = next((t for t in p if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"Invalid token id {bad} in 'prompt'.", param="prompt")
        if not p:
            raise InvalidRequest(f"Prompt {i} is empty.", param="prompt")
        tokens.append(tuple(p))
        texts.append(engine.detokenize(p))
    checked = guard_inputs(state.guard, state.guard_counters, request_id, texts, param="prompt")
    prompts: list[_Prompt] = []
    for token_ids, text, seen in zip(tokens, texts, checked, strict=True):
        if token_ids is None or seen != text:  # a string, or tokens an input rule rewrote
            token_ids = tuple(engine.tokenize_prompt(seen))
        prompts.append(_Prompt(token_ids, seen))
    return prompts


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state: ServerState = request.app.state.spigot
    key = await authorize(request)
    if (resumed := await resume_if_asked(request, state, key)) is not None:
        return resumed
    body = await parse_body(request, CompletionRequest, unsupported.COMPLETIONS)
    body.check()
    engine = state.engine_for(body.model)
    n = body.choices
    check_logprobs(state.guard, body.logprobs is not None, param="logprobs")
    total = n * len(body.prompts())
    check_choices(engine, total)
    request_id = request.state.request_id
    scope = cache_scope(key)
    prompts: list[_Prompt] = []

    def prepare() -> Prepared:
        prompts.extend(_prepare_prompts(engine, body, state, request_id))
        requests: list[GenRequest] = []
        max_completion_tokens = 0
        for p_index, prompt in enumerate(prompts):
            max_tokens = resolve_max_tokens(
                engine, len(prompt.token_ids), body.requested_max_tokens, param="prompt"
            )
            max_completion_tokens += max_tokens * n
            for i in range(n):
                params = body.to_sampling_params(
                    max_tokens=max_tokens,
                    vocab_size=engine.vocab_size,
                    logprobs=body.logprobs,
                    choice=i,
                )
                requests.append(
                    GenRequest(
                        engine.new_request_id(),
                        prompt.token_ids,
                        params,
                        p_index * n + i,
                        cache_scope=scope,
                    )
                )
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return Prepared(requests, prompt_tokens, max_completion_tokens)

    started = await start_generation(
        request,
        key=key,
        engine=engine,
        endpoint="completions",
        streamed=bool(body.stream),
        n=n,
        sequences=total,
        prepare=prepare,
    )
    stream, record, headers = started.stream, started.record, started.headers
    completion_id = new_id("cmpl")
    created = int(time.time())
    # An echoed prompt is completion text like any other: output rules see it too.
    echoes = [GenOutput(c, prompts[c // n].text) for c in range(total)] if body.echo else []
    logprobs = LogprobsWriter(total) if body.logprobs is not None else None
    fmt = CompletionChunks(completion_id, created, engine.model_id, logprobs)
    try:
        # Output rules may run plug-in code: a failure must not leave the request running.
        guard = output_guard(state.guard, state.guard_counters, record.request_id, stream, total)
    except BaseException:
        await abandon(state, stream, record)
        raise
    if body.stream:
        streamed = StreamedRequest(
            state=state,
            stream=stream,
            fmt=fmt,
            record=record,
            choices=total,
            include_usage=body.include_usage,
            guard=guard,
            preamble=echoes,
        )
        return await stream_response(state.detached, streamed, scope, headers)

    per_choice = await collect(
        request=request,
        state=state,
        stream=stream,
        record=record,
        choices=total,
        guard=guard,
        preamble=echoes,
    )
    choices = []
    for i, outputs in enumerate(per_choice):
        entries = [e for o in outputs for e in o.logprobs]
        choices.append(
            {
                "text": "".join(o.text for o in outputs),
                "index": i,
                "logprobs": LogprobsWriter(1).build(0, entries) if logprobs is not None else None,
                "finish_reason": finish_reason_of(outputs),
            }
        )
    return json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": engine.model_id,
            "choices": choices,
            "usage": usage_body(record),
        },
        headers=headers,
    )
