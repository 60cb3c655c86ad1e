"""A scripted engine at the protocol level: the API's tests without llama.cpp.

``ScriptedEngine`` implements ``spigot.engine.protocol.Engine`` (checked by mypy
at the bottom) with no model and no threads. Everything is deterministic:

- Tokens are words. A prompt is rendered (chat: one ``role: content`` line per
  message) and split on whitespace; each word is one token, its id taken from a
  vocabulary table that grows as words are seen. ``/tokenize`` and token-id
  prompts work on those ids.
- Each sequence streams scripted pieces, one output (and one completion token)
  per piece, every ``delay`` seconds, all choices of a request in turn (choice
  0, 1, 0, 1 ...). The default pieces are the prompt's words. ``max_tokens``
  cuts them (finish ``length``); otherwise the finish is ``stop`` or
  ``finish_reason``. The last output carries the usage (``usage_source``).
- Faults: ``fail_after`` N outputs (an ``ERROR`` output with ``error``),
  ``refuse`` (``ready()`` raises it: ``EngineRefused`` or ``EngineUnavailable``),
  ``queue_limit`` (``QueueFull`` beyond it). ``abort`` ends a sequence at once
  with an ``ABORT`` output and the usage until then.
- Constraints: ``prepare_constraint`` keeps each one in ``constraints`` and
  compiles nothing; the grammar text ``"invalid"`` raises ``PromptError`` (as an
  engine's grammar compiler refusing it), and a remote engine refuses a
  constraint without OpenAI fields (``Unsupported``), as ``UpstreamEngine`` does.
  The pieces are not made to match the grammar: script them.
- Remote mode (``ScriptedEngine.remote()``, or the options one by one): no local
  tokenizer (``tokenizes_locally`` False, ``vocab_size`` None, ``detokenize``
  raises ``Unsupported``), prompts keep their messages or text with an estimate
  (``count_exact`` False; ``estimate``: characters by default), and the usage's
  ``prompt_tokens`` is the exact word count, not the estimate; ``chunk_extra``
  and ``delta_extra`` ride on the content outputs.

The options are plain attributes: a test may change them between requests.
What the API asked is kept in ``prepared``, ``submitted`` and ``aborted``; each
sequence's last output (with its usage) in ``ended``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spigot.engine.protocol import PromptError, QueueFull, Unsupported
from spigot.engine.stream import RequestStream
from spigot.engine.tool_format import generic_messages
from spigot.engine.types import (
    Constraint,
    FinishReason,
    GenOutput,
    GenRequest,
    Prompt,
    TokenLogprob,
    Usage,
    UsageSource,
)

if TYPE_CHECKING:
    from spigot.engine.protocol import Engine

Pieces = Sequence[str] | Callable[[GenRequest], Sequence[str]]

# The grammar text ``prepare_constraint`` refuses.
INVALID_GRAMMAR = "invalid"


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The fake chat template: one ``role: content`` line per message."""
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


def count_words(text: str) -> int:
    """The fake tokenizer's count: whitespace-separated words."""
    return len(text.split())


def words_as_pieces(text: str) -> list[str]:
    """``"a b c"`` -> ``["a", " b", " c"]``: the default reply, one token a word."""
    return [word if i == 0 else f" {word}" for i, word in enumerate(text.split())]


@dataclass(slots=True)
class _Sequence:
    request: GenRequest
    stream: RequestStream
    pieces: list[str]
    finish: FinishReason
    prompt_tokens: int
    sent: int = 0  # outputs (tokens) delivered so far
    text: str = ""  # the text delivered so far (for stop strings)
    done: bool = False


class ScriptedEngine:
    """One fake model: an ``Engine`` whose every output is scripted."""

    def __init__(
        self,
        model_id: str = "scripted",
        *,
        pieces: Pieces | None = None,
        delay: float = 0.0,
        finish_reason: FinishReason | None = None,
        usage_source: UsageSource = UsageSource.ENGINE,
        cut_source: UsageSource = UsageSource.PARTIAL,
        cached_tokens: int = 0,
        reported_prompt_tokens: int | None = None,
        fail_after: int | None = None,
        error_message: str = "scripted engine failure",
        refuse: BaseException | None = None,
        queue_limit: int = 64,
        capacity: int = 16,
        max_context: int = 4096,
        vocab_size: int | None = 1000,
        tokenizes_locally: bool = True,
        count_exact: bool = True,
        estimate: Callable[[str], int] = len,
        chunk_extra: Mapping[str, Any] | None = None,
        delta_extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_id = model_id
        self.created = int(time.time())
        self.max_context = max_context
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.tokenizes_locally = tokenizes_locally
        # The script.
        self.pieces = pieces
        self.delay = delay
        self.finish_reason = finish_reason
        self.usage_source = usage_source
        self.cut_source = cut_source  # of ERROR and ABORT outputs' usage
        self.cached_tokens = cached_tokens
        self.reported_prompt_tokens = reported_prompt_tokens
        self.fail_after = fail_after
        self.error_message = error_message
        self.refuse = refuse
        self.queue_limit = queue_limit
        self.count_exact = count_exact
        self.estimate = estimate
        self.chunk_extra = chunk_extra
        self.delta_extra = delta_extra
        # What happened.
        self.started = False
        self.prepared: list[Prompt] = []
        # Each chat prepared: (messages, tools) as the API passed them.
        self.chats: list[tuple[list[Mapping[str, Any]], list[Mapping[str, Any]] | None]] = []
        self.constraints: list[Constraint] = []
        self.submitted: list[GenRequest] = []
        self.aborted: list[str] = []
        self.ended: dict[str, GenOutput] = {}  # request id -> its last output
        self.generating = asyncio.Event()  # set by every submit that starts sequences
        self._vocab: dict[str, int] = {}
        self._words: dict[int, str] = {}
        self._lock = threading.Lock()  # prepare_* runs in the prep pool's threads
        self._live: dict[str, _Sequence] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def remote(cls, model_id: str = "remote", **options: Any) -> ScriptedEngine:
        """An engine elsewhere: no tokenizer here, estimates, the upstream's usage."""
        defaults: dict[str, Any] = {
            "vocab_size": None,
            "tokenizes_locally": False,
            "count_exact": False,
            "usage_source": UsageSource.UPSTREAM,
        }
        return cls(model_id, **{**defaults, **options})

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        for request_id in list(self._live):
            self.abort(request_id)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.started = False

    @property
    def running(self) -> int:
        """Sequences that have not delivered their last output."""
        return len(self._live)

    def stats(self) -> dict[str, int | float | None]:
        return {"running": len(self._live), "submitted": len(self.submitted)}

    # -- prompts -----------------------------------------------------------------

    def _ids_of(self, text: str) -> list[int]:
        ids = []
        with self._lock:
            for word in text.split():
                token = self._vocab.get(word)
                if token is None:
                    token = len(self._vocab) + 1  # 0 is never a word
                    if self.vocab_size is not None and token >= self.vocab_size:
                        raise PromptError("The scripted engine's vocabulary is full.")
                    self._vocab[word] = token
                    self._words[token] = word
                ids.append(token)
        return ids

    def _prompt_of(self, rendered: str, **kept: Any) -> Prompt:
        if self.count_exact:
            prompt = Prompt.of_tokens(self._ids_of(rendered))
        else:
            prompt = Prompt(token_count=self.estimate(rendered), count_exact=False, **kept)
        self.prepared.append(prompt)
        return prompt

    def prepare_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        if not messages:
            raise PromptError("'messages' must hold at least one message.")
        # A template that does not know tools: the generic format, as the embedded model.
        rendered = render_chat(generic_messages(messages, tools))
        self.chats.append((list(messages), list(tools) if tools else None))
        kept = {"tools": tuple(tools)} if tools else {}
        return self._prompt_of(rendered, messages=tuple(messages), **kept)

    def prepare_text(self, text: str) -> Prompt:
        if not text.strip():
            raise PromptError("The prompt has no words.")
        return self._prompt_of(text, text=text)

    def prepare_token_ids(self, token_ids: Sequence[int]) -> Prompt:
        limit = self.vocab_size
        bad = next(
            (
                t
                for t in token_ids
                if not isinstance(t, int) or t < 0 or (limit is not None and t >= limit)
            ),
            None,
        )
        if bad is not None:
            raise PromptError(f"Invalid token id {bad}.")
        prompt = Prompt.of_tokens(token_ids)
        self.prepared.append(prompt)
        return prompt

    def prepare_constraint(self, constraint: Constraint) -> Constraint:
        if constraint.grammar == INVALID_GRAMMAR:
            raise PromptError("The grammar is not valid: scripted refusal")
        if not self.tokenizes_locally and not constraint.openai:
            raise Unsupported(f"The model '{self.model_id}' cannot constrain this output.")
        with self._lock:
            self.constraints.append(constraint)
        return constraint

    def detokenize(self, token_ids: Sequence[int]) -> str:
        if not self.tokenizes_locally:
            raise Unsupported(f"The model '{self.model_id}' has no tokenizer here.")
        return " ".join(self._words.get(t, f"<{t}>") for t in token_ids)

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.messages is not None:
            return render_chat(prompt.messages)
        if prompt.text is not None:
            return prompt.text
        if self.tokenizes_locally:
            return self.detokenize(prompt.token_ids)
        return " ".join(f"<{t}>" for t in prompt.token_ids)

    def _exact_prompt_tokens(self, prompt: Prompt) -> int:
        if self.reported_prompt_tokens is not None:
            return self.reported_prompt_tokens
        if prompt.token_ids:
            return len(prompt.token_ids)
        return count_words(self._prompt_text(prompt))

    # -- requests ----------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"scripted-{uuid.uuid4().hex[:16]}"

    def submit(self, requests: list[GenRequest]) -> RequestStream:
        if not requests:
            raise ValueError("nothing to submit")
        if len(self._live) + len(requests) > self.queue_limit:
            raise QueueFull(
                f"{len(self._live)} sequences are running; the limit is {self.queue_limit}"
            )
        self.submitted.extend(requests)
        if self.refuse is not None:
            # Refused before anything was generated: ready() raises, every sequence ends.
            stream = RequestStream(requests, self.abort, started=False)
            stream.refuse(self.refuse)
            for request in requests:
                stream.deliver(
                    request.request_id,
                    GenOutput(
                        request.choice_index,
                        "",
                        finish_reason=FinishReason.ERROR,
                        usage=Usage(0, 0, source=self.cut_source),
                        error=str(self.refuse),
                    ),
                )
            return stream
        stream = RequestStream(requests, self.abort)
        sequences = [self._sequence(request, stream) for request in requests]
        for sequence in sequences:
            self._live[sequence.request.request_id] = sequence
        self.generating.set()
        task = asyncio.get_running_loop().create_task(self._run(sequences))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    def _sequence(self, request: GenRequest, stream: RequestStream) -> _Sequence:
        if self.pieces is None:
            pieces = words_as_pieces(self._prompt_text(request.prompt))
        elif callable(self.pieces):
            pieces = list(self.pieces(request))
        else:
            pieces = list(self.pieces)
        finish = self.finish_reason or FinishReason.STOP
        if len(pieces) > request.params.max_tokens:
            pieces = pieces[: request.params.max_tokens]
            finish = FinishReason.LENGTH
        return _Sequence(request, stream, pieces, finish, self._exact_prompt_tokens(request.prompt))

    async def _run(self, sequences: list[_Sequence]) -> None:
        try:
            while live := [s for s in sequences if not s.done]:
                await asyncio.sleep(self.delay)
                for sequence in live:
                    if not sequence.done:  # an abort may have ended it meanwhile
                        self._step(sequence)
        finally:
            for sequence in sequences:
                self._live.pop(sequence.request.request_id, None)

    def _usage(self, sequence: _Sequence, source: UsageSource) -> Usage:
        return Usage(sequence.prompt_tokens, sequence.sent, self.cached_tokens, source)

    def _end(self, sequence: _Sequence, output: GenOutput) -> None:
        sequence.done = True
        self._live.pop(sequence.request.request_id, None)
        self.ended[sequence.request.request_id] = output
        sequence.stream.deliver(sequence.request.request_id, output)

    def _step(self, sequence: _Sequence) -> None:
        choice = sequence.request.choice_index
        if self.fail_after is not None and sequence.sent >= self.fail_after:
            usage = self._usage(sequence, self.cut_source)
            self._end(
                sequence,
                GenOutput(
                    choice,
                    "",
                    finish_reason=FinishReason.ERROR,
                    usage=usage,
                    error=self.error_message,
                ),
            )
            return
        if sequence.sent >= len(sequence.pieces):
            self._end(
                sequence,
                GenOutput(
                    choice,
                    "",
                    finish_reason=sequence.finish,
                    usage=self._usage(sequence, self.usage_source),
                ),
            )
            return
        piece = sequence.pieces[sequence.sent]
        sequence.sent += 1
        stops = sequence.request.params.stop
        whole = sequence.text + piece
        at = min((i for s in stops if (i := whole.find(s)) >= 0), default=-1)
        if at >= 0:  # a stop string: its text is never sent (no hold-back across pieces)
            text = whole[len(sequence.text) : max(at, len(sequence.text))]
            self._end(
                sequence,
                GenOutput(
                    choice,
                    text,
                    self._logprobs(sequence, text),
                    finish_reason=FinishReason.STOP,
                    usage=self._usage(sequence, self.usage_source),
                ),
            )
            return
        sequence.text = whole
        sequence.stream.deliver(
            sequence.request.request_id,
            GenOutput(
                choice,
                piece,
                self._logprobs(sequence, piece),
                chunk_extra=self.chunk_extra,
                delta_extra=self.delta_extra,
            ),
        )

    @staticmethod
    def _logprobs(sequence: _Sequence, text: str) -> list[TokenLogprob]:
        wanted = sequence.request.params.logprobs
        if wanted is None or not text:
            return []
        top = tuple((text, text.encode(), -0.5) for _ in range(wanted))
        return [TokenLogprob(text, text.encode(), -0.5, top)]

    def abort(self, request_id: str) -> None:
        sequence = self._live.get(request_id)
        if sequence is None or sequence.done:
            return
        self.aborted.append(request_id)
        self._end(
            sequence,
            GenOutput(
                sequence.request.choice_index,
                "",
                finish_reason=FinishReason.ABORT,
                usage=self._usage(sequence, self.cut_source),
            ),
        )


if TYPE_CHECKING:
    _: Engine = ScriptedEngine()
    _remote: Engine = ScriptedEngine.remote()
