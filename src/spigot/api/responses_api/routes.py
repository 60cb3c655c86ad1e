"""``POST /v1/responses``, and ``GET`` / ``DELETE /v1/responses/{id}`` over stored ones.

A stored response belongs to the key that made it (its scope, ``cache_scope``):
another key's id and an id never made get the same 404, so ids cannot be probed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.generation import serve_generation
from spigot.api.metering import authorize
from spigot.api.responses import json_response
from spigot.api.responses_api.job import ResponsesJob
from spigot.api.responses_api.wire import RESPONSES, ResponsesRequest
from spigot.api.state import ServerState, cache_scope
from spigot.errors import InvalidRequest, NotFound
from spigot.metering import Store

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    return await serve_generation(request, ResponsesRequest, RESPONSES, ResponsesJob)


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


async def _owner_and_store(request: Request, response_id: str) -> tuple[str, Store]:
    state: ServerState = request.app.state.spigot
    key = await authorize(request)
    if state.metering is None:
        raise _not_found(response_id)  # nothing is ever stored without a database
    return cache_scope(key), state.metering.store


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> Response:
    if request.query_params.get("stream", "false").lower() not in ("false", "0"):
        raise InvalidRequest(
            "Streaming a stored response is not supported by this server; leave out 'stream'.",
            param="stream",
        )
    owner, store = await _owner_and_store(request, response_id)
    stored = await asyncio.to_thread(store.get_response, owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    return json_response(stored.response)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str) -> Response:
    """The request's own input items (not its chain's), oldest first, in one page."""
    owner, store = await _owner_and_store(request, response_id)
    stored = await asyncio.to_thread(store.get_response, owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    items = [_listed(f"{response_id}_in_{i}", item) for i, item in enumerate(stored.input_items)]
    if request.query_params.get("order", "desc") == "desc":
        items.reverse()
    return json_response(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
    )


def _listed(item_id: str, item: dict[str, Any]) -> dict[str, Any]:
    # Listed messages carry parts, as OpenAI lists them; stored ones keep plain text.
    if item.get("type") == "message":
        part = "output_text" if item["role"] == "assistant" else "input_text"
        content = [{"type": part, "text": item["content"]}]
        return {"id": item_id, **item, "content": content, "status": "completed"}
    return {"id": item_id, **item, "status": "completed"}


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    owner, store = await _owner_and_store(request, response_id)
    if not await asyncio.to_thread(store.delete_response, owner, response_id):
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})
