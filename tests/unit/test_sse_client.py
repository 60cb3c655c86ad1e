"""Server-sent event framing (spigot.api.sse) and the client's parser (spigot.client)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spigot.api.sse import DONE, data_event
from spigot.client import APIError, StreamingClient
from spigot.sse_parser import iter_sse_data

# orjson writes these raw inside JSON strings; str.splitlines() breaks lines at them.
UNICODE_LINE_BREAKS = ("\u0085".encode(), "\u2028".encode(), "\u2029".encode())

# -- framing -------------------------------------------------------------------


def test_data_event_is_one_compact_data_line_and_a_blank_line() -> None:
    event = {"id": "cmpl-1", "choices": [{"index": 0, "text": "hi", "logprobs": None}]}
    assert data_event(event) == (
        b'data: {"id":"cmpl-1","choices":[{"index":0,"text":"hi","logprobs":null}]}\n\n'
    )


def test_data_event_writes_utf8_and_escapes_newlines() -> None:
    frame = data_event({"text": "é中😀\nnext\r\n"})
    assert frame == 'data: {"text":"é中😀\\nnext\\r\\n"}\n\n'.encode()
    assert frame.count(b"\n") == 2
    assert b"\r" not in frame


def test_done_frame() -> None:
    assert DONE == b"data: [DONE]\n\n"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_data_event_frame_shape(obj: Any) -> None:
    frame = data_event(obj)
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    # One line, no event:/id:/retry: fields, and nothing but the JSON after "data: ".
    line, blank, end = frame.split(b"\n")
    assert (blank, end) == (b"", b"")
    assert b"\r" not in line
    body = line.removeprefix(b"data: ")
    assert body == orjson.dumps(obj)  # compact: orjson writes no optional whitespace
    assert orjson.loads(body) == obj


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Any], list[bytes]]:
    objs = draw(st.lists(JSON, max_size=5))
    body = b"".join(data_event(o) for o in objs) + DONE
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    points = [0, *cuts, len(body)]
    return objs, [body[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(streams())
def test_frames_round_trip_through_the_parser(case: tuple[list[Any], list[bytes]]) -> None:
    objs, pieces = case
    # What StreamingClient does, U+2028 and friends in the text included.
    payloads = list(iter_sse_data(iter(pieces)))
    assert [orjson.loads(p) for p in payloads] == objs


# -- parser --------------------------------------------------------------------


def as_chunks(lines: list[str]) -> Iterator[bytes]:
    return iter([(line + "\n").encode() for line in lines])


def parse(lines: list[str]) -> list[str]:
    return list(iter_sse_data(as_chunks(lines)))


def test_parser_yields_each_event() -> None:
    assert parse(['data: {"a":1}', "", 'data: {"b":2}', "", "data: [DONE]", ""]) == [
        '{"a":1}',
        '{"b":2}',
    ]


def test_parser_ignores_comments() -> None:
    lines = [": ping", "", "data: x", ": keep-alive in the middle", "", ": ping", ""]
    assert parse(lines) == ["x"]


def test_parser_joins_multi_line_data() -> None:
    assert parse(["data: first", "data: second", "data:third", ""]) == ["first\nsecond\nthird"]


def test_parser_strips_one_leading_space_only() -> None:
    # A bare "data:" is an event with empty data, as the SSE spec says.
    assert parse(["data:x", "", "data:  two spaces", "", "data:", ""]) == ["x", " two spaces", ""]


def test_parser_keeps_colons_in_the_value() -> None:
    assert parse(['data: {"url":"http://x"}', ""]) == ['{"url":"http://x"}']


def test_parser_ignores_other_fields() -> None:
    lines = ["event: message", "id: 7", "retry: 100", "data: x", "", "event: only", ""]
    assert parse(lines) == ["x"]


def test_parser_stops_at_done_without_reading_further() -> None:
    chunks = as_chunks(["data: a", "", "data: [DONE]", "", "data: after", ""])
    assert list(iter_sse_data(chunks)) == ["a"]
    assert list(chunks) == [b"data: after\n", b"\n"]


def test_parser_yields_last_event_without_trailing_blank_line() -> None:
    assert parse(["data: a", "", "data: b"]) == ["a", "b"]


def test_parser_done_without_trailing_blank_line() -> None:
    assert parse(["data: a", "", "data: [DONE]"]) == ["a"]


def test_parser_without_done() -> None:
    assert parse(["data: a", ""]) == ["a"]
    assert parse([]) == []


def test_parser_blank_lines_alone_yield_nothing() -> None:
    assert parse(["", "", ""]) == []


# -- client over a fake transport -----------------------------------------------


def fake_client(handler: Any) -> StreamingClient:
    client = StreamingClient("http://test/v1")
    client._http.close()
    client._http = httpx.Client(base_url="http://test/v1", transport=httpx.MockTransport(handler))
    return client


def sse_response(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def test_stream_posts_with_stream_true_and_yields_events() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(orjson.loads(request.content))
        assert request.url.path == "/v1/completions"
        return sse_response(data_event({"n": 1}) + b": ping\n\n" + data_event({"n": 2}) + DONE)

    with fake_client(handler) as client:
        events = list(client.stream("/completions", {"model": "m", "prompt": "x"}))
    assert events == [{"n": 1}, {"n": 2}]
    assert seen == [{"model": "m", "prompt": "x", "stream": True}]


def test_stream_raises_on_in_band_error_event() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "engine broke", "type": "server_error"}}
        return sse_response(data_event({"n": 1}) + data_event(error) + DONE)

    with fake_client(handler) as client:
        events: Iterator[dict[str, Any]] = client.stream("/completions", {})
        assert next(events) == {"n": 1}
        with pytest.raises(APIError, match="engine broke") as info:
            next(events)
    assert info.value.status is None


def test_stream_raises_on_http_error_with_openai_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "bad temperature", "type": "invalid_request_error"}}
        return httpx.Response(400, json=body)

    with fake_client(handler) as client, pytest.raises(APIError, match="bad temperature") as info:
        list(client.stream("/chat/completions", {}))
    assert info.value.status == 400


def test_stream_raises_on_http_error_without_json() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="bad gateway")

    with fake_client(handler) as client, pytest.raises(APIError, match="HTTP 502") as info:
        list(client.stream("/completions", {}))
    assert info.value.body == "bad gateway"


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_stream_survives_unicode_line_separators_in_text(char: str) -> None:
    text = f"one{char}two"

    def handler(request: httpx.Request) -> httpx.Response:
        return sse_response(data_event({"text": text}) + DONE)

    with fake_client(handler) as client:
        assert list(client.stream("/completions", {})) == [{"text": text}]
