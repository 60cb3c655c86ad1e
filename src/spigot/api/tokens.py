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
from spigot.engine.protocol import Engine, PromptError
from spigot.errors import InvalidRequest
from spigot.metering import ApiKey

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    key = await authorize(request)
    state: ServerState = request.app.state.spigot
    body = await parse_body(request, TokenizeRequest)
    engine = _local(state.engine_for(body.model))
    if body.messages is None and body.prompt is None:
        raise InvalidRequest("Either 'prompt' or 'messages' is required.", param="prompt")

    def prepare() -> bytes:
        if body.messages is not None:
            try:
                prompt = engine.prepare_chat([m.plain() for m in body.messages])
            except PromptError as exc:
                raise InvalidRequest(str(exc), param="messages") from None
        else:
            assert body.prompt is not None
            try:
                prompt = engine.prepare_text(body.prompt)
            except PromptError as exc:
                raise InvalidRequest(str(exc), param="prompt") from None
        tokens = list(prompt.token_ids)
        return orjson.dumps(
            {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_context}
        )

    return await _admitted(request, key, engine, prepare)


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    key = await authorize(request)
    state: ServerState = request.app.state.spigot
    body = await parse_body(request, DetokenizeRequest)
    engine = _local(state.engine_for(body.model))

    def prepare() -> bytes:
        try:
            engine.prepare_token_ids(body.tokens)
        except PromptError as exc:
            raise InvalidRequest(str(exc), param="tokens") from None
        return orjson.dumps({"prompt": engine.detokenize(body.tokens)})

    return await _admitted(request, key, engine, prepare)


def _local(engine: Engine) -> Engine:
    """Tokens are the served model's: a model behind another server has none here."""
    if not engine.tokenizes_locally:
        raise InvalidRequest(
            f"The model '{engine.model_id}' is served by another server: its tokenizer is "
            "not available here.",
            param="model",
        )
    return engine


async def _admitted(
    request: Request, key: ApiKey | None, engine: Engine, prepare: Callable[[], bytes]
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
