"""POST /tokenize and /detokenize with the served model's own tokenizer (as vLLM offers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.metering import admit, authorize, release
from spigot.api.schemas import DetokenizeRequest, TokenizeRequest
from spigot.api.state import ServerState, parse_body
from spigot.engine.async_engine import AsyncEngine
from spigot.engine.chat_template import ChatTemplateError
from spigot.errors import InvalidRequest
from spigot.metering import ApiKey

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    key = await authorize(request)
    state: ServerState = request.app.state.spigot
    body = await parse_body(request, TokenizeRequest)
    engine = state.engine_for(body.model)
    if body.messages is None and body.prompt is None:
        raise InvalidRequest("Either 'prompt' or 'messages' is required.", param="prompt")

    def prepare() -> bytes:
        if body.messages is not None:
            try:
                tokens = engine.chat_tokens([m.for_template() for m in body.messages])
            except ChatTemplateError as exc:
                raise InvalidRequest(str(exc), param="messages") from None
        else:
            assert body.prompt is not None
            tokens = engine.tokenize_prompt(body.prompt)
        return orjson.dumps(
            {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_context}
        )

    return await _admitted(request, key, engine, prepare)


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    key = await authorize(request)
    state: ServerState = request.app.state.spigot
    body = await parse_body(request, DetokenizeRequest)
    engine = state.engine_for(body.model)

    def prepare() -> bytes:
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"Invalid token id {bad}.", param="tokens")
        return orjson.dumps({"prompt": engine.detokenize(body.tokens)})

    return await _admitted(request, key, engine, prepare)


async def _admitted(
    request: Request, key: ApiKey | None, engine: AsyncEngine, prepare: Callable[[], bytes]
) -> Response:
    """Run ``prepare`` (work that grows with the input) in the prep pool, admitted like a
    request (concurrency and requests per minute), released when done; no tokens are
    billed. The JSON is encoded there too: a large answer must not hold the loop."""
    state: ServerState = request.app.state.spigot
    state.shutdown.refuse_if_draining()
    reservation = await admit(request, key, model=engine.model_id, sequences=1)
    try:
        body = await state.prep.run(prepare)
    finally:
        await asyncio.shield(release(request, reservation))
    return Response(body, media_type="application/json")
