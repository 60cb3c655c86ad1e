"""GET /v1/models, GET /v1/models/{id}"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.responses import json_response
from spigot.api.state import ServerState
from spigot.engine.async_engine import AsyncEngine
from spigot.errors import ModelNotFoundError

router = APIRouter()


def _model_card(engine: AsyncEngine) -> dict[str, Any]:
    return {
        "id": engine.model_id,
        "object": "model",
        "created": engine.created,
        "owned_by": "spigot",
        "max_model_len": engine.max_context,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.spigot
    return json_response(
        {"object": "list", "data": [_model_card(e) for e in state.engines.values()]}
    )


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    state: ServerState = request.app.state.spigot
    engine = state.engines.get(model_id)
    if engine is None:
        raise ModelNotFoundError(f"The model `{model_id}` does not exist", param="model")
    return json_response(_model_card(engine))
