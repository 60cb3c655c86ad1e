"""One pipeline for every generation endpoint; an endpoint only says what is its own.

    authorize, resume          the key; a reconnect to a detached stream
    parse, check               the body (decoded in the prep pool)
    admit (phase 1)            key may use the model; concurrency counts every
                               sequence (n x prompts); requests per minute
    prepare, in the prep pool  input rules, chat template, tokenization or the
                               estimate: the work that grows with the input,
                               admitted first and off the event loop
    reserve (phase 2)          tokens per minute and budget, with the counts
    submit, wait until ready   503 when the engine's queue is full; an upstream's
                               refusal before any output passes through
    hold back, stream/collect  output rules and the job's stages (``holdback.py``),
                               then the job's events or one JSON body

Whatever fails after phase 1 releases the reservation, so nothing refused
keeps holding a key's concurrency or budget. A ``Job`` is an endpoint's part:
its body's sequences, how its prompts are prepared, and its wire shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.detach import stream_response
from spigot.api.guarding import check_logprobs, output_guard
from spigot.api.holdback import OutputStage, OutputStages
from spigot.api.metering import admit, authorize, release, reserve
from spigot.api.responses import json_response
from spigot.api.state import (
    RequestRecord,
    ServerState,
    cache_scope,
    check_choices,
    new_id,
    parse_body,
)
from spigot.api.streaming import StreamedRequest, abandon, collect, usage_body
from spigot.api.streams import resume_if_asked
from spigot.api.unsupported import Unsupported
from spigot.api.wire_events import EventWriter
from spigot.engine.protocol import Engine, OutputStream, QueueFull
from spigot.engine.types import GenOutput, GenRequest
from spigot.errors import Overloaded
from spigot.metering import ApiKey


class GenerationBody(Protocol):
    """What the pipeline reads of a request body (a pydantic wire model). Chat and legacy
    completions share ``SamplingRequest``; a Responses body has none of its ``n``, ``stop``
    or penalties, and only this in common."""

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool | None: ...

    @property
    def include_usage(self) -> bool: ...

    def check(self) -> None:
        """Rules across fields: 400 on a violation."""


B = TypeVar("B", bound=GenerationBody)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the prep pool made of a request: its sequences and their prompts' token counts."""

    requests: list[GenRequest]
    prompt_tokens: tuple[int, ...]  # per prompt: exact, or the estimate (see docs/gateway.md)
    max_completion_tokens: int


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a job's preparation needs of the server and the request."""

    state: ServerState
    request_id: str
    cache_scope: str


class Job(Protocol):
    """One endpoint's part of a generation request."""

    endpoint: str  # the ledger's endpoint name
    id_prefix: str  # of the completion id
    n: int  # choices per prompt
    sequences: int  # all choices of all prompts
    wants_logprobs: bool

    def prepare(self) -> Prepared:
        """Input rules, prompts and sequences; runs in the prep pool."""

    def preamble(self) -> Sequence[GenOutput]:
        """Text sent before the model's (an echoed prompt), after ``prepare``."""

    def output_stages(self, stream: OutputStream) -> Sequence[OutputStage]:
        """The job's own hold-back stages, after the output rules (tool calls)."""

    def events(
        self, completion_id: str, created: int, model: str, include_usage: bool
    ) -> EventWriter:
        """The wire events of the streamed response."""

    async def body(
        self,
        per_choice: list[list[GenOutput]],
        completion_id: str,
        created: int,
        model: str,
        usage: dict[str, Any],
    ) -> dict[str, Any]:
        """The non-streamed response (usage recorded); may await, as the Responses API
        stores the response before answering."""


JobFactory = Callable[[B, Engine, JobContext], Job]


async def serve_generation(
    request: Request,
    schema: type[B],
    unsupported: Mapping[str, Unsupported],
    make_job: JobFactory[B],
) -> Response:
    state: ServerState = request.app.state.spigot
    key = await authorize(request)
    if (resumed := await resume_if_asked(request, state, key)) is not None:
        return resumed
    # Every GenerationBody is a pydantic model: parse_body's bound, which a Protocol
    # cannot also say.
    body = cast(B, await parse_body(request, cast("type[BaseModel]", schema), unsupported))
    body.check()
    engine = state.engine_for(body.model)
    scope = cache_scope(key)
    job = make_job(body, engine, JobContext(state, request.state.request_id, scope))
    check_choices(engine, job.sequences)
    check_logprobs(state.guard, job.wants_logprobs, param="logprobs")
    stream, record, headers = await _start(request, key, engine, job, streamed=bool(body.stream))
    completion_id = new_id(job.id_prefix)
    created = int(time.time())
    try:
        # Output rules may run plug-in code: a failure must not leave the request running.
        guard = output_guard(
            state.guard, state.guard_counters, record.request_id, stream, job.sequences
        )
        stages = OutputStages([*([guard] if guard else []), *job.output_stages(stream)])
        preamble = job.preamble()
        writer = job.events(completion_id, created, engine.model_id, body.include_usage)
    except BaseException:
        await abandon(state, stream, record)
        raise
    if body.stream:
        streamed = StreamedRequest(
            state=state,
            stream=stream,
            writer=writer,
            record=record,
            stages=stages,
            preamble=preamble,
        )
        return await stream_response(state.detached, streamed, scope, headers)
    per_choice = await collect(
        request=request,
        state=state,
        stream=stream,
        record=record,
        choices=job.sequences,
        stages=stages,
        preamble=preamble,
    )
    reply = await job.body(per_choice, completion_id, created, engine.model_id, usage_body(record))
    return json_response(reply, headers=headers)


async def _start(
    request: Request, key: ApiKey | None, engine: Engine, job: Job, *, streamed: bool
) -> tuple[OutputStream, RequestRecord, dict[str, str] | None]:
    """Admit, prepare, reserve and submit; the stream has started when this returns."""
    state: ServerState = request.app.state.spigot
    state.shutdown.refuse_if_draining()
    reservation = await admit(
        request, key, model=engine.model_id, sequences=job.sequences, endpoint=job.endpoint
    )
    stream: OutputStream | None = None
    try:
        prepared = await state.prep.run(job.prepare)
        await reserve(
            request,
            reservation,
            model=engine.model_id,
            prompt_tokens=sum(prepared.prompt_tokens),
            max_completion_tokens=prepared.max_completion_tokens,
        )
        state.shutdown.refuse_if_draining()
        stream = engine.submit(prepared.requests)
        # An engine elsewhere may still refuse (its own 4xx) or be unreachable: that
        # is an HTTP error for the client, not a stream, and nothing was generated.
        await stream.ready()
    except BaseException as exc:
        if stream is not None:
            stream.abort()
        # Shielded: a client that left meanwhile must not keep the reservation.
        await asyncio.shield(release(request, reservation))
        if isinstance(exc, QueueFull):
            raise Overloaded(str(exc), retry_after=1) from None
        raise
    record = RequestRecord(
        request_id=request.state.request_id,
        endpoint=job.endpoint,
        model=engine.model_id,
        streamed=streamed,
        key_id=key.id if key is not None else None,
        n=job.n,
        prompt_estimates=prepared.prompt_tokens,
    )
    return stream, record, reservation.headers if reservation is not None else None
