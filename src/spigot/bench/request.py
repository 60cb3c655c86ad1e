"""One streamed request of the load generator: its body, its timing, how it failed.

``send_request`` never raises for anything the server or the network does:
every ending becomes a ``RequestResult`` with ``error_kind`` set (see
``classify_error``), so a benchmark run counts failures instead of dying.
``StreamRecorder`` is the pure part, turning parsed events into timestamps,
text and usage, so it can be tested on a recorded body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

from spigot.bench.workloads import Prompt
from spigot.sse_parser import SSEParser

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}

# After [DONE], how long to wait for the server to end the response body so
# the keep-alive connection can be reused; a server that never ends it only
# costs a fresh connection, not a failed request.
_DRAIN_S = 1.0


def request_body(
    endpoint: Endpoint, model: str, prompt: Prompt, max_tokens: int, exact_tokens: bool = True
) -> dict[str, Any]:
    """A streamed, greedy request; with ``exact_tokens`` every server generates ``max_tokens``."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if exact_tokens:
        # Extensions honoured by spigot, vLLM and llama.cpp's server: no
        # end-of-turn, so each server does the same amount of work.
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    if endpoint == "chat":
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        body["messages"] = [*messages, {"role": "user", "content": prompt.user}]
    else:
        body["prompt"] = prompt.as_text()
    return body


# -- errors --------------------------------------------------------------------

ErrorKind = Literal["http", "stream", "timeout", "connection", "protocol", "other"]


class StreamFailure(Exception):
    """A failure the bench detected itself (as opposed to one httpx raised)."""

    def __init__(self, kind: ErrorKind, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.status = status


def classify_error(exc: BaseException) -> ErrorKind:
    """Which kind of failure an exception is.

    http: the server answered 4xx/5xx; stream: an in-band ``{"error": ...}``
    event; timeout: the per-request limit or an httpx timeout; connection:
    refused, reset or closed mid-body; protocol: a body that is not a valid
    event stream (bad UTF-8 or JSON, no ``[DONE]``).
    """
    if isinstance(exc, StreamFailure):
        return exc.kind
    # Before TransportError: httpx's timeouts are transport errors too.
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.TransportError | ConnectionError):
        return "connection"
    if isinstance(exc, ValueError):  # orjson.JSONDecodeError, UnicodeDecodeError
        return "protocol"
    return "other"


def error_label(kind: ErrorKind, status: int | None) -> str:
    """The key errors are counted under: ``http_404``, ``timeout``, ..."""
    return f"http_{status}" if kind == "http" and status is not None else kind


def _error_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or fallback)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return fallback


# -- one stream ----------------------------------------------------------------


@dataclass
class StreamRecorder:
    """What a stream carried: content arrival times, text, usage, in-band errors."""

    chunk_times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    # When data: [DONE] arrived; None while the stream is not complete.
    done_at: float | None = None

    def on_payload(self, payload: str, now: float) -> None:
        event = orjson.loads(payload)
        if not isinstance(event, dict):
            raise StreamFailure("protocol", f"event is not an object: {payload[:80]}")
        if "error" in event:
            raise StreamFailure("stream", _error_message(event, "in-band error event"))
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        piece = "".join(_content(choice) for choice in event.get("choices") or ())
        if piece:
            self.chunk_times.append(now)
            self.text.append(piece)

    @property
    def completion_tokens(self) -> int | None:
        value = (self.usage or {}).get("completion_tokens")
        return value if isinstance(value, int) else None

    @property
    def prompt_tokens(self) -> int | None:
        value = (self.usage or {}).get("prompt_tokens")
        return value if isinstance(value, int) else None

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens the server reused from a cache, where it reports them."""
        details = (self.usage or {}).get("prompt_tokens_details")
        value = details.get("cached_tokens") if isinstance(details, dict) else None
        return value if isinstance(value, int) else None


def _content(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    if "text" in choice:  # completions
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking in a side field; it is output too.
    return "".join(delta.get(key) or "" for key in ("reasoning_content", "reasoning", "content"))


@dataclass
class RequestResult:
    """One request, timed with ``time.perf_counter`` from just before it was sent."""

    prompt_id: str
    start: float
    end: float
    chunk_times: list[float]
    text: str
    usage_tokens: int | None
    prompt_tokens: int | None
    cached_tokens: int | None = None
    error_kind: ErrorKind | None = None
    status: int | None = None
    error: str | None = None
    # Filled after the level (see load.count_tokens): the count used and its source.
    output_tokens: int = 0
    token_source: str = "usage"

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive content chunks."""
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def error_label(self) -> str | None:
        return error_label(self.error_kind, self.status) if self.error_kind else None


async def send_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], prompt_id: str, time_limit: float
) -> RequestResult:
    """Stream one request; every failure is returned, not raised (cancellation aside)."""
    recorder = StreamRecorder()
    start = time.perf_counter()
    kind: ErrorKind | None = None
    status: int | None = None
    message: str | None = None
    try:
        async with asyncio.timeout(time_limit):
            await _stream(client, path, body, recorder)
    except Exception as exc:
        # A stream complete at [DONE] succeeded even if reading the rest of
        # the body then failed.
        if recorder.done_at is None:
            kind = classify_error(exc)
            status = exc.status if isinstance(exc, StreamFailure) else None
            message = _describe(exc, kind, time_limit)
    end = time.perf_counter()
    return RequestResult(
        prompt_id=prompt_id,
        start=start,
        end=recorder.done_at if recorder.done_at is not None else end,
        chunk_times=recorder.chunk_times,
        text="".join(recorder.text),
        usage_tokens=recorder.completion_tokens,
        prompt_tokens=recorder.prompt_tokens,
        cached_tokens=recorder.cached_tokens,
        error_kind=kind,
        status=status,
        error=message,
    )


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], recorder: StreamRecorder
) -> None:
    async with client.stream("POST", path, json=body) as response:
        if response.status_code >= 400:
            await response.aread()
            try:
                error_body: Any = response.json()
            except ValueError:
                error_body = response.text[:200]
            raise StreamFailure(
                "http",
                _error_message(error_body, f"HTTP {response.status_code}"),
                response.status_code,
            )
        parser = SSEParser()
        chunks = response.aiter_bytes()
        async for chunk in chunks:
            now = time.perf_counter()
            for payload in parser.feed(chunk):
                recorder.on_payload(payload, now)
            if parser.done:
                recorder.done_at = now
                break
        else:
            now = time.perf_counter()
            for payload in parser.close():
                recorder.on_payload(payload, now)
            if not parser.done:
                raise StreamFailure("protocol", "the stream ended without data: [DONE]")
            recorder.done_at = now
            return
        # Read to the end of the body so the connection goes back to the pool.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DRAIN_S):
                async for _ in chunks:
                    pass


def _describe(exc: BaseException, kind: ErrorKind, time_limit: float) -> str:
    if kind == "timeout" and isinstance(exc, TimeoutError):
        return f"no complete response within {time_limit:g} s"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if kind in ("connection", "other") else text
