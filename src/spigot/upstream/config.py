"""What a gateway is told about the servers it forwards to: plain frozen data.

Parsing (command-line flags, TOML files) is someone else's job; this module
only names the settings and their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One OpenAI-compatible server (vLLM, llama-server, OpenAI, another spigot).

    ``base_url`` ends where OpenAI's paths start: ``http://host:8000/v1``.
    """

    name: str
    base_url: str
    api_key: str | None = None
    # Sequences in flight on this server at once, over every model served from it;
    # also the size of its connection pool.
    max_in_flight: int = 256
    connect_timeout: float = 5.0
    # From sending a request to its first data event (comment pings do not count).
    first_event_timeout: float = 30.0
    # No bytes at all for this long once a stream runs: the stream failed.
    idle_timeout: float = 60.0
    # The circuit breaker: this many failures in a row open it for ``breaker_open_s``;
    # then one request probes it (half-open).
    breaker_failures: int = 5
    breaker_open_s: float = 30.0
    # GET {base_url}/models this often; failures mark the server unhealthy.
    health_interval: float = 10.0

    @property
    def root_url(self) -> str:
        """The server's root, where vLLM and llama-server answer ``/tokenize``."""
        url = self.base_url.rstrip("/")
        return url.removesuffix("/v1")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one served model can run: an upstream, and the model's name there."""

    upstream: str
    model: str


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One served model name and the targets behind it.

    ``max_context``: tokens per sequence, when known better than what the
    upstreams report. ``tokenizer``: a ``tokenizer.json`` of the model, used to
    estimate prompts and to count tokens when an upstream reports no usage.
    """

    name: str
    targets: tuple[Target, ...]
    max_context: int | None = None
    tokenizer: Path | None = None
    # Tries of one sequence over all targets before the client gets an error.
    attempts: int = 3
    # A Retry-After up to this long is waited (when no other target can take the
    # request); a longer one ends the tries.
    max_retry_wait: float = 5.0
