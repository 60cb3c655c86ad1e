"""Reading server-sent events, the way OpenAI's SDKs do.

Bytes are pushed in as they arrive (so a caller can timestamp each event) and
the data payloads they completed come back. ``spigot.client`` and
``spigot bench`` both read streams with it.

Lines are split on LF only, a trailing CR dropped, as event streams are
written. Not ``str.splitlines``: JSON may carry U+2028 or U+0085 unescaped,
and those are not line breaks in an event stream.
"""

from __future__ import annotations

from collections.abc import Iterator

DONE = "[DONE]"


class SSEParser:
    """Feed raw bytes; get back the data payload of every event they complete.

    ``[DONE]`` is not returned: it sets ``done``, and anything after it is
    ignored. Comment lines (``:``) and fields other than ``data`` are skipped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self.done = False

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        payloads: list[str] = []
        for raw in lines:
            # LF never occurs inside a multi-byte UTF-8 sequence, so each
            # complete line decodes on its own.
            self._line(raw.removesuffix(b"\r").decode("utf-8"), payloads)
        return payloads

    def close(self) -> list[str]:
        """The stream ended: whatever an unterminated last event carried."""
        payloads: list[str] = []
        if self._buffer:
            self._line(self._buffer.removesuffix(b"\r").decode("utf-8"), payloads)
            self._buffer = b""
        self._dispatch(payloads)
        return payloads

    def _line(self, line: str, payloads: list[str]) -> None:
        if self.done:
            return
        if line == "":
            self._dispatch(payloads)
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))

    def _dispatch(self, payloads: list[str]) -> None:
        if not self._data:
            return
        payload = "\n".join(self._data)
        self._data = []
        if payload == DONE:
            self.done = True
        elif not self.done:
            payloads.append(payload)


def iter_sse_data(chunks: Iterator[bytes]) -> Iterator[str]:
    """The data payload of each event in a byte stream; stops at ``[DONE]``."""
    parser = SSEParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
        if parser.done:
            return
    yield from parser.close()
