"""What the API layer may use of an engine, declared.

An engine serves one model: a local llama.cpp model in this process
(``spigot.engine.llamacpp``) or a model behind other OpenAI-compatible servers
(``spigot.upstream``). The API layer imports only this module and
``spigot.engine.types``; anything it needs of an engine is a member here.

Prompts: an engine turns a request's messages or text into a ``Prompt``.
One that tokenizes here gives exact token ids and count; one that sends text
elsewhere gives the text and an estimate (``Prompt.count_exact`` is False),
and the exact count arrives later in the outputs' ``Usage``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from spigot.engine.types import Constraint, GenOutput, GenRequest, Prompt


class QueueFull(Exception):
    """More sequences are waiting than the engine accepts; try again later."""


class PromptError(ValueError):
    """The prompt cannot be prepared (a chat template error, an invalid token id)."""


class Unsupported(PromptError):
    """This engine cannot do what the request asks (``/tokenize`` on a remote model)."""


class EngineRefused(Exception):
    """The engine answered the request with an HTTP error before generating anything.

    An upstream's own 4xx (a bad parameter it checks, its context length) reaches
    the client unchanged: ``status`` and ``body`` are the upstream's.
    """

    def __init__(self, status: int, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        message = body.get("error", {}).get("message") if isinstance(body, Mapping) else None
        super().__init__(message or f"engine answered {status}")
        self.status = status
        self.body = body
        self.headers = dict(headers)


class EngineUnavailable(Exception):
    """No engine behind this model could start the request (all down, full, or failing)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutputStream(Protocol):
    """The outputs of one API request (all of its choices), in arrival order.

    Every sequence delivers a last output with ``finish_reason`` set, also
    when aborted (``FinishReason.ABORT``, with the tokens it consumed) or when
    it failed after it started (``FinishReason.ERROR`` and ``error``).
    """

    def __aiter__(self) -> AsyncIterator[GenOutput]: ...

    async def ready(self) -> None:
        """Return once every sequence has started; raise ``EngineRefused`` or
        ``EngineUnavailable`` if one could not (nothing has been sent then)."""

    @property
    def finished(self) -> bool:
        """Every output has been delivered and read."""

    @property
    def running(self) -> bool:
        """Some sequence has not delivered its last output yet."""

    def abort(self) -> None:
        """Stop whatever still runs; safe to call more than once."""

    def abort_choice(self, choice_index: int) -> None:
        """Stop one choice (a guard blocked it); its last output still arrives."""

    async def drain(self, within: float = 10.0) -> list[GenOutput]:
        """Every output still to come, after ``abort``."""


class Engine(Protocol):
    """One served model."""

    @property
    def model_id(self) -> str: ...

    @property
    def created(self) -> int:
        """Unix time the model was loaded or configured (``/v1/models``)."""

    @property
    def max_context(self) -> int:
        """Tokens per sequence, prompt and completion (an engine elsewhere: as configured
        or discovered; it checks prompts against its own limit)."""

    @property
    def capacity(self) -> int:
        """Sequences one request may ask for at most (``n`` x prompts)."""

    @property
    def vocab_size(self) -> int | None:
        """Token ids a request may name (``logit_bias``); None: the engine elsewhere checks."""

    @property
    def tokenizes_locally(self) -> bool:
        """Prompts get exact token ids here (``/tokenize`` works, token prompts are checked)."""

    async def start(self) -> None:
        """Load, connect or measure what is needed before the first request."""

    async def stop(self) -> None: ...

    def prepare_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        """A conversation's prompt: OpenAI chat messages (assistant ``tool_calls``,
        ``tool`` turns with ``tool_call_id``) and the tools shown to the model
        (OpenAI tool objects; ``spigot.engine.tool_format``). CPU work that grows with
        the input: callers run it off the event loop; safe from any thread. Raises
        ``PromptError``."""

    def prepare_constraint(self, constraint: Constraint) -> Constraint:
        """Compile ``constraint`` ahead of ``submit`` (CPU work: callers run it off the
        event loop) and return what to submit (it may carry the compiled form); raises
        ``PromptError`` for a grammar this engine cannot enforce, ``Unsupported``
        where constrained output is not available at all."""

    def prepare_text(self, text: str) -> Prompt:
        """A raw completions prompt (special tokens are parsed: it is model input)."""

    def prepare_token_ids(self, token_ids: Sequence[int]) -> Prompt:
        """A prompt given as token ids; raises ``PromptError`` for ids the model lacks."""

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of token ids; raises ``Unsupported`` where tokens are not known here."""

    def new_request_id(self) -> str: ...

    def submit(self, requests: list[GenRequest]) -> OutputStream:
        """Start generating; raises ``QueueFull`` before accepting any sequence."""

    def stats(self) -> dict[str, int | float | None]: ...
