"""SIGTERM under load: every stream is told and billed before the process exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from spigot.metering import open_store
from tests.e2e.server import start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def read_stream(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    lines: list[str] = []
    try:
        with httpx.stream("POST", url, json=body, timeout=120) as reply:
            out["status"] = reply.status_code
            for line in reply.iter_lines():
                if line:
                    lines.append(line)
    except httpx.HTTPError as exc:
        out["exception"] = repr(exc)
    out["lines"] = lines
    out["ended_at"] = time.monotonic()


def test_sigterm_ends_each_stream_with_an_error_event_and_bills_it(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    server = start_server("--db", db, "--parallel", "4", "--shutdown-grace", "2")
    url = f"{server.base_url}/chat/completions"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    results: list[dict[str, Any]] = [{} for _ in range(3)]
    threads = [threading.Thread(target=read_stream, args=(url, body, r)) for r in results]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while server.engine_stats()["running"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # some tokens streamed
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        # uvicorn re-raises the signal once shut down: a clean exit by SIGTERM.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.stop()

    for result in results:
        assert result.get("status") == 200, result
        lines = result["lines"]
        assert lines[-1] != "data: [DONE]"
        assert not [line for line in lines if '"finish_reason":"abort"' in line]
        last = orjson.loads(lines[-1].removeprefix("data: "))
        assert last["error"]["code"] == "server_shutting_down", last
        # Cut after the grace period, not at once, and well before uvicorn's own cutoff.
        assert 1.5 < result["ended_at"] - signalled < 15, result["ended_at"] - signalled
    with open_store(db) as store:
        rows = store.ledger()
        assert store.clear_reservations() == 0  # none left behind
    assert len(rows) == 3
    for row in rows:
        assert row.status == "interrupted"
        assert row.completion_tokens > 0
        assert row.cost_pusd >= 0
    assert "Traceback" not in server.log()


def test_a_stream_that_finishes_within_the_grace_period_completes(tmp_path: Path) -> None:
    server = start_server("--db", str(tmp_path / "ledger.db"), "--shutdown-grace", "30")
    url = f"{server.base_url}/chat/completions"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 60,
        "ignore_eos": True,
        "stream": True,
    }
    result: dict[str, Any] = {}
    thread = threading.Thread(target=read_stream, args=(url, body, result))
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while server.engine_stats()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        # New work is refused while draining (a new connection finds no listener).
        # uvicorn re-raises the signal once shut down: a clean exit by SIGTERM.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert result["lines"][-1] == "data: [DONE]", result
