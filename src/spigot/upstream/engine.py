"""A model served by other OpenAI-compatible servers, as an ``Engine`` (gateway mode).

Each choice of a request is its own upstream request (``n`` = 1), routed to
one of the model's targets (``routing``) and followed by its own task
(``sequence``). Prompts are not tokenized here: they go upstream as messages,
text or token ids, with an estimate of their size for metering (``usage``
states the rule); the upstream's usage replaces the estimate when it comes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from spigot.engine.protocol import EngineUnavailable, PromptError, Unsupported
from spigot.engine.stream import RequestStream
from spigot.engine.types import (
    Constraint,
    FinishReason,
    GenOutput,
    GenRequest,
    Prompt,
    Usage,
    UsageSource,
)
from spigot.upstream.config import ModelRoute, Target
from spigot.upstream.routing import Router
from spigot.upstream.sequence import Group, SequenceRun
from spigot.upstream.upstream import Upstream
from spigot.upstream.usage import LocalTokenizer, TokenCounter, estimate_chat, estimate_text

log = logging.getLogger(__name__)

# When neither the route nor the upstreams say how long a sequence may be.
DEFAULT_MAX_CONTEXT = 32768
# Sequences one request may ask for (n x prompts); the upstreams' limits apply too.
CAPACITY = 128
# How long ``stop`` waits for running sequences to end after cancelling them.
STOP_TIMEOUT = 5.0


class UpstreamEngine:
    """One served model name over its targets (an ``Engine``).

    ``upstreams`` maps names to ``Upstream`` objects that other engines may share;
    each engine opens them in ``start`` and closes them in ``stop``.
    """

    def __init__(
        self,
        route: ModelRoute,
        upstreams: Mapping[str, Upstream],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.route = route
        self.model_id = route.name
        self.created = int(time.time())
        self._router = Router(route.targets, upstreams, rng)
        self._upstreams = list({t.upstream: upstreams[t.upstream] for t in route.targets}.values())
        self.tokenizer = LocalTokenizer(route.tokenizer) if route.tokenizer is not None else None
        self._counter = TokenCounter(self.tokenizer)
        self._sequences: dict[str, SequenceRun] = {}
        self._open = False

    # -- what the API reads -------------------------------------------------------

    @property
    def max_context(self) -> int:
        """The route's, else the least any target's upstream lists (learned at start or by
        a later health check), else ``DEFAULT_MAX_CONTEXT``."""
        if self.route.max_context is not None:
            return self.route.max_context
        known = [c for t in self.route.targets if (c := self._listed_context(t)) is not None]
        return min(known) if known else DEFAULT_MAX_CONTEXT

    def _listed_context(self, target: Target) -> int | None:
        for model in self._router.upstream(target).models() or ():
            if model.id == target.model:
                return model.max_context
        return None

    @property
    def capacity(self) -> int:
        return CAPACITY

    @property
    def vocab_size(self) -> int | None:
        return None

    @property
    def tokenizes_locally(self) -> bool:
        return False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the upstreams (pools, health checks) and learn the model's context length.

        An upstream that is down is logged and checked again later; it does not fail
        the start.
        """
        self.created = int(time.time())
        await asyncio.gather(*(u.open() for u in self._upstreams))
        self._open = True
        for target in self.route.targets:
            upstream = self._router.upstream(target)
            models = upstream.models()
            if models is None:
                log.warning(
                    "%s: upstream %s did not list its models; it is checked again every %g s",
                    self.model_id,
                    upstream.name,
                    upstream.config.health_interval,
                )
                continue
            found = {m.id: m for m in models}
            if target.model not in found:
                log.warning(
                    "%s: upstream %s does not list the model %r (it lists %s)",
                    self.model_id,
                    upstream.name,
                    target.model,
                    ", ".join(sorted(found)) or "none",
                )

    async def stop(self) -> None:
        running = list(self._sequences.values())
        for sequence in running:
            sequence.stopping = True
            sequence.cancel()
        tasks = [s.task for s in running if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        if self._open:
            self._open = False
            await asyncio.gather(*(u.close() for u in self._upstreams))

    # -- prompts -----------------------------------------------------------------

    def prepare_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        if not messages:
            raise PromptError("'messages' must hold at least one message.")
        estimate = estimate_chat(messages, self.tokenizer)
        if tools:
            # The upstream renders the tools into its prompt: they count as its text.
            estimate += estimate_text(json.dumps(list(tools)), self.tokenizer)
        return Prompt(
            token_count=estimate,
            messages=tuple(messages),
            count_exact=False,
            tools=tuple(tools) if tools else None,
        )

    def prepare_text(self, text: str) -> Prompt:
        return Prompt(token_count=estimate_text(text, self.tokenizer), text=text, count_exact=False)

    def prepare_token_ids(self, token_ids: Sequence[int]) -> Prompt:
        bad = next((t for t in token_ids if not isinstance(t, int) or t < 0), None)
        if bad is not None:
            raise PromptError(f"Invalid token id {bad}.")
        return Prompt.of_tokens(token_ids)

    def prepare_constraint(self, constraint: Constraint) -> Constraint:
        # The upstream enforces the format itself (payload.py sends it the
        # request's OpenAI fields); a grammar alone means nothing to it.
        if not constraint.openai:
            raise Unsupported(
                f"The model '{self.model_id}' is served by another server: it cannot "
                "enforce this constraint."
            )
        return constraint

    def detokenize(self, token_ids: Sequence[int]) -> str:
        raise Unsupported(
            f"The model '{self.model_id}' is served by another server: its tokens are not "
            "known here."
        )

    # -- requests ----------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"spigot-{uuid.uuid4().hex[:24]}"

    def submit(self, requests: list[GenRequest]) -> RequestStream:
        """Route every sequence and start it; raises ``QueueFull`` when the targets are busy.

        ``ready()`` of the stream returns once every sequence had its first upstream
        event, or raises ``EngineRefused`` / ``EngineUnavailable``.
        """
        if not requests:
            raise ValueError("nothing to submit")
        placements = self._router.place(len(requests))  # QueueFull
        stream = RequestStream(requests, self.abort, started=False)
        if placements is None:
            error = EngineUnavailable(
                f"No upstream server of the model '{self.model_id}' is available.",
                retry_after=self._router.retry_after(),
            )
            stream.refuse(error)
            for request in requests:
                stream.deliver(
                    request.request_id,
                    GenOutput(
                        request.choice_index,
                        "",
                        finish_reason=FinishReason.ERROR,
                        usage=Usage(0, 0, source=UsageSource.PARTIAL),
                        error=str(error),
                    ),
                )
            return stream
        group = Group(stream, waiting=len(requests))
        for request, placement in zip(requests, placements, strict=True):
            sequence = SequenceRun(
                request, group, self.route, self._router, self._counter, placement, self._done
            )
            group.sequences.append(sequence)
            self._sequences[request.request_id] = sequence
        for sequence in group.sequences:
            sequence.start()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop one sequence: its HTTP response is closed at once; an ABORT output follows."""
        sequence = self._sequences.get(request_id)
        if sequence is not None:
            sequence.cancel()

    def _done(self, sequence: SequenceRun) -> None:
        self._sequences.pop(sequence.request.request_id, None)

    def stats(self) -> dict[str, int | float | None]:
        live = [s for s in self._sequences.values() if not s.finished]
        running = sum(1 for s in live if s.started)
        out: dict[str, int | float | None] = {
            "in_flight": len(live),
            "running": running,
            "waiting": len(live) - running,
        }
        for upstream in self._upstreams:
            out.update(upstream.stats())
        return out
