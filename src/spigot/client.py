"""A small streaming client for any OpenAI-compatible server, over httpx.

Used by ``spigot complete`` and ``spigot chat``. It reads server-sent events
with ``spigot.sse_parser``: ``data:`` lines, comments ignored, ``[DONE]`` ends
the stream; an ``{"error": ...}`` event raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import orjson

from spigot.sse_parser import iter_sse_data

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class APIError(Exception):
    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def default_base_url() -> str:
    return (
        os.environ.get("SPIGOT_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    )


def _error_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or fallback)
    return fallback


class StreamingClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        headers = {"accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST with ``stream: true`` and yield each event's JSON object.

        Closing the generator (or breaking out of the loop) closes the
        connection, which cancels generation on the server.
        """
        with self._http.stream("POST", path, json={**payload, "stream": True}) as response:
            if response.status_code >= 400:
                response.read()
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                raise APIError(
                    _error_message(body, f"HTTP {response.status_code}"), response.status_code, body
                )
            for data in iter_sse_data(response.iter_bytes()):
                event = orjson.loads(data)
                if isinstance(event, dict) and "error" in event:
                    raise APIError(_error_message(event, "stream failed"), None, event)
                yield event
