"""The upstream request for one sequence: path, JSON body and headers.

Every choice is its own upstream request (``n`` is never sent). Only what the
client asked for is forwarded: ``max_tokens`` when it gave one (otherwise the
upstream applies its own limit), penalties, bias and stops when set, vLLM's
``ignore_eos``/``min_tokens`` when set. Streaming with usage is always asked for.
A constrained request carries its OpenAI fields (``response_format``, ``tools``,
``tool_choice``: ``Constraint.openai``), for the upstream to enforce.
"""

from __future__ import annotations

from typing import Any

from spigot.engine.types import GenRequest, SamplingParams

CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"


def is_chat(request: GenRequest) -> bool:
    return request.prompt.messages is not None


def path_of(request: GenRequest) -> str:
    return CHAT_PATH if is_chat(request) else COMPLETIONS_PATH


def body_of(request: GenRequest, model: str) -> dict[str, Any]:
    prompt = request.prompt
    body: dict[str, Any] = {"model": model}
    if prompt.messages is not None:
        body["messages"] = [dict(m) for m in prompt.messages]
    elif prompt.text is not None:
        body["prompt"] = prompt.text
    else:
        body["prompt"] = list(prompt.token_ids)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    body.update(sampling(request.params, chat=prompt.messages is not None))
    if prompt.tools:
        body["tools"] = [dict(t) for t in prompt.tools]
    constraint = request.params.constraint
    if constraint is not None:
        body.update(constraint.openai)
    if prompt.tools and "tool_choice" not in body:
        # Tools with no constraint of their own: the client chose "none".
        body["tool_choice"] = "none"
    return body


def sampling(params: SamplingParams, *, chat: bool) -> dict[str, Any]:
    # What the client left unset is left to the upstream's own defaults.
    out: dict[str, Any] = {
        name: value
        for name, value in (("temperature", params.temperature), ("top_p", params.top_p))
        if name not in params.defaulted
    }
    if params.max_tokens_given:
        out["max_tokens"] = params.max_tokens
    if params.seed is not None:
        out["seed"] = params.seed
    if params.presence_penalty:
        out["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        out["frequency_penalty"] = params.frequency_penalty
    if params.logit_bias:
        out["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    if params.stop:
        out["stop"] = list(params.stop)
    if params.logprobs is not None:
        if chat:
            out["logprobs"] = True
            out["top_logprobs"] = params.logprobs
        else:
            out["logprobs"] = params.logprobs
    if params.ignore_eos:
        out["ignore_eos"] = True
    if params.min_tokens:
        out["min_tokens"] = params.min_tokens
    return out


def headers_of(request: GenRequest) -> dict[str, str]:
    """Per request (the pool's client adds authorization)."""
    # The client's request id, so that the upstream's logs line up with ours.
    return {"Accept": "text/event-stream", "x-request-id": request.trace_id or request.request_id}
