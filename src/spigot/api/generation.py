"""Starting a generation request, the same way for every endpoint.

    refuse while draining      503 once the server is shutting down
    admit (phase 1)            key may use the model; concurrency counts every
                               sequence (n x prompts); requests per minute
    prepare, in the prep pool  input rules, chat template, tokenization:
                               the work that grows with the input, admitted
                               first and off the event loop
    reserve (phase 2)          tokens per minute and budget, with exact counts
    submit                     to the engine (503 when its queue is full)

Whatever fails after phase 1 releases the reservation, so nothing refused
keeps holding a key's concurrency or budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from spigot.api.metering import admit, release, reserve
from spigot.api.state import RequestRecord, ServerState
from spigot.engine.async_engine import AsyncEngine, QueueFull, RequestStream
from spigot.engine.types import GenRequest
from spigot.errors import Overloaded
from spigot.metering import ApiKey


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the prep pool made of a request: its sequences and their token counts."""

    requests: list[GenRequest]
    prompt_tokens: int
    max_completion_tokens: int


@dataclass(frozen=True, slots=True)
class Started:
    stream: RequestStream
    record: RequestRecord
    headers: dict[str, str] | None  # x-ratelimit-* from admission


def cache_scope(key: ApiKey | None) -> str:
    """Prefix-cache reuse stays within one key (the engine may be told to share)."""
    return "anonymous" if key is None else f"key:{key.id}"


async def start_generation(
    request: Request,
    *,
    key: ApiKey | None,
    engine: AsyncEngine,
    endpoint: str,
    streamed: bool,
    n: int,
    sequences: int,
    prepare: Callable[[], Prepared],
) -> Started:
    state: ServerState = request.app.state.spigot
    state.shutdown.refuse_if_draining()
    reservation = await admit(
        request, key, model=engine.model_id, sequences=sequences, endpoint=endpoint
    )
    try:
        prepared = await state.prep.run(prepare)
        await reserve(
            request,
            reservation,
            model=engine.model_id,
            prompt_tokens=prepared.prompt_tokens,
            max_completion_tokens=prepared.max_completion_tokens,
        )
        state.shutdown.refuse_if_draining()
        stream = engine.submit(prepared.requests)
    except BaseException as exc:
        # Shielded: a client that left meanwhile must not keep the reservation.
        await asyncio.shield(release(request, reservation))
        if isinstance(exc, QueueFull):
            raise Overloaded(str(exc), retry_after=1) from None
        raise
    record = RequestRecord(
        request_id=request.state.request_id,
        endpoint=endpoint,
        model=engine.model_id,
        streamed=streamed,
        prompt_tokens=prepared.prompt_tokens,
        key_id=key.id if key is not None else None,
        n=n,
    )
    return Started(stream, record, reservation.headers if reservation is not None else None)
