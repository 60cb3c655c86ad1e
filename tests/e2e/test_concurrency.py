"""Many streams at once, and clients that leave: no sequence is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def _story(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]


async def test_sixteen_concurrent_streams_all_complete(
    server: RunningServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)

    async def run(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=_story(i),
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, reason, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, reason, tokens

    # 16 streams on 8 slots: half of them queue and join as slots free up.
    results = await asyncio.gather(*(run(i) for i in range(16)))
    await client.close()  # in this loop: left to the GC, its connections outlive it
    for text, reason, tokens in results:
        assert reason in ("stop", "length")
        assert 0 < tokens <= 24
        assert text
        if reason == "length":
            assert tokens == 24
    # (Greedy text under batching is not compared with solo runs: like any
    # batched engine, row position in a batch changes float rounding, which
    # flips near-ties. docs/engine.md explains.)
    assert server.wait_idle()["in_flight"] == 0


def _raw_stream_request(server: RunningServer, payload: dict[str, Any]) -> socket.socket:
    body = orjson.dumps({**payload, "stream": True})
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_disconnect_mid_stream_frees_the_slot(server: RunningServer) -> None:
    server.wait_idle()
    steps_before = server.engine_stats()["steps"]
    sock = _raw_stream_request(
        server,
        {
            "model": MODEL,
            "messages": _story(1),
            "max_tokens": 4000,
            "ignore_eos": True,
        },
    )
    received = b""
    while received.count(b"data: ") < 5:
        received += sock.recv(65536)
    assert server.engine_stats()["running"] == 1
    sock.close()
    stats = server.wait_idle(timeout=10)
    assert stats["running"] == 0 and stats["in_flight"] == 0
    # Its usage is recorded with the tokens generated until the abort.
    request_id = received.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()
    assert _wait_for(lambda: request_id in server.log(), timeout=5)
    (line,) = [ln for ln in server.log().splitlines() if request_id in ln]
    assert "status=disconnected" in line
    completion = int(line.split(" completion=")[1].split()[0])
    assert completion >= 4
    # It stopped long before its 4000 tokens.
    steps = server.engine_stats()["steps"] - steps_before
    assert steps < 1000


def test_disconnect_during_prefill_frees_the_slot(server: RunningServer) -> None:
    server.wait_idle()
    # A prompt of several thousand tokens takes many prefill steps on this CPU.
    long_text = "The quick brown fox jumps over the lazy dog. " * 500
    sock = _raw_stream_request(
        server,
        {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 50},
    )
    assert _wait_for(lambda: server.engine_stats()["running"] == 1, timeout=10)
    steps_at_close = server.engine_stats()["steps"]
    sock.close()
    stats = server.wait_idle(timeout=10)
    assert stats["running"] == 0 and stats["in_flight"] == 0
    # Aborted within a step or two, not after finishing the prefill (~20 steps).
    assert server.engine_stats()["steps"] - steps_at_close <= 3


def test_non_streamed_request_aborted_when_client_leaves(server: RunningServer) -> None:
    server.wait_idle()
    with httpx.Client(timeout=0.5) as client, contextlib.suppress(httpx.ReadTimeout):
        client.post(
            f"{server.base_url}/chat/completions",
            json={
                "model": MODEL,
                "messages": _story(2),
                "max_tokens": 4000,
                "ignore_eos": True,
            },
        )
    stats = server.wait_idle(timeout=10)
    assert stats["running"] == 0 and stats["in_flight"] == 0


def test_streams_keep_flowing_while_a_long_prompt_prefills(server: RunningServer) -> None:
    server.wait_idle()
    short = _raw_stream_request(
        server, {"model": MODEL, "messages": _story(3), "max_tokens": 400, "ignore_eos": True}
    )
    got = b""
    while got.count(b"data: ") < 3:
        got += short.recv(65536)
    # About 2,000 tokens, prefilled a time-budgeted chunk per step while the short stream decodes.
    long_text = "The quick brown fox jumps over the lazy dog. " * 200
    long = _raw_stream_request(
        server,
        {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 5},
    )
    # While the long prompt is being prefilled (no byte of it yet), the short
    # stream still receives tokens.
    # (The role chunk goes out at once; its first content chunk marks the
    # end of its prefill.)
    long.setblocking(False)
    before = got.count(b"data: ")
    deadline = time.monotonic() + 180
    long_started = False
    long_got = b""
    while time.monotonic() < deadline and not long_started:
        got += short.recv(65536)
        with contextlib.suppress(BlockingIOError):
            long_got += long.recv(65536)
        long_started = b'"delta":{"content"' in long_got
    assert long_started
    assert got.count(b"data: ") - before >= 4
    # The prompt chunks were sized from timed steps of the real engine.
    stats = server.engine_stats()
    assert stats["decode_step_ms"] > 0 and stats["prompt_token_ms"] > 0, stats
    short.close()
    long.close()
    server.wait_idle()


def test_shutdown_lets_open_streams_finish() -> None:
    import signal
    import threading

    from tests.e2e.server import start_server

    # A grace period far longer than the stream needs, even on a loaded machine
    # (tests/e2e/test_shutdown.py covers streams that outlast it).
    srv = start_server("--parallel", "2", "--shutdown-grace", "120")
    try:
        events: list[bytes] = []

        def read() -> None:
            with httpx.stream(
                "POST",
                f"{srv.base_url}/chat/completions",
                json={
                    "model": MODEL,
                    "messages": _story(4),
                    "max_tokens": 60,
                    "ignore_eos": True,
                    "stream": True,
                },
                timeout=120,
            ) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line.encode())

        reader = threading.Thread(target=read)
        reader.start()
        assert _wait_for(lambda: len(events) >= 3)
        srv.process.send_signal(signal.SIGTERM)
        reader.join(timeout=120)
        # The stream in flight ran to its end; then the server exited cleanly.
        assert events[-1] == b"data: [DONE]"
        assert b'"finish_reason":"length"' in events[-2]
        # (uvicorn re-raises the signal once shut down: exit status -SIGTERM.)
        assert srv.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in srv.log()
    finally:
        srv.stop()
