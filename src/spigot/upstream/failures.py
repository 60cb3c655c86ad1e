"""What a failed try before the first event is, and what the client gets if it was the last.

An upstream's answer decides: 408, 429 and 5xx are the server's trouble (retried
elsewhere, counted by the breaker, ``Retry-After`` honoured); any other 4xx is
the request's (passed to the client unchanged, no retry, not counted).
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from spigot.engine.protocol import EngineRefused, EngineUnavailable
from spigot.upstream.chunks import error_from_response

RETRYABLE_4XX = (408, 429)
MAX_ERROR_BODY = 64 * 1024


@dataclass(eq=False)
class Failure(Exception):
    """A try that failed before its first event."""

    message: str
    counts: bool = True  # against the upstream's breaker
    refusal: EngineRefused | None = None  # what the client gets if this was the last try
    fatal: bool = False  # the request's own fault: no retry
    retry_after: float | None = None
    same_target: bool = True  # worth retrying on the same target

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def final(self, retry_after: float | None) -> Exception:
        if self.refusal is not None:
            return self.refusal
        return EngineUnavailable(self.message, retry_after=self.retry_after or retry_after)


def retry_after_of(headers: httpx.Headers) -> float | None:
    """``Retry-After`` (seconds or an HTTP date), or OpenAI's ``retry-after-ms``."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def http_failure(response: httpx.Response) -> Failure:
    raw = b""
    async for piece in response.aiter_bytes():
        raw += piece
        if len(raw) >= MAX_ERROR_BODY:
            break
    status = response.status_code
    body = error_from_response(status, raw)
    headers: Mapping[str, str] = {}
    retry_after = retry_after_of(response.headers)
    if "retry-after" in response.headers:
        headers = {"Retry-After": response.headers["retry-after"]}
    elif retry_after is not None:
        headers = {"Retry-After": str(max(1, round(retry_after)))}
    refusal = EngineRefused(status, body, headers)
    message = f"{status}: {refusal}"
    if status in RETRYABLE_4XX or status >= 500:
        return Failure(message, refusal=refusal, retry_after=retry_after)
    if 400 <= status < 500:
        return Failure(message, counts=False, fatal=True, refusal=refusal)
    # A success other than 200, or a redirect: nothing a client could use.
    return Failure(message, refusal=EngineRefused(502, body, {}))
