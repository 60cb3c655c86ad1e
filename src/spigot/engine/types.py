"""Plain data passed between the API layer and an engine.

Nothing here knows about HTTP, pydantic or llama.cpp: an engine that talks to
another server over HTTP produces the same outputs as the in-process one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    ABORT = "abort"  # client went away; never sent on the wire
    ERROR = "error"  # engine failure; sent as an in-band error event


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class GenRequest:
    """One sequence to generate: one choice of one HTTP request."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    choice_index: int = 0
    # Prefixes are reused only between requests of the same scope (one API key):
    # a cached prefix must not tell one tenant what another sent.
    cache_scope: str = ""


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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
