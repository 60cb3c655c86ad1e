"""The stream's bytes, read with a raw socket: exactly the OpenAI framing."""

from __future__ import annotations

import socket

import orjson
import pytest

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def raw_exchange(server: RunningServer, path: str, payload: dict) -> tuple[bytes, bytes]:
    """Send one HTTP/1.1 request; return (head, de-chunked body) read until the server closes."""
    body = orjson.dumps(payload)
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        rest = _dechunk(rest)
    return head, rest


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


def headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}


def check_events(body: bytes) -> list[dict]:
    assert body.endswith(b"data: [DONE]\n\n")
    events = body.split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    parsed = []
    for event in events[:-2]:
        # One line per event, a data field only, compact JSON.
        assert b"\n" not in event
        assert event.startswith(b"data: {")
        obj = orjson.loads(event[6:])
        assert event[6:] == orjson.dumps(obj)
        parsed.append(obj)
    assert b"event:" not in body and b"\nid:" not in body and b"retry:" not in body
    return parsed


def test_chat_stream_bytes(server: RunningServer) -> None:
    head, body = raw_exchange(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    headers = headers_of(head)
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert headers["x-request-id"].startswith("req_")
    assert headers["transfer-encoding"] == "chunked"
    events = check_events(body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert len({(e["id"], e["created"], e["model"], e["object"]) for e in events}) == 1


def test_completions_stream_bytes(server: RunningServer) -> None:
    head, body = raw_exchange(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "stream": True},
    )
    assert headers_of(head)["content-type"] == "text/event-stream; charset=utf-8"
    events = check_events(body)
    assert {e["object"] for e in events} == {"text_completion"}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["id"].startswith("cmpl-") for e in events)


def test_non_streamed_reply_is_json_with_request_id(server: RunningServer) -> None:
    head, body = raw_exchange(
        server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    )
    assert b"content-type: application/json" in head.lower()
    assert b"x-request-id: req_" in head.lower()
    assert orjson.loads(body)["object"] == "text_completion"
