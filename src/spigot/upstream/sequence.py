"""One sequence's life on the upstreams: tries until a first event, then its stream.

Before the first data event nothing has reached the client, so a failure is
retried on another target (or, when none can take it, on the same one after
its ``Retry-After`` or a short pause). After it, a failure ends the sequence
with an ``ERROR`` output that carries what was served so far.

    refused connection, connect timeout, 408/429/5xx,     retried (up to the route's
    no data event within first_event_timeout,             ``attempts``); counted by
    an error object or garbage as the first event         the breaker
    another 4xx (or an error event naming one)            EngineRefused, no retry
    all tries failed                                      the last 408/429/5xx or error
                                                          event: EngineRefused; else
                                                          EngineUnavailable
    after the first event: a drop, idle_timeout,          ERROR output, PARTIAL usage
    EOF without a finish, an error event
    abort (the task is cancelled)                         the HTTP response is closed,
                                                          ABORT output, PARTIAL usage
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from spigot.engine.protocol import EngineRefused, EngineUnavailable
from spigot.engine.stream import RequestStream
from spigot.engine.types import FinishReason, GenOutput, GenRequest, Usage, UsageSource
from spigot.sse_parser import SSEParser
from spigot.upstream.chunks import ChoiceAssembler, MalformedEvent, UpstreamEventError
from spigot.upstream.config import ModelRoute, Target
from spigot.upstream.failures import RETRYABLE_4XX, Failure, http_failure
from spigot.upstream.payload import body_of, headers_of, is_chat, path_of
from spigot.upstream.routing import Router
from spigot.upstream.upstream import Slot, Upstream
from spigot.upstream.usage import TokenCounter

log = logging.getLogger(__name__)

# After the finishing chunk: how long the usage chunk and [DONE] may take.
FINISH_GRACE = 2.0
# A same-target retry without Retry-After waits this long times the attempt number.
BACKOFF = 0.2
# A finished stream's last bytes ([DONE]) are awaited this long before its
# connection is given up instead of reused.
DRAIN_TIMEOUT = 0.5


@dataclass(eq=False)
class Group:
    """The sequences of one submitted request, which start (or are refused) together."""

    stream: RequestStream
    waiting: int
    sequences: list[SequenceRun] = field(default_factory=list)
    refused: bool = False

    def started_one(self) -> None:
        self.waiting -= 1
        if self.waiting == 0 and not self.refused:
            self.stream.mark_started()

    def refuse(self, error: Exception) -> None:
        """One sequence could not start: the request fails, the others stop."""
        if self.refused:
            return
        self.refused = True
        self.stream.refuse(error)
        current = asyncio.current_task()
        for sequence in self.sequences:
            if sequence.task is not current:
                sequence.cancel()


class SequenceRun:
    """One ``GenRequest`` in flight: its task, its current target and what it produced."""

    def __init__(
        self,
        request: GenRequest,
        group: Group,
        route: ModelRoute,
        router: Router,
        counter: TokenCounter,
        placement: tuple[Target, Slot],
        on_done: Callable[[SequenceRun], None],
    ) -> None:
        self.request = request
        self.group = group
        self.route = route
        self.router = router
        self.counter = counter
        self.target, self.slot = placement
        self.started = False
        self.finished = False
        self.stopping = False  # the engine stops: no remote counting on the way out
        self.assembler = ChoiceAssembler(request.choice_index, chat=is_chat(request))
        self.task: asyncio.Task[None] | None = None
        self._on_done = on_done

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"upstream-{self.request.request_id}")

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- the whole life ----------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._tries()
        except asyncio.CancelledError:
            try:
                await self._end(FinishReason.ABORT, None)
            except asyncio.CancelledError:  # cancelled again while counting
                self._deliver(self._uncounted(FinishReason.ABORT))
            raise
        except Exception as exc:  # a bug here: the request must still end
            log.exception("upstream sequence %s failed", self.request.request_id)
            if not self.started:
                self._refuse(EngineUnavailable(f"The upstream request failed: {exc}"))
            else:
                await self._end(FinishReason.ERROR, f"The upstream request failed: {exc}")
        finally:
            self._release()
            self._on_done(self)

    async def _tries(self) -> None:
        tried: list[Target] = []
        attempt = 0
        while True:
            attempt += 1
            tried.append(self.target)
            upstream = self.slot.upstream
            try:
                await self._attempt(upstream)
                return
            except Failure as failure:
                if failure.counts:
                    upstream.failed(self.slot)
                self._release()
                if failure.fatal:
                    self._refuse(failure.final(None))
                    return
                log.warning(
                    "%s: try %d on %s/%s failed: %s",
                    self.request.request_id,
                    attempt,
                    self.target.upstream,
                    self.target.model,
                    failure.message,
                )
                if failure.retry_after is not None and failure.refusal is not None:
                    upstream.back_off(failure.retry_after)
                placement = None
                if attempt < self.route.attempts:
                    placement = await self._next_target(failure, attempt, tried)
                if placement is None:
                    self._refuse(failure.final(self.router.retry_after()))
                    return
                self.target, self.slot = placement
                self.assembler = ChoiceAssembler(
                    self.request.choice_index, chat=is_chat(self.request)
                )

    async def _next_target(
        self, failure: Failure, attempt: int, tried: list[Target]
    ) -> tuple[Target, Slot] | None:
        placement = self.router.acquire(avoid=self.target, tried=tried)
        if placement is not None or not failure.same_target:
            return placement
        wait = failure.retry_after if failure.retry_after is not None else BACKOFF * attempt
        if wait > self.route.max_retry_wait:
            return None
        await asyncio.sleep(wait + 0.01)
        slot = self.router.acquire_same(self.target)
        if slot is not None:
            return self.target, slot
        return self.router.acquire(tried=tried)

    # -- one try ---------------------------------------------------------------

    async def _attempt(self, upstream: Upstream) -> None:
        config = upstream.config
        client = upstream.client
        request = client.build_request(
            "POST",
            config.base_url.rstrip("/") + path_of(self.request),
            json=body_of(self.request, self.target.model),
            headers=headers_of(self.request),
        )
        parser = SSEParser()
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(config.first_event_timeout):
                    response = await client.send(request, stream=True)
                    stack.push_async_callback(response.aclose)
                    if response.status_code != 200:
                        raise await http_failure(response)
                    chunks = response.aiter_bytes()
                    rest = await self._first_event(chunks, parser)
            except TimeoutError:
                raise Failure(
                    f"no event within {config.first_event_timeout:g} s", same_target=False
                ) from None
            except httpx.TimeoutException as exc:
                raise Failure(_describe(exc), same_target=False) from None
            except httpx.HTTPError as exc:
                raise Failure(_describe(exc)) from None
            except UpstreamEventError as exc:
                status = exc.status
                refusal = EngineRefused(status or 502, exc.body, {})
                if status is not None and status < 500 and status not in RETRYABLE_4XX:
                    raise Failure(str(exc), counts=False, fatal=True, refusal=refusal) from None
                raise Failure(f"error event: {exc}", refusal=refusal) from None
            except MalformedEvent as exc:
                raise Failure(str(exc)) from None
            upstream.succeeded(self.slot)
            self.started = True
            self.group.started_one()
            await self._stream(chunks, parser, rest)

    async def _first_event(self, chunks: AsyncIterator[bytes], parser: SSEParser) -> list[str]:
        """Read until the first data event and feed it; the payloads read with it."""
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                payloads = _close(parser)
                if not payloads:
                    raise Failure("the stream ended before its first event") from None
            else:
                payloads = _parse(parser, chunk)
            if payloads:
                self._feed(payloads[0])  # raises before anything is delivered
                return payloads[1:]
            if parser.done:
                raise Failure("the stream ended before its first event")

    async def _stream(
        self, chunks: AsyncIterator[bytes], parser: SSEParser, payloads: list[str]
    ) -> None:
        """After the first event: deliver outputs until the stream ends, however it ends."""
        idle = self.slot.upstream.config.idle_timeout
        loop = asyncio.get_running_loop()
        error: str | None = None
        ended = False
        try:
            async with asyncio.timeout(None) as deadline:
                if self.assembler.finish is not None:
                    deadline.reschedule(loop.time() + FINISH_GRACE)
                while True:
                    for payload in payloads:
                        if self.assembler.finish is not None:
                            self._feed_quietly(payload)
                        elif self._feed_after_start(payload):
                            deadline.reschedule(loop.time() + FINISH_GRACE)
                    if parser.done or ended or self.assembler.complete:
                        break
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        payloads, ended = _close(parser), True
                    else:
                        payloads = _parse(parser, chunk)
        except TimeoutError:
            pass  # the finish came; usage and [DONE] did not follow in time
        except _StreamError as exc:
            error = str(exc)
        except MalformedEvent as exc:
            error = f"the upstream sent a malformed event: {exc}"
        except httpx.ReadTimeout:
            error = f"the upstream sent nothing for {idle:g} s"
        except httpx.HTTPError as exc:
            error = f"the upstream connection failed: {_describe(exc)}"
        if self.assembler.finish is not None:
            await self._end_finished()
            if not (parser.done or ended):
                await _drain(chunks, parser)
            return
        if error is None and parser.done:
            log.warning("%s: [DONE] came without a finish reason", self.request.request_id)
            self.assembler.finish = FinishReason.STOP
            await self._end_finished()
            return
        self.slot.upstream.failed(self.slot)
        await self._end(FinishReason.ERROR, error or "the upstream closed the stream unfinished")

    def _feed(self, payload: str) -> None:
        output = self.assembler.feed(payload)
        if output is not None:
            self._deliver(output)

    def _feed_after_start(self, payload: str) -> bool:
        """Feed a payload of a started, unfinished stream; True when it finished it."""
        try:
            self._feed(payload)
        except UpstreamEventError as exc:
            raise _StreamError(f"the upstream reported an error: {exc}") from None
        except MalformedEvent as exc:
            raise _StreamError(f"the upstream sent a malformed event: {exc}") from None
        return self.assembler.finish is not None

    def _feed_quietly(self, payload: str) -> None:
        """After the finish only usage matters; a late error changes nothing served."""
        try:
            self._feed(payload)
        except (UpstreamEventError, MalformedEvent) as exc:
            log.info("%s: after the finish: %s", self.request.request_id, exc)

    # -- endings ---------------------------------------------------------------

    async def _end_finished(self) -> None:
        output = self.assembler.take_final()
        if output is None:  # [DONE] without a finish reason
            output = GenOutput(self.request.choice_index, "", finish_reason=self.assembler.finish)
        usage = self.assembler.usage
        if usage is None:
            usage = await self._counted(UsageSource.COUNTED)
        output.usage = usage
        self._deliver(output)

    async def _end(self, reason: FinishReason, error: str | None) -> None:
        if self.finished:
            return
        if not self.started:
            usage = Usage(0, 0, source=UsageSource.PARTIAL)
            if reason is FinishReason.ABORT:
                self._refuse(EngineUnavailable("The request was cancelled before it started."))
                return
        else:
            usage = await self._counted(UsageSource.PARTIAL)
        self._deliver(
            GenOutput(self.request.choice_index, "", finish_reason=reason, usage=usage, error=error)
        )

    def _uncounted(self, reason: FinishReason) -> GenOutput:
        """The last output when there is no time to count: the estimate and the events."""
        usage = Usage(
            self.request.prompt.token_count if self.started else 0,
            self.assembler.content_events,
            source=UsageSource.PARTIAL,
        )
        return GenOutput(self.request.choice_index, "", finish_reason=reason, usage=usage)

    def _refuse(self, error: Exception) -> None:
        self.group.refuse(error)
        if not self.finished:
            self._deliver(
                GenOutput(
                    self.request.choice_index,
                    "",
                    finish_reason=FinishReason.ERROR,
                    usage=Usage(0, 0, source=UsageSource.PARTIAL),
                    error=str(error),
                )
            )

    async def _counted(self, source: UsageSource) -> Usage:
        """What the sequence consumed, when the upstream did not say (or not to the end)."""
        assembler = self.assembler
        if assembler.usage is not None:
            return Usage(
                assembler.usage.prompt_tokens,
                assembler.usage.completion_tokens,
                assembler.usage.cached_tokens,
                source=source if source is UsageSource.PARTIAL else UsageSource.UPSTREAM,
            )
        upstream = self.slot.upstream
        remote = not self.stopping
        try:
            client = upstream.client if remote else None
        except RuntimeError:
            client = None
        endpoint = upstream.tokenize if client is not None else None
        model = self.target.model
        try:
            prompt = await self.counter.prompt(client, endpoint, model, self.request.prompt)
            completion = await self.counter.completion(
                client, endpoint, model, assembler.text, assembler.content_events
            )
        except Exception:
            log.exception("%s: counting tokens failed", self.request.request_id)
            prompt, completion = self.request.prompt.token_count, assembler.content_events
        return Usage(prompt, completion, source=source)

    def _deliver(self, output: GenOutput) -> None:
        if self.finished:
            return
        if output.finished:
            self.finished = True
            self._release()  # its connection may still read [DONE]; the slot is free
        self.group.stream.deliver(self.request.request_id, output)

    def _release(self) -> None:
        self.slot.upstream.release(self.slot)


async def _drain(chunks: AsyncIterator[bytes], parser: SSEParser) -> None:
    """Read a finished stream's last bytes ([DONE]), so its connection can be reused."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError, StopAsyncIteration, ValueError):
        async with asyncio.timeout(DRAIN_TIMEOUT):
            while not parser.done:
                parser.feed(await chunks.__anext__())


def _parse(parser: SSEParser, chunk: bytes) -> list[str]:
    try:
        return parser.feed(chunk)
    except UnicodeDecodeError:
        raise MalformedEvent("an event line is not UTF-8") from None


def _close(parser: SSEParser) -> list[str]:
    try:
        return parser.close()
    except UnicodeDecodeError:
        raise MalformedEvent("an event line is not UTF-8") from None


class _StreamError(Exception):
    """A started stream failed (an error event, garbage)."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
