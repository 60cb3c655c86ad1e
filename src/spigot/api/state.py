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
from spigot.engine.protocol import Engine
from spigot.engine.types import Prompt, Usage, UsageSource
from spigot.errors import ContextLengthExceeded, InvalidRequest, ModelNotFoundError
from spigot.guard import Policy
from spigot.metering import ApiKey, LedgerEntry
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
    status: str = "ok"  # ok | disconnected | error | interrupted
    key_id: int | None = None  # the API key it ran under, when keys are in use
    n: int = 1  # choices per prompt: choice i belongs to prompt i // n
    # Per prompt, the count known before generation (exact, or an engine's estimate):
    # what is billed for a prompt whose sequences never report usage.
    prompt_estimates: tuple[int, ...] = ()
    _prompt_by_index: dict[int, int] = field(default_factory=dict)
    _cached_by_prompt: dict[int, int] = field(default_factory=dict)
    _sources: set[UsageSource] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.prompt_estimates:
            self._prompt_by_index = dict(enumerate(self.prompt_estimates))
            self.prompt_tokens = sum(self.prompt_estimates)

    def add_usage(self, usage: Usage | None, choice_index: int = 0) -> None:
        if usage is None:
            return
        self._sources.add(usage.source)
        self.completion_tokens += usage.completion_tokens
        # The n choices of a prompt each report the prompt, but it is counted (and
        # billed) once: its reported count replaces the estimate, and its cached
        # part is its best choice's, not the sum.
        prompt = choice_index // self.n
        if usage.prompt_tokens > 0 and self._prompt_by_index:
            self._prompt_by_index[prompt] = usage.prompt_tokens
            self.prompt_tokens = sum(self._prompt_by_index.values())
        best = max(self._cached_by_prompt.get(prompt, 0), usage.cached_tokens)
        self._cached_by_prompt[prompt] = best
        self.cached_tokens = sum(self._cached_by_prompt.values())

    @property
    def usage_source(self) -> UsageSource:
        """Where the counts come from: the least exact source of any sequence."""
        for source in (UsageSource.PARTIAL, UsageSource.COUNTED, UsageSource.UPSTREAM):
            if source in self._sources:
                return source
        return UsageSource.ENGINE

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
    engines: dict[str, Engine]
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

    def engine_for(self, name: str) -> Engine:
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
        usage_source=record.usage_source.value,
    )


def cache_scope(key: ApiKey | None) -> str:
    """Prefix-cache reuse stays within one key (the engine may be told to share)."""
    return "anonymous" if key is None else f"key:{key.id}"


def new_id(prefix: str) -> str:
    """``chatcmpl-...``; a prefix that ends in "_" is joined as is (``resp_...``, ``msg_...``:
    the Responses API's spelling)."""
    joined = prefix if prefix.endswith("_") else f"{prefix}-"
    return f"{joined}{uuid.uuid4().hex[:24]}"


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
    engine: Engine, prompt: Prompt, requested: int | None, *, param: str
) -> tuple[int, bool]:
    """The output cap and whether the client set it; 400 when prompt and output cannot fit.

    With an exact prompt count the context is checked here. With an estimate
    (an engine elsewhere tokenizes) that engine checks it, and its refusal is
    passed on: the cap is then what the client asked, or the whole context, an
    upper bound for reserving budget that the engine is not told.
    """
    limit = engine.max_context
    if not prompt.count_exact:
        return (limit, False) if requested is None else (requested, True)
    prompt_tokens = prompt.token_count
    if requested is None:
        if prompt_tokens >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{param} resulted in {prompt_tokens} tokens. Please reduce the length of the "
                f"{param}.",
                param=param,
            )
        return limit - prompt_tokens, False
    if prompt_tokens + requested > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {param}, {requested} "
            f"in the completion). Please reduce the length of the {param} or completion.",
            param=param,
        )
    return requested, True


def check_choices(engine: Engine, n: int) -> None:
    if n > engine.capacity:
        raise InvalidRequest(
            f"'n' is {n}, but this server runs at most {engine.capacity} sequences at once.",
            param="n",
        )
