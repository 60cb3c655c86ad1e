"""What every route needs: the served engines, request parsing, limits and bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from spigot.api.body import decode_body, read_body
from spigot.api.guarding import GuardCounters
from spigot.api.metering import Metering
from spigot.api.prep import PrepPool
from spigot.api.shutdown import Shutdown
from spigot.api.unsupported import Unsupported
from spigot.engine.async_engine import AsyncEngine
from spigot.engine.types import Usage
from spigot.errors import ContextLengthExceeded, InvalidRequest, ModelNotFoundError
from spigot.guard import Policy
from spigot.metering import LedgerEntry
from spigot.models import ModelNotFound, ModelRouter

if TYPE_CHECKING:
    from spigot.api.detach import Detached

log = logging.getLogger("spigot.requests")

M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class RequestRecord:
    """One API request, however it ended: what metering will consume."""

    request_id: str
    endpoint: str
    model: str
    streamed: bool
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | disconnected | error
    key_id: int | None = None  # the API key it ran under, when keys are in use
    n: int = 1  # choices per prompt: choice i belongs to prompt i // n
    _cached_by_prompt: dict[int, int] = field(default_factory=dict)

    def add_usage(self, usage: Usage | None, choice_index: int = 0) -> None:
        if usage is None:
            return
        self.completion_tokens += usage.completion_tokens
        # The n choices of a prompt each report the prompt's cached part, but the
        # prompt is counted (and billed) once: take its best choice, not the sum.
        prompt = choice_index // self.n
        best = max(self._cached_by_prompt.get(prompt, 0), usage.cached_tokens)
        self._cached_by_prompt[prompt] = best
        self.cached_tokens = sum(self._cached_by_prompt.values())

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()


UsageObserver = Callable[[RequestRecord], None]


def log_record(record: RequestRecord) -> None:
    ttft = (
        f"{(record.first_token_at - record.started) * 1000:.0f}ms"
        if record.first_token_at is not None
        else "-"
    )
    log.info(
        "%s %s model=%s stream=%s prompt=%d completion=%d ttft=%s total=%.0fms finish=%s status=%s",
        record.request_id,
        record.endpoint,
        record.model,
        record.streamed,
        record.prompt_tokens,
        record.completion_tokens,
        ttft,
        (time.monotonic() - record.started) * 1000,
        ",".join(record.finish_reasons) or "-",
        record.status,
    )


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_body_bytes: int = 8 * 2**20
    max_messages: int = 2048


@dataclass
class ServerState:
    engines: dict[str, AsyncEngine]
    router: ModelRouter
    observers: list[UsageObserver] = field(default_factory=lambda: [log_record])
    guard: Policy | None = None
    guard_counters: GuardCounters = field(default_factory=GuardCounters)
    metering: Metering | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    prep: PrepPool = field(default_factory=PrepPool)
    shutdown: Shutdown = field(default_factory=lambda: Shutdown(grace=30.0))
    # Bound to a loopback address: a keyless server then answers only loopback
    # Host names, so a web page cannot reach it by DNS rebinding.
    loopback_only: bool = False
    # Resumable streams (--on-disconnect detach=N); None: cancel on disconnect.
    detached: Detached | None = None

    def engine_for(self, name: str) -> AsyncEngine:
        try:
            return self.engines[self.router.resolve(name)]
        except ModelNotFound as exc:
            raise ModelNotFoundError(str(exc), param="model") from None

    async def finish(self, record: RequestRecord) -> bool:
        """Record a finished request; False when its ledger row could not be written.

        The ledger write is shielded: a client that leaves meanwhile cannot cancel it.
        """
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                log.exception("usage observer failed for %s", record.request_id)
        if self.metering is None:
            return True
        entry = ledger_entry(self.metering, record)
        try:
            await asyncio.shield(self.metering.settle(entry))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the ledger row of %s could not be written", record.request_id)
            return False
        return True


def ledger_entry(metering: Metering, record: RequestRecord) -> LedgerEntry:
    now = time.monotonic()
    ttft = record.first_token_at
    return LedgerEntry(
        request_id=record.request_id,
        key_id=record.key_id,
        model=record.model,
        endpoint=record.endpoint,
        prompt_tokens=record.prompt_tokens,
        cached_tokens=record.cached_tokens,
        completion_tokens=record.completion_tokens,
        cost_pusd=metering.cost(
            record.model, record.prompt_tokens, record.cached_tokens, record.completion_tokens
        ),
        ttft_ms=None if ttft is None else round((ttft - record.started) * 1000),
        duration_ms=round((now - record.started) * 1000),
        finish_reason=",".join(dict.fromkeys(record.finish_reasons)) or None,
        status=record.status,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def parse_body(
    request: Request,
    model: type[M],
    unsupported: Mapping[str, Unsupported] | None = None,
) -> M:
    """The request's body as ``model``: read with the size cap, decoded in the prep pool."""
    state: ServerState = request.app.state.spigot
    raw = await read_body(request, state.limits.max_body_bytes)
    max_messages = state.limits.max_messages
    return await state.prep.run(
        lambda: decode_body(raw, model, max_messages=max_messages, unsupported=unsupported)
    )


def resolve_max_tokens(
    engine: AsyncEngine, prompt_tokens: int, requested: int | None, *, param: str
) -> int:
    """The output cap, or 400 when the prompt and the requested output cannot fit."""
    limit = engine.max_context
    if requested is None:
        if prompt_tokens >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{param} resulted in {prompt_tokens} tokens. Please reduce the length of the "
                f"{param}.",
                param=param,
            )
        return limit - prompt_tokens
    if prompt_tokens + requested > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {param}, {requested} "
            f"in the completion). Please reduce the length of the {param} or completion.",
            param=param,
        )
    return requested


def check_choices(engine: AsyncEngine, n: int) -> None:
    if n > engine.capacity:
        raise InvalidRequest(
            f"'n' is {n}, but this server runs at most {engine.capacity} sequences at once.",
            param="n",
        )
