"""POST /tokenize and /detokenize with the served model's own tokenizer (as vLLM offers)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.metering import authorize
from spigot.api.responses import json_response
from spigot.api.schemas import DetokenizeRequest, TokenizeRequest
from spigot.api.state import ServerState, parse_body
from spigot.engine.chat_template import ChatTemplateError
from spigot.errors import InvalidRequest

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    await authorize(request)
    state: ServerState = request.app.state.spigot
    body = await parse_body(request, TokenizeRequest)
    engine = state.engine_for(body.model)
    if body.messages is not None:
        try:
            rendered = engine.render_chat([m.for_template() for m in body.messages])
        except ChatTemplateError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
        tokens = engine.tokenize_chat(rendered)
    elif body.prompt is not None:
        tokens = engine.tokenize_prompt(body.prompt)
    else:
        raise InvalidRequest("Either 'prompt' or 'messages' is required.", param="prompt")
    return json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_context}
    )


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    await authorize(request)
    state: ServerState = request.app.state.spigot
    body = await parse_body(request, DetokenizeRequest)
    engine = state.engine_for(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"Invalid token id {bad}.", param="tokens")
    return json_response({"prompt": engine.detokenize(body.tokens)})
