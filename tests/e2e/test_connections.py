"""The HTTP connection layer: timeouts, header size, connection cap, half-close.

Raw sockets, because every case here is a client that does not behave like
an HTTP library: one that sends nothing, trickles bytes, floods connections,
or half-closes its socket after its request.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from spigot.http_limits import PEER_CHECK_S
from tests.e2e.server import RunningServer, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
# Small limits, so that each case takes seconds.
TIMEOUT = 2.0
MAX_CONNECTIONS = 20


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    srv = start_server(
        "--parallel", "2",
        "--header-timeout", str(TIMEOUT),
        "--idle-timeout", str(TIMEOUT),
        "--body-timeout", str(TIMEOUT),
        "--max-connections", str(MAX_CONNECTIONS),
    )  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def _connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _head(server: RunningServer, method: str, path: str) -> bytes:
    """A request line and Host header: the rest of the head is the caller's."""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()


def _read_to_close(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took.

    Fails if the server is still holding the connection open after ``timeout``.
    """
    start = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {timeout} s; got {data[:200]!r}")
    return data, time.monotonic() - start


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _json_body(response: bytes) -> dict:
    return orjson.loads(response.partition(b"\r\n\r\n")[2])


def _chat(server: RunningServer, **payload: object) -> bytes:
    """A whole chat completion request, as bytes."""
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}]} | payload
    )
    return (
        _head(server, "POST", "/v1/chat/completions")
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _wait_running(server: RunningServer, count: int) -> None:
    deadline = time.monotonic() + 60
    while server.engine_stats()["running"] < count:
        assert time.monotonic() < deadline, server.engine_stats()
        time.sleep(0.02)


def test_a_connection_that_sends_nothing_is_closed(server: RunningServer) -> None:
    with _connect(server) as sock:
        data, took = _read_to_close(sock, timeout=TIMEOUT + 5)
    assert data == b""
    assert took < TIMEOUT + 2


def test_an_idle_keep_alive_connection_is_closed(server: RunningServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head(server, "GET", "/v1/models") + b"\r\n")
        sock.settimeout(10)
        response = sock.recv(65536)
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            response += sock.recv(65536)
        assert _status(response) == 200
        # Kept alive for a next request that never comes.
        assert b"connection: close" not in response.lower()
        rest, took = _read_to_close(sock, timeout=TIMEOUT + 5)
    assert rest == b""
    assert took < TIMEOUT + 1.5


def _trickle(sock: socket.socket, data: bytes, limit: float) -> float:
    """Send ``data`` a byte every 0.1 s until the server answers or closes; the seconds taken."""
    start = time.monotonic()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for byte in data:
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable or time.monotonic() - start > limit:
                break
    return time.monotonic() - start


def test_slowloris_trickling_headers_is_cut(server: RunningServer) -> None:
    """A byte every 0.1 s keeps any inactivity timer happy; the head deadline does not."""
    with _connect(server) as sock:
        sock.sendall(_head(server, "GET", "/v1/models"))
        took = _trickle(sock, b"X-Slow: " + b"a" * 1000, limit=TIMEOUT + 5)
        data, _ = _read_to_close(sock, timeout=5)
    assert took < TIMEOUT + 1
    assert _status(data) == 408
    assert _json_body(data)["error"]["code"] == "request_timeout"


def test_a_trickled_body_is_cut(server: RunningServer) -> None:
    request = _chat(server, max_tokens=5)
    head, _, body = request.partition(b"\r\n\r\n")
    with _connect(server) as sock:
        sock.sendall(head + b"\r\n\r\n")
        took = _trickle(sock, body, limit=TIMEOUT + 5)
        data, _ = _read_to_close(sock, timeout=5)
    assert took < TIMEOUT + 1
    assert _status(data) == 408
    assert _json_body(data)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("size", [40_000, 2_000_000])
def test_huge_headers_get_431(server: RunningServer, size: int) -> None:
    """Over the default 32 KiB: refused with an OpenAI error, not buffered, never a 5xx."""
    with _connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(
                _head(server, "GET", "/v1/models") + b"X-Big: " + b"a" * size + b"\r\n\r\n"
            )
        data, _ = _read_to_close(sock, timeout=10)
    assert _status(data) == 431
    assert _json_body(data)["error"]["code"] == "request_headers_too_large"
    # Headers under the limit are fine.
    response = httpx.get(f"{server.base_url}/models", headers={"x-big": "a" * 20_000}, timeout=10)
    assert response.status_code == 200


def test_connections_beyond_the_cap_are_refused_while_a_stream_goes_on(
    server: RunningServer,
) -> None:
    server.wait_idle(timeout=120)
    stream = _connect(server)
    started = time.monotonic()
    stream.sendall(_chat(server, max_tokens=4000, ignore_eos=True, stream=True))
    received = b""
    while received.count(b"data: ") < 2:
        received += stream.recv(65536)
    # The stream holds one connection; idle ones fill the rest.
    flood = [_connect(server) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        refusals = []
        for _ in range(5):
            with _connect(server) as extra:
                extra.sendall(_head(server, "GET", "/v1/models") + b"\r\n")
                refusals.append(_read_to_close(extra, timeout=3))
        for data, took in refusals:
            assert took < 1
            if data:  # answered before closing (else reset or closed: refused too)
                assert _status(data) == 503
                assert _json_body(data)["error"]["code"] == "too_many_connections"
                assert b"retry-after: 1" in data.lower()
        assert any(data for data, _ in refusals)
        # The idle flood is dropped after the idle timeout, by the server.
        for sock in flood:
            assert _read_to_close(sock, timeout=TIMEOUT + 5)[0] == b""
        # The stream was never starved, and outlives every timeout: they apply
        # to reading a request, not to writing a response.
        events = received.count(b"data: ")
        while time.monotonic() - started < TIMEOUT + 2 or received.count(b"data: ") <= events:
            chunk = stream.recv(65536)
            assert chunk, "the stream was cut"
            received += chunk
        assert received.count(b"data: ") > events
        assert b"[DONE]" not in received
    finally:
        stream.close()
        for sock in flood:
            sock.close()
    # The flood gone, the server answers again.
    response = httpx.get(f"{server.base_url}/models", timeout=5)
    assert response.status_code == 200
    server.wait_idle(timeout=120)


def _half_closed_request(server: RunningServer, request: bytes) -> bytes:
    with _connect(server) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data, _ = _read_to_close(sock, timeout=60)
    return data


def test_a_half_closed_client_gets_its_response(server: RunningServer) -> None:
    data = _half_closed_request(server, _head(server, "GET", "/v1/models") + b"\r\n")
    assert _status(data) == 200
    assert _json_body(data)["data"][0]["id"] == MODEL


def test_a_half_closed_client_gets_its_whole_stream(server: RunningServer) -> None:
    data = _half_closed_request(server, _chat(server, max_tokens=5, stream=True))
    assert _status(data) == 200
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert b'"finish_reason":' in data


def test_a_half_closed_client_gets_a_slow_answer(server: RunningServer) -> None:
    """Waiting longer than the peer check: told 100 Continue (the probe for a closed client),
    then answered."""
    server.wait_idle(timeout=120)
    # Both slots busy: the half-closed request waits in the queue until one frees.
    blockers = [_connect(server) for _ in range(2)]
    for sock in blockers:
        sock.sendall(_chat(server, max_tokens=4000, ignore_eos=True, stream=True))
    try:
        _wait_running(server, 2)
        with _connect(server) as sock:
            sock.sendall(_chat(server, max_tokens=5, ignore_eos=True))
            sock.shutdown(socket.SHUT_WR)
            time.sleep(PEER_CHECK_S * 3)
            sock.settimeout(5)
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            blockers.pop().close()
            data, _ = _read_to_close(sock, timeout=120)
    finally:
        for blocker in blockers:
            blocker.close()
    assert _status(data) == 200
    assert b"connection: close" in data.lower()
    assert _json_body(data)["usage"]["completion_tokens"] == 5
    server.wait_idle(timeout=120)


def test_a_client_that_closes_is_still_noticed(server: RunningServer) -> None:
    """A full close looks like a half-close at first; the request must still be aborted."""
    server.wait_idle(timeout=120)
    steps_before = server.engine_stats()["steps"]
    with _connect(server) as sock:
        sock.sendall(_chat(server, max_tokens=4000, ignore_eos=True))
        _wait_running(server, 1)
    stats = server.wait_idle(timeout=30)
    assert stats["running"] == 0 and stats["in_flight"] == 0
    assert server.engine_stats()["steps"] - steps_before < 1000


def test_the_open_file_limit_is_raised_at_startup() -> None:
    """The server lifts its soft open-file limit to the hard one, and says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit is {hard}")
    # The server inherits the test's limits: a low soft limit, then restored.
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        srv = start_server("--no-metering", "--max-connections", "100000")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        pid = srv.process.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        (line,) = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
        assert int(line.split()[3]) == hard  # the soft limit, now the hard one
        assert f"open-file limit raised from 256 to {hard}" in srv.log()
        # The cap is kept below the limit.
        assert f"--max-connections 100000 lowered to {hard - 64}" in srv.log()
    finally:
        srv.stop()


def test_the_connection_cap_fits_a_low_hard_limit() -> None:
    """At a hard limit of 1,024 descriptors the default cap leaves room for the rest."""
    code = (
        "import resource, logging\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))\n"
        "from spigot.http_limits import ConnectionLimits, fit_to_open_files\n"
        "print(fit_to_open_files(ConnectionLimits()).max_connections)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout) == 1024 - 64
