"""A local llama.cpp model as an ``Engine``: submit requests, iterate their outputs, abort.

The engine thread hands each step's outputs over in one
``call_soon_threadsafe``; they are sorted into the per-request streams on the
event loop, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from spigot.engine.llamacpp.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from spigot.engine.llamacpp.core import EngineCore
from spigot.engine.llamacpp.model import ContextOptions, LlamaCppModel
from spigot.engine.llamacpp.model_protocol import ModelProtocol
from spigot.engine.llamacpp.prompt_tokens import PromptTokenizer
from spigot.engine.llamacpp.scheduler import Scheduler, SchedulerConfig
from spigot.engine.protocol import PromptError, QueueFull
from spigot.engine.stream import RequestStream
from spigot.engine.tool_format import for_template, template_knows_tools
from spigot.engine.types import Constraint, GenOutput, GenRequest, Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    n_ctx: int = 8192
    parallel: int = 8
    max_queue: int = 64
    threads: int = 2
    batch_tokens: int = 512
    prefill_chunk: int = 256
    prefill_chunk_decoding: int = 256
    prefill_slowdown: float = 3.0
    prefix_cache: bool = True
    prefix_cache_tokens: int = 0
    # Host memory for prefixes evicted from the KV pool (the second tier).
    prefix_cache_ram_mb: int = 96
    # "key": a prompt reuses only prefixes computed under its own
    # ``GenRequest.cache_scope`` (one API key), so cached_tokens and time to
    # first token reveal nothing across tenants. "shared": every request
    # reuses every prefix, for single-tenant deployments that want the most reuse.
    prefix_cache_scope: Literal["key", "shared"] = "key"
    # Special-token text in chat messages ("<|im_end|>") becomes the special
    # token instead of plain text: lets users forge turns; for trusted clients.
    special_tokens_in_content: bool = False


class LlamaCppEngine:
    """One served model: llama.cpp in an engine thread, bridged to asyncio (an ``Engine``)."""

    def __init__(self, model_id: str, model: ModelProtocol, options: EngineOptions) -> None:
        """Serve an already loaded model; tests pass a fake one for fault injection."""
        self.model_id = model_id
        self.created = int(time.time())
        self.options = options
        self.model = model
        # Per sequence: our own limit, and the model's trained context.
        self.max_context = min(self.model.n_ctx, self.model.n_ctx_train or self.model.n_ctx)
        self.chat_template = ChatTemplate(
            self.model.metadata("tokenizer.chat_template") or CHATML_TEMPLATE,
            bos_token=self.model.token_text(self.model.bos_id) if self.model.bos_id >= 0 else "",
            eos_token=self.model.token_text(self.model.eos_id) if self.model.eos_id >= 0 else "",
        )
        self.prompt_tokenizer = PromptTokenizer(
            self.model.special_tokens(),
            self._tokenize_plain,
            template_source=self.chat_template.source,
        )
        scheduler = Scheduler(
            SchedulerConfig(
                max_running=options.parallel,
                kv_capacity=self.model.n_ctx,
                max_step_tokens=max(options.batch_tokens, options.parallel),
                prefill_chunk=options.prefill_chunk,
                prefix_cache=options.prefix_cache,
                prefill_chunk_decoding=options.prefill_chunk_decoding,
                prefix_cache_tokens=options.prefix_cache_tokens,
                # Sized on the engine thread at start (``_size_host_tier``).
                saved_prefix_tokens=0,
            )
        )
        self.core = EngineCore(
            self.model, scheduler, self._emit_from_thread, options.prefill_slowdown
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()

    @classmethod
    def load(cls, model_id: str, path: Path, options: EngineOptions) -> LlamaCppEngine:
        model = LlamaCppModel(
            path,
            ContextOptions(
                n_ctx=options.n_ctx,
                n_seq_max=options.parallel,
                n_batch=max(options.batch_tokens, options.parallel),
                n_threads=options.threads,
            ),
        )
        return cls(model_id, model, options)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread; it measures what it needs before any request."""
        self._loop = asyncio.get_running_loop()
        self.core.start()
        if self.options.prefix_cache and self.options.prefix_cache_ram_mb > 0:
            # The measurement decodes, so it runs on the engine thread
            # (``LlamaCppModel.decode`` says why); requests queue behind it.
            async with asyncio.timeout(60):
                await asyncio.wrap_future(self.core.call(self._size_host_tier))

    def _size_host_tier(self) -> None:
        per_token = self.model.kv_bytes_per_token()
        tokens = self.options.prefix_cache_ram_mb * 2**20 // per_token
        self.core.scheduler.saved.capacity_tokens = tokens

    async def stop(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the engine thread and free the model (blocks until the step ends)."""
        # Freeing the model under a running step would crash the process;
        # leave it to process exit if the thread does not stop in time.
        if self.core.stop():
            self.model.close()
        else:
            log.warning(
                "engine thread for %s did not stop; leaving the model loaded", self.model_id
            )

    # -- prompts ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    @property
    def tokenizes_locally(self) -> bool:
        return True

    def prepare_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        """The prompt tokens of a conversation (``PromptError`` from the template).

        Tools and tool turns go to a template that knows tools as they are, to any
        other in the generic format (``spigot.engine.tool_format``).

        Special tokens spelled in the messages are text unless the options
        say otherwise (``PromptTokenizer.chat``). Linear in the input, but
        CPU work that grows with it: callers run it off the event loop. Safe
        from any thread while the engine thread decodes.
        """
        turns, template_tools = for_template(
            [_for_template(m) for m in messages],
            tools,
            knows_tools=template_knows_tools(self.chat_template.source),
        )
        specials = self.options.special_tokens_in_content
        if template_tools and not specials:
            # Tools are client input like the messages: their texts stay text.
            template_tools = self.prompt_tokenizer.escape_value(template_tools)

        def render(escaped: list[dict[str, Any]]) -> str:
            return self.chat_template.render(escaped, tools=template_tools)

        try:
            tokens = self.prompt_tokenizer.chat(render, turns, specials_in_content=specials)
        except ChatTemplateError as exc:
            raise PromptError(str(exc)) from None
        return Prompt.of_tokens(tokens)

    def prepare_constraint(self, constraint: Constraint) -> Constraint:
        """Compile the grammar (and, the first time, the model's llguidance tokenizer)
        off the engine thread; ``PromptError`` with llguidance's reason if refused.

        The returned constraint carries the compiled matcher, and the engine thread
        takes a copy of it per sequence: however many other grammars pass through
        the cache meanwhile, the engine thread never compiles one."""
        return self.core.grammars.prepare(constraint)

    def prepare_text(self, text: str) -> Prompt:
        return Prompt.of_tokens(self.tokenize_prompt(text))

    def prepare_token_ids(self, token_ids: Sequence[int]) -> Prompt:
        bad = next((t for t in token_ids if not 0 <= t < self.model.n_vocab), None)
        if bad is not None:
            raise PromptError(f"Invalid token id {bad}.")
        return Prompt.of_tokens(token_ids)

    def tokenize_prompt(self, text: str) -> list[int]:
        """A raw prompt's tokens, specials parsed (completions prompts are raw model input).

        Linear in the text; safe from any thread while the engine thread decodes.
        """
        tokens = self.prompt_tokenizer.tokenize(text)
        if self.model.add_bos:
            tokens.insert(0, self.model.bos_id)
        if self.model.add_eos:
            tokens.append(self.model.eos_id)
        if not tokens:
            # An empty prompt starts from the start of a text, as OpenAI's
            # models start from <|endoftext|>.
            start = self.model.bos_id if self.model.bos_id >= 0 else self.model.eos_id
            tokens = [start]
        return tokens

    def _tokenize_plain(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=False, parse_special=False)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        pieces = self.model.pieces
        return b"".join(pieces[t] for t in token_ids).decode("utf-8", errors="replace")

    # -- requests --------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"{self.model_id}-{next(self._ids)}"

    @property
    def capacity(self) -> int:
        return self.options.parallel + self.options.max_queue

    def submit(self, requests: list[GenRequest]) -> RequestStream:
        """Queue sequences for generation; raises QueueFull before accepting any."""
        if any(not r.prompt.token_ids for r in requests):
            raise ValueError("a prompt must have at least one token")
        if len(self._streams) + len(requests) > self.capacity:
            raise QueueFull(
                f"{len(self._streams)} sequences are running or queued; "
                f"the limit is {self.capacity}"
            )
        if self.options.prefix_cache_scope == "shared":
            # One scope for everyone: the scheduler then matches every prefix.
            requests = [replace(r, cache_scope="") for r in requests]
        stream = RequestStream(requests, self.abort)
        for request in requests:
            self._streams[request.request_id] = stream
            self.core.add(request)
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self.core.abort(request_id)

    def stats(self) -> dict[str, int | float | None]:
        return {**self.core.stats(), "in_flight": len(self._streams)}

    # -- engine thread -> loop ---------------------------------------------------

    def _emit_from_thread(self, outputs: list[tuple[str, GenOutput]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since the check
            loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[tuple[str, GenOutput]]) -> None:
        for request_id, output in outputs:
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # aborted meanwhile
            if output.finished:
                del self._streams[request_id]
            stream.deliver(request_id, output)


def _for_template(message: Mapping[str, Any]) -> dict[str, Any]:
    # Templates know system/user/assistant; "developer" is OpenAI's new name for system.
    if message.get("role") == "developer":
        return {**message, "role": "system"}
    return dict(message)
