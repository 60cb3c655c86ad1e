"""Resumable streams (--on-disconnect detach=N): reconnect with Last-Event-ID, lose nothing.

Real servers, the real model, real Redis for the cross-replica case.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from spigot.metering import LedgerEntry, open_store
from tests.e2e.server import RunningServer, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
TOKENS = 120
REDIS = "redis://127.0.0.1:6379/0"


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


@dataclass
class Event:
    id: str | None
    data: str


def parse_events(raw: bytes) -> list[Event]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event_id, data = None, []
        for line in block.split("\n"):
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append(Event(event_id, "\n".join(data)))
    return events


def start_and_leave(
    port: int, secret: str | None, events_wanted: int
) -> tuple[list[Event], dict[str, str]]:
    """POST a stream over a raw socket, read a few events, then vanish (RST)."""
    payload = orjson.dumps(body())
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head + payload)
    received = b""
    while received.count(b"\n\n") < events_wanted + 1:  # +1: the response head
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    head_text, _, rest = received.partition(b"\r\n\r\n")
    headers = {}
    for line in head_text.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    # Chunked transfer encoding: keep the complete events' data lines only.
    lines = [ln for ln in rest.split(b"\r\n") if ln.startswith((b"id:", b"data:")) or not ln]
    events = [e for e in parse_events(b"\r\n".join(lines).replace(b"\r\n", b"\n")) if e.id]
    return events[:events_wanted], headers


def resume(base_url: str, last_event_id: str, secret: str | None) -> httpx.Response:
    headers = {"last-event-id": last_event_id}
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    return httpx.post(f"{base_url}/chat/completions", json=body(), headers=headers, timeout=120)


def check_whole_stream(events: list[Event]) -> dict[str, Any]:
    """Ids run 0..n without gaps or repeats; the stream ends with usage and [DONE]."""
    stream_ids = {e.id.rpartition(":")[0] for e in events if e.id}
    assert len(stream_ids) == 1, stream_ids
    seqs = [int(e.id.rpartition(":")[2]) for e in events if e.id]
    assert seqs == list(range(len(events))), seqs
    assert events[-1].data == "[DONE]"
    usage = orjson.loads(events[-2].data)["usage"]
    assert usage["completion_tokens"] == TOKENS
    text_chunks = [
        orjson.loads(e.data)["choices"][0]["delta"].get("content", "") for e in events[:-2]
    ]
    return {"usage": usage, "text": "".join(text_chunks)}


def ledger(db: Path) -> list[LedgerEntry]:
    with open_store(str(db)) as store:
        return store.ledger()


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@dataclass
class Keyed:
    server: RunningServer
    db: Path
    alice: str
    bob: str


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    db = tmp_path_factory.mktemp("resume") / "ledger.db"
    with open_store(str(db)) as store:
        _, alice = store.create_key("alice")
        _, bob = store.create_key("bob")
    server = start_server("--db", str(db), "--on-disconnect", "detach=20", "--parallel", "4")
    try:
        yield Keyed(server, db, alice, bob)
    finally:
        server.stop()


def test_a_client_that_vanished_resumes_and_misses_nothing(keyed: Keyed) -> None:
    first, headers = start_and_leave(keyed.server.port, keyed.alice, events_wanted=5)
    assert headers["x-stream-id"] and first[0].id == f"{headers['x-stream-id']}:0"
    time.sleep(1.0)  # generation goes on without the client
    reply = resume(keyed.server.base_url, first[-1].id or "", keyed.alice)
    assert reply.status_code == 200, reply.text
    rest = parse_events(reply.content)
    whole = check_whole_stream(first + rest)
    assert whole["text"]
    # Billed once, in full, although two connections carried it.
    rows = [r for r in ledger(keyed.db) if r.request_id == headers["x-request-id"]]
    assert len(rows) == 1, rows
    assert rows[0].completion_tokens == TOKENS and rows[0].status == "ok"
    # The resume request itself started nothing and billed nothing.
    assert not [r for r in ledger(keyed.db) if r.request_id == reply.headers["x-request-id"]]
    assert wait_for(lambda: keyed.server.wait_idle()["in_flight"] == 0)


def test_reconnecting_twice_replays_from_each_point(keyed: Keyed) -> None:
    first, _ = start_and_leave(keyed.server.port, keyed.alice, events_wanted=3)
    again = resume(keyed.server.base_url, first[1].id or "", keyed.alice)
    events = parse_events(again.content)
    # From seq 2 on: the third event arrives a second time because it was asked for.
    check_whole_stream(first[:2] + events)


def test_another_key_cannot_resume_or_see_the_stream(keyed: Keyed) -> None:
    first, headers = start_and_leave(keyed.server.port, keyed.alice, events_wanted=2)
    reply = resume(keyed.server.base_url, first[-1].id or "", keyed.bob)
    assert reply.status_code == 404, reply.text
    unknown = resume(keyed.server.base_url, f"{secrets.token_urlsafe(24)}:0", keyed.alice)
    assert unknown.status_code == 404
    # The same answer as for a stream that does not exist: nothing is revealed.
    assert reply.json()["error"]["message"] == unknown.json()["error"]["message"]
    get = httpx.get(
        f"{keyed.server.base_url}/streams/{headers['x-stream-id']}",
        headers={"authorization": f"Bearer {keyed.bob}"},
        timeout=30,
    )
    assert get.status_code == 404


def test_get_follows_a_stream_from_its_start(keyed: Keyed) -> None:
    _, headers = start_and_leave(keyed.server.port, keyed.alice, events_wanted=2)
    reply = httpx.get(
        f"{keyed.server.base_url}/streams/{headers['x-stream-id']}",
        headers={"authorization": f"Bearer {keyed.alice}"},
        timeout=120,
    )
    assert reply.status_code == 200
    check_whole_stream(parse_events(reply.content))


def test_a_garbage_last_event_id_is_400(keyed: Keyed) -> None:
    reply = resume(keyed.server.base_url, "not-an-id", keyed.alice)
    assert reply.status_code == 400


def test_the_openai_sdk_streams_unchanged_with_event_ids(keyed: Keyed) -> None:
    client = openai.OpenAI(base_url=keyed.server.base_url, api_key=keyed.alice)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_an_abandoned_stream_is_cancelled_and_billed_for_what_it_used(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    server = start_server("--db", str(db), "--on-disconnect", "detach=1")
    try:
        long_body = {**body(), "max_tokens": 4000}
        payload = orjson.dumps(long_body)
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            head = sock.recv(4096).decode(errors="replace")
        stream_id = next(
            line.partition(":")[2].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("x-stream-id:")
        )
        assert wait_for(lambda: len(ledger(db)) == 1, timeout=60)
        (row,) = ledger(db)
        assert row.status == "disconnected"
        assert 0 < row.completion_tokens < 4000
        assert server.wait_idle()["in_flight"] == 0
        # A late reader learns the stream was cut, rather than seeing it stop.
        late = httpx.get(f"{server.base_url}/streams/{stream_id}", timeout=60)
        last = parse_events(late.content)[-1]
        assert orjson.loads(last.data)["error"]["code"] == "stream_abandoned"
    finally:
        server.stop()


def test_a_resume_lands_on_another_replica_through_redis(tmp_path: Path) -> None:
    args = ("--on-disconnect", "detach=20", "--redis", REDIS, "--parallel", "2")
    a = start_server("--db", str(tmp_path / "a.db"), *args)
    b = start_server("--db", str(tmp_path / "b.db"), *args)
    try:
        first, _ = start_and_leave(a.port, None, events_wanted=4)
        reply = resume(b.base_url, first[-1].id or "", None)
        assert reply.status_code == 200, reply.text
        check_whole_stream(first + parse_events(reply.content))
        # Produced and billed on replica a only.
        assert wait_for(lambda: len(ledger(tmp_path / "a.db")) == 1)
        assert ledger(tmp_path / "b.db") == []
    finally:
        a.stop()
        b.stop()
