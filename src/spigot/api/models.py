"""GET /v1/models, GET /v1/models/{id}"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.metering import authorize
from spigot.api.responses import json_response
from spigot.api.state import ServerState
from spigot.engine.protocol import Engine

router = APIRouter()


def _model_card(engine: Engine) -> dict[str, Any]:
    return {
        "id": engine.model_id,
        "object": "model",
        "created": engine.created,
        "owned_by": "spigot",
        "max_model_len": engine.max_context,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    await authorize(request)
    state: ServerState = request.app.state.spigot
    return json_response(
        {"object": "list", "data": [_model_card(e) for e in state.engines.values()]}
    )


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    await authorize(request)
    state: ServerState = request.app.state.spigot
    # Names routed to a model (gpt-3.5-turbo, aliases) describe that model.
    return json_response(_model_card(state.engine_for(model_id)))
