"""Plain data passed between the API layer and an engine.

Nothing here knows about HTTP, pydantic or llama.cpp: an engine that talks to
another server over HTTP produces the same outputs as the in-process one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"  # client went away; never sent on the wire
    ERROR = "error"  # engine failure; sent as an in-band error event


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a sequence's output must match, enforced while it is generated.

    ``grammar`` is an llguidance grammar (``llguidance.LLMatcher.grammar_from_*``):
    an engine that samples here masks every token the grammar does not allow, so
    the output always matches. With a ``trigger`` the grammar is lazy: output is
    free until the trigger string appears, and from the trigger on (the trigger
    itself included) it must match ``grammar``; a tool call in ``auto`` mode.
    ``openai`` holds the request fields that say the same in OpenAI's terms
    (``response_format``, ``tools``, ``tool_choice``), for an engine elsewhere
    that is sent those instead of the grammar.
    """

    grammar: str
    trigger: str | None = None
    openai: Mapping[str, Any] = field(default_factory=dict)
    # The engine's compiled form, set by ``Engine.prepare_constraint`` (opaque to
    # everyone else): the sequence then starts from it and nothing compiles while
    # other streams wait on the engine.
    compiled: object | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    # Number of most likely alternatives to report per token; None = no logprobs.
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # False: the client set no max_tokens and ``max_tokens`` is spigot's cap for
    # reservations; an engine elsewhere is then not told it (it has its own).
    max_tokens_given: bool = True
    # Fields the client did not set ("temperature", "top_p"): they hold spigot's
    # default, and an engine elsewhere is not sent them (it applies its own).
    defaulted: frozenset[str] = frozenset()
    # Structured output or a tool call: tokens outside the grammar are never sampled.
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class UsageSource(enum.StrEnum):
    """Where a request's token counts come from (a ledger column)."""

    ENGINE = "engine"  # a local model counted its own tokens
    UPSTREAM = "upstream"  # an upstream server reported usage
    COUNTED = "counted"  # the upstream sent none: spigot counted with a tokenizer
    PARTIAL = "partial"  # the stream was cut short: what was served until then


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a sequence starts from.

    An engine that tokenizes here fills ``token_ids`` (and ``token_count`` is
    their number); one that sends the prompt elsewhere keeps the ``messages``
    or ``text`` and an estimate: ``count_exact`` is then False and the real
    count arrives in the outputs' ``Usage``.
    """

    token_count: int
    token_ids: tuple[int, ...] = ()
    messages: tuple[Mapping[str, Any], ...] | None = None
    text: str | None = None
    count_exact: bool = True
    # The tools shown with ``messages`` (OpenAI tool objects), for an engine elsewhere.
    tools: tuple[Mapping[str, Any], ...] | None = None

    @classmethod
    def of_tokens(cls, token_ids: Sequence[int]) -> Prompt:
        ids = tuple(token_ids)
        return cls(token_count=len(ids), token_ids=ids)


@dataclass(frozen=True, slots=True)
class GenRequest:
    """One sequence to generate: one choice of one HTTP request."""

    request_id: str
    prompt: Prompt
    params: SamplingParams
    choice_index: int = 0
    # Prefixes are reused only between requests of the same scope (one API key):
    # a cached prefix must not tell one tenant what another sent.
    cache_scope: str = ""
    # The HTTP request's id (x-request-id), for an engine elsewhere to log with it.
    trace_id: str = ""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...]  # (token, bytes, logprob), best first


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    source: UsageSource = UsageSource.ENGINE

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """Part of a streamed tool call: the first part of a call has its id and name,
    the later ones carry fragments of its JSON arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class GenOutput:
    """What one engine step produced for one sequence.

    ``text`` is always whole UTF-8 characters and never contains (part of) a
    stop string. The last output of a sequence has ``finish_reason`` and
    ``usage`` set.
    """

    choice_index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    # From an engine elsewhere: fields of its chunk (``system_fingerprint``) and of
    # its choice delta (``reasoning_content``) that spigot does not know, passed on.
    chunk_extra: Mapping[str, Any] | None = None
    delta_extra: Mapping[str, Any] | None = None
    # Tool calls parsed out of the text (``spigot.api.tool_calls``), or sent so by an
    # engine elsewhere.
    tool_calls: Sequence[ToolCallDelta] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
