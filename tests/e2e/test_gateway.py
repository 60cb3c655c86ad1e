"""spigot in front of other OpenAI-compatible servers (docs/gateway.md), end to end.

Upstreams are real servers: a second ``spigot serve`` with the embedded model,
llama.cpp's ``llama-server`` when ``make peers`` has built it, and the scripted
upstream (tests/scripted_upstream.py) for the faults a real engine cannot
show on demand. Clients are the openai SDK and raw HTTP; the ledger is read
from the gateway's database.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from spigot.metering import LedgerEntry, open_store
from tests.e2e.server import ROOT, RunningServer, free_port, start_server
from tests.scripted_upstream import ScriptedUpstream, start_scripted_upstream
from tests.unit.metering_db import PgDatabase, pg_database, pg_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

LOCAL_MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello to the sea."}]


@dataclass
class Gateway:
    server: RunningServer
    db: str
    local: RunningServer  # the spigot upstream (embedded model, no metering)
    a: ScriptedUpstream
    b: ScriptedUpstream

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url, api_key="unused", **kwargs)

    def ledger(self) -> list[LedgerEntry]:
        with open_store(self.db) as store:
            return store.ledger()

    def row(self, request_id: str, timeout: float = 10.0) -> LedgerEntry:
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.ledger() if r.request_id == request_id]
            if rows or time.monotonic() > deadline:
                assert len(rows) == 1, (request_id, rows)
                return rows[0]
            time.sleep(0.05)


def write_config(
    path: Path, local: RunningServer, a: ScriptedUpstream, b: ScriptedUpstream, dead_port: int
) -> None:
    path.write_text(
        f"""
ctx_size = 2048

[[upstream]]
name = "local"
base_url = "{local.base_url}"

[[upstream]]
name = "a"
base_url = "{a.base_url}"
first_event_timeout = 1
idle_timeout = 2

[[upstream]]
name = "b"
base_url = "{b.base_url}"
first_event_timeout = 1
idle_timeout = 2

[[upstream]]
name = "dead"
base_url = "http://127.0.0.1:{dead_port}/v1"
connect_timeout = 1

[[model]]
name = "smollm2"
targets = ["local:{LOCAL_MODEL}"]

[[model]]
name = "pair"
targets = ["a:m", "b:m"]

[[model]]
name = "one"
targets = ["a:m"]

[[model]]
name = "with-dead"
targets = ["dead:m", "b:m"]
""",
        encoding="utf-8",
    )


def closed_port() -> int:
    return free_port()  # nothing listens there


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    with ThreadPoolExecutor(3) as pool:
        local_f = pool.submit(start_server, "--no-metering", "--ctx-size", "2048")
        a_f = pool.submit(start_scripted_upstream, "m:4096")
        b_f = pool.submit(start_scripted_upstream, "m:4096")
        local, a, b = local_f.result(), a_f.result(), b_f.result()
    config = tmp / "spigot.toml"
    write_config(config, local, a, b, closed_port())
    db = str(tmp / "ledger.db")
    server = start_server("--config", str(config), "--db", db)
    try:
        yield Gateway(server, db, local, a, b)
    finally:
        for s in (server, local, a, b):
            s.stop()


@pytest.fixture(autouse=True)
def fresh_scripts(request: pytest.FixtureRequest) -> None:
    if "gateway" in request.fixturenames:
        g: Gateway = request.getfixturevalue("gateway")
        g.a.reset()
        g.b.reset()


def sse_payloads(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


def content_of(payloads: list[bytes]) -> str:
    text = ""
    for p in payloads:
        if p == b"[DONE]":
            continue
        for choice in orjson.loads(p).get("choices", []):
            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


def stream_raw(g: Gateway, model: str, **body: Any) -> tuple[httpx.Response, bytes]:
    with httpx.Client(timeout=60) as client:
        response = client.post(
            f"{g.server.base_url}/chat/completions",
            json={"model": model, "messages": HELLO, "stream": True, **body},
        )
        return response, response.content


# -- a real spigot upstream -------------------------------------------------------------


def test_the_openai_sdk_streams_through_the_gateway_as_from_the_upstream(gateway: Gateway) -> None:
    direct = openai.OpenAI(base_url=gateway.local.base_url, api_key="unused")
    args = {"messages": HELLO, "max_tokens": 24, "temperature": 0, "stream": True}
    want = "".join(
        c.choices[0].delta.content or ""
        for c in direct.chat.completions.create(model=LOCAL_MODEL, **args)
        if c.choices
    )
    chunks = list(
        gateway.client().chat.completions.create(
            model="smollm2", stream_options={"include_usage": True}, **args
        )
    )
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got == want and got
    assert all(c.model == "smollm2" for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 24
    # Non-streamed, and completions, through the same upstream.
    reply = gateway.client().chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == want
    assert reply.usage is not None and reply.usage.completion_tokens == 24
    text = gateway.client().completions.create(
        model="smollm2", prompt="The sea is", max_tokens=8, temperature=0
    )
    assert text.usage is not None and text.usage.completion_tokens == 8


def test_usage_is_always_asked_upstream_and_stripped_when_the_client_did_not(
    gateway: Gateway,
) -> None:
    response, raw = stream_raw(gateway, "one", max_tokens=5)
    assert response.status_code == 200
    payloads = sse_payloads(raw)
    assert payloads[-1] == b"[DONE]"
    assert all(orjson.loads(p).get("usage") is None for p in payloads[:-1])
    (seen,) = gateway.a.requests()
    assert seen["body"]["stream_options"] == {"include_usage": True}
    # The upstream logs the request under the id the client was given.
    assert seen["headers"]["x-request-id"] == response.headers["x-request-id"]
    row = gateway.row(response.headers["x-request-id"])
    assert row.usage_source == "upstream" and row.completion_tokens > 0


def test_usage_an_upstream_does_not_send_is_counted(gateway: Gateway) -> None:
    gateway.a.script({"usage": "none", "words": [" one", " two", " three"]})
    response, raw = stream_raw(gateway, "one", stream_options={"include_usage": True})
    usage = orjson.loads(sse_payloads(raw)[-2])["usage"]
    assert usage["completion_tokens"] == 3
    row = gateway.row(response.headers["x-request-id"])
    assert row.usage_source == "counted" and row.completion_tokens == 3


# -- faults before the first byte: retried, nothing repeated -------------------------------


def test_failover_on_503_repeats_no_text(gateway: Gateway) -> None:
    refusal = {"status": 503, "body": {"error": {"message": "busy", "type": "server_error"}}}
    gateway.a.script(refusal)
    gateway.b.script(refusal)
    words = [" once", " and", " only", " once"]
    for upstream in (gateway.a, gateway.b):
        upstream.script({"words": words})
    response, raw = stream_raw(gateway, "pair")
    assert response.status_code == 200, raw
    assert content_of(sse_payloads(raw)) == "".join(words)
    assert len(gateway.a.requests()) + len(gateway.b.requests()) == 3


@pytest.mark.parametrize(
    "fault", [{"ping_only": True}, {"error_first": True}, {"status": 500, "body": "oops"}]
)
def test_a_silent_or_failing_first_event_fails_over(
    gateway: Gateway, fault: dict[str, Any]
) -> None:
    words = [" after", " the", " fault"]
    gateway.a.script(fault)
    gateway.b.script(fault)
    gateway.a.script({"words": words})
    gateway.b.script({"words": words})
    response, raw = stream_raw(gateway, "pair")
    assert response.status_code == 200, raw
    assert content_of(sse_payloads(raw)) == "".join(words)


def test_a_refused_connection_fails_over(gateway: Gateway) -> None:
    for _ in range(3):
        gateway.b.script({"words": [" reached"]})
        response, raw = stream_raw(gateway, "with-dead")
        assert response.status_code == 200, raw
        assert content_of(sse_payloads(raw)) == " reached"


def test_an_upstream_4xx_passes_through_unchanged(gateway: Gateway) -> None:
    error = {
        "error": {
            "message": "bad thing",
            "type": "invalid_request_error",
            "param": "x",
            "code": "y",
        }
    }
    gateway.a.script({"status": 400, "body": error})
    response, _ = stream_raw(gateway, "one")
    assert response.status_code == 400
    assert response.json() == error


# -- faults after the first byte ---------------------------------------------------------


def test_an_upstream_killed_mid_stream_ends_with_one_error_event_and_a_partial_row(
    gateway: Gateway,
) -> None:
    words = [" a", " b", " c", " d", " e", " f"]
    gateway.a.script({"words": words, "die_after": 3})
    client = gateway.client(max_retries=0)
    received: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model="one", messages=HELLO, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received == words[:3]
    response, raw = None, b""
    gateway.a.script({"words": words, "die_after": 3})
    response, raw = stream_raw(gateway, "one")
    payloads = sse_payloads(raw)
    assert payloads[-1] != b"[DONE]"
    errors = [p for p in payloads if b'"error"' in p]
    assert len(errors) == 1 and payloads[-1] == errors[0]
    row = gateway.row(response.headers["x-request-id"])
    assert row.usage_source == "partial"
    assert row.completion_tokens == 3 and row.status == "error"


def test_a_client_disconnect_closes_the_upstream_within_a_second(gateway: Gateway) -> None:
    gateway.a.script({"words": [f" w{i}" for i in range(400)], "delay": 0.05})
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{gateway.server.base_url}/chat/completions",
            json={"model": "one", "messages": HELLO, "stream": True},
        ) as response,
    ):
        for line in response.iter_lines():
            if "w3" in line:
                break
        left = time.time()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (seen,) = gateway.a.requests()
        if seen.get("client_closed_at") is not None:
            break
        time.sleep(0.05)
    assert seen["client_closed_at"] is not None
    assert seen["client_closed_at"] - left < 1.0


# -- guardrails ---------------------------------------------------------------------------


def test_guardrails_are_byte_identical_in_local_and_gateway_mode(tmp_path: Path) -> None:
    policy = tmp_path / "guard.toml"
    policy.write_text(
        '[[rule]]\nid = "no-sea"\nkind = "phrase"\nphrases = ["sea"]\naction = "redact"\n'
        '[[rule]]\nid = "stop-it"\nkind = "phrase"\nphrases = ["mysterious"]\naction = "block"\n',
        encoding="utf-8",
    )
    local = start_server("--no-metering", "--ctx-size", "2048", "--guard", str(policy))
    bare = start_server("--no-metering", "--ctx-size", "2048")
    try:
        gateway = start_server(
            "--no-metering", "--guard", str(policy), "--upstream", f"bare={bare.base_url}"
        )
        try:
            for messages in (HELLO, [{"role": "user", "content": "Describe the sea in a line."}]):
                body = {
                    "model": LOCAL_MODEL,
                    "messages": messages,
                    "max_tokens": 40,
                    "temperature": 0,
                    "stream": True,
                }
                streams = []
                for server in (local, gateway):
                    raw = httpx.post(
                        f"{server.base_url}/chat/completions", json=body, timeout=60
                    ).content
                    streams.append([_without_ids(p) for p in sse_payloads(raw)])
                assert streams[0] == streams[1]
                seen = b"".join(streams[0])
                # Both rules acted, so the comparison covers redaction and blocking.
                assert b"[REDACTED:no-sea]" in seen and b'"content_filter"' in seen, seen
        finally:
            gateway.stop()
    finally:
        local.stop()
        bare.stop()


def _without_ids(payload: bytes) -> bytes:
    if payload == b"[DONE]":
        return payload
    chunk = orjson.loads(payload)
    chunk.pop("id", None)
    chunk.pop("created", None)
    return orjson.dumps(chunk)


# -- replicas -------------------------------------------------------------------------------


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    database: PgDatabase = request.getfixturevalue("pg_database")
    database.empty()
    return database.url


async def test_two_replicas_on_one_postgres_hold_a_60_rpm_key_to_60(pg_url: str) -> None:
    upstream = start_scripted_upstream("m:4096")
    try:
        args = ("--upstream", f"s={upstream.base_url}", "--db", pg_url)
        with open_store(pg_url) as store:
            _, secret = store.create_key("shared", rpm=60)
        with ThreadPoolExecutor(2) as pool:
            replicas = list(pool.map(lambda _: start_server(*args), range(2)))
        try:

            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:

                    async def one(i: int) -> httpx.Response:
                        return await client.post(
                            f"{replicas[i % 2].base_url}/chat/completions",
                            json={"model": "m", "messages": HELLO, "max_tokens": 2},
                            headers={"Authorization": f"Bearer {secret}"},
                        )

                    return list(await asyncio.gather(*(one(i) for i in range(80))))

            started = time.time()
            responses = await burst()
            if int(started // 60) != int(time.time() // 60):
                # A minute boundary split the burst: the second window is fresh.
                with open_store(pg_url) as store:
                    _, secret = store.create_key("shared-2", rpm=60)
                responses = await burst()
            statuses = Counter(r.status_code for r in responses)
            assert statuses == {200: 60, 429: 20}, statuses
            by_replica = Counter(i % 2 for i, r in enumerate(responses) if r.status_code == 200)
            assert set(by_replica) == {0, 1}  # both replicas admitted some
        finally:
            for replica in replicas:
                replica.stop()
    finally:
        upstream.stop()


# -- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[model]]\nname = "x"\ntargets = ["nowhere:m"]\n', "names no [[upstream]] 'nowhere'"),
        ("prot = 1\n", "unknown setting 'prot'"),
        ('[[upstream]]\nname = "u"\nbase_url = "localhost"\n', "'base_url' must be an http"),
    ],
)
def test_config_errors_stop_serve_naming_file_entry_and_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "spigot", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode != 0
    assert str(path) in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- llama.cpp's llama-server as the upstream -------------------------------------------------


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-server serving the embedded model, as ``make llama-server`` builds it (CI does)."""
    from benchmarks.peers import LLAMA_SERVER, llama_server_path, peer_command
    from spigot.models import embedded_model_path

    if not llama_server_path().exists():
        pytest.skip("llama-server is not built here: `make llama-server` builds it")
    port = free_port()
    command = peer_command(LLAMA_SERVER, embedded_model_path(), port, parallel=2, ctx_size=4096)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("llama-server did not become healthy")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_llama_server_as_the_upstream_streams_with_usage_and_guard(
    llama_server: str, tmp_path: Path
) -> None:
    models = httpx.get(f"{llama_server}/models", timeout=10).json()["data"]
    remote = models[0]["id"]
    policy = tmp_path / "guard.toml"
    policy.write_text(
        '[[rule]]\nid = "no-sea"\nkind = "phrase"\nphrases = ["sea"]\naction = "redact"\n',
        encoding="utf-8",
    )
    db = str(tmp_path / "ledger.db")
    gateway = start_server(
        "--upstream", f"llama={llama_server}", "--db", db, "--guard", str(policy)
    )
    try:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model=remote,
                messages=[{"role": "user", "content": "Describe the sea in one line."}],
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "[REDACTED:no-sea]" in text
        assert "sea" not in text.replace("[REDACTED:no-sea]", "").lower()
        usage = chunks[-1].usage
        assert usage is not None and 0 < usage.completion_tokens <= 24
        with open_store(db) as store:
            (row,) = store.ledger()
        assert row.usage_source == "upstream"
        assert (row.prompt_tokens, row.completion_tokens) == (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    finally:
        gateway.stop()
