"""Resuming a detached stream: ``GET /v1/streams/{id}``, or a POST with ``Last-Event-ID``.

Only the key that started a stream can follow it; any other key, an unknown
id and an expired one all get the same 404.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.metering import authorize
from spigot.api.state import ServerState, cache_scope
from spigot.errors import NotFound
from spigot.metering import ApiKey
from spigot.resume import parse_last_event_id

router = APIRouter()


async def resume_if_asked(
    request: Request, state: ServerState, key: ApiKey | None
) -> Response | None:
    """A POST that carries ``Last-Event-ID`` resumes that stream instead of starting one."""
    last_event_id = request.headers.get("last-event-id")
    if state.detached is None or last_event_id is None:
        return None
    return await state.detached.resume(cache_scope(key), last_event_id)


@router.get("/v1/streams/{stream_id}")
async def follow_stream(request: Request, stream_id: str) -> Response:
    key = await authorize(request)
    state: ServerState = request.app.state.spigot
    if state.detached is None:
        raise NotFound("Resumable streams are off on this server (--on-disconnect detach=N).")
    owner = cache_scope(key)
    last_event_id = request.headers.get("last-event-id")
    parsed = parse_last_event_id(last_event_id) if last_event_id else None
    if parsed is not None and parsed[0] == stream_id:
        # A browser's EventSource reconnecting: it sends the last id it saw.
        return await state.detached.resume(owner, last_event_id or "")
    return await state.detached.follow_from_start(owner, stream_id)
