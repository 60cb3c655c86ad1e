"""Metering end to end: real ``spigot serve`` processes, the real model, real clients.

What these prove, each against running servers:

* the usage a client is told equals the ledger, row by row (matched on ``x-request-id``),
  with clients that leave mid-stream billed for what was generated until the abort;
* a SIGKILL under load never loses a request whose client saw ``[DONE]`` and never
  duplicates one;
* a budget is never overspent by concurrent requests;
* requests-per-minute hold across two servers sharing one PostgreSQL database;
* bad credentials are 4xx (never 5xx) and secrets never reach the server log;
* model restrictions, rate-limit headers, the openai SDK, the admin API and
  ``spigot usage`` agree with the ledger; ``--no-metering`` needs no database and no key.

Disconnect points are random; the seed is in every failure message and can be fixed with
``SPIGOT_E2E_SEED``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from spigot.api.metering import KEYS_EXIST_TTL
from spigot.metering import ApiKey, LedgerEntry, Price, cost, open_store
from tests.e2e.server import ROOT, RunningServer, spigot, start_server
from tests.unit.metering_db import PgDatabase, pg_database, pg_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
PRICES_TOML = """
[prices."smollm2-135m-instruct"]
prompt = "0.20"
cached = "0.10"
completion = "0.80"
"""
PRICE = Price.per_million(prompt="0.20", cached="0.10", completion="0.80")
LONG = 160  # max_tokens of requests whose client leaves early
SEED = int(os.environ.get("SPIGOT_E2E_SEED", time.time_ns() % 1_000_000))

# Every secret made in this module and every server log written: the last test checks
# that no log holds any secret.
SECRETS: list[str] = []
LOGS: list[Path] = []


# -- helpers ---------------------------------------------------------------------------------


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def story(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]


def cli_key(db: str, name: str, *options: str) -> str:
    """A key made by ``spigot keys create``: its secret, alone on stdout."""
    secret = spigot("keys", "create", "--name", name, *options, "--db", db).strip()
    assert secret.startswith("sk-spigot-") and "\n" not in secret
    SECRETS.append(secret)
    return secret


def store_key(db: str, name: str, **limits: Any) -> tuple[ApiKey, str]:
    with open_store(db) as store:
        key, secret = store.create_key(name, **limits)
    SECRETS.append(secret)
    return key, secret


def ledger(db: str, key_id: int | None = None) -> list[LedgerEntry]:
    with open_store(db) as store:
        rows = store.ledger(key_id=key_id)
    return rows


def key_named(db: str, name: str) -> ApiKey:
    with open_store(db) as store:
        key = store.get_key(name)
    assert key is not None
    return key


def wait_for_rows(db: str, key_id: int | None, count: int, timeout: float = 30.0) -> list:
    """The key's ledger once it has ``count`` rows (disconnects settle after the client left)."""
    deadline = time.monotonic() + timeout
    rows = ledger(db, key_id)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = ledger(db, key_id)
    return rows


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


def price_of(row: LedgerEntry) -> int:
    return cost(PRICE, row.prompt_tokens, row.cached_tokens, row.completion_tokens)


def usage_of(row: LedgerEntry) -> tuple[int, int, int]:
    return row.prompt_tokens, row.completion_tokens, row.cached_tokens


@dataclass
class Streamed:
    """What one streaming client saw."""

    status: int = 0
    request_id: str | None = None
    headers: httpx.Headers | None = None
    content_chunks: int = 0
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False
    left: bool = False  # the client closed the connection on purpose
    error: dict[str, Any] | None = None  # the error body of a refusal
    broken: str | None = None  # the transport failed (the server died)

    def usage_triple(self) -> tuple[int, int, int]:
        assert self.usage is not None
        return (
            self.usage["prompt_tokens"],
            self.usage["completion_tokens"],
            self.usage["prompt_tokens_details"]["cached_tokens"],
        )


async def stream_chat(
    client: httpx.AsyncClient,
    base_url: str,
    secret: str | None,
    body: dict[str, Any],
    *,
    leave_after: int | None = None,
    seen: Streamed | None = None,
) -> Streamed:
    """One streamed chat completion with usage; ``leave_after`` content chunks, the client
    closes the connection (0: right after the opening chunk)."""
    seen = seen if seen is not None else Streamed()
    payload = {
        "model": MODEL,
        "temperature": 0,
        **body,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream(
            "POST",
            f"{base_url}/chat/completions",
            json=payload,
            headers=auth(secret) if secret is not None else {},
        ) as response:
            seen.status = response.status_code
            seen.request_id = response.headers.get("x-request-id")
            seen.headers = response.headers
            if response.status_code != 200:
                await response.aread()
                seen.error = error_of(response)
                return seen
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    seen.done = True
                    break
                event = orjson.loads(data)
                assert "error" not in event, event
                if event.get("usage"):
                    seen.usage = event["usage"]
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        seen.content_chunks += 1
                    seen.finish_reason = choice["finish_reason"] or seen.finish_reason
                if leave_after is not None and seen.content_chunks >= leave_after:
                    # Leaving the block unread closes the connection: the server sees a
                    # disconnect.
                    seen.left = True
                    break
    except httpx.TransportError as exc:
        seen.broken = repr(exc)
    return seen


def raw_request(
    port: int, path: str, body: dict[str, Any], headers: dict[str, str | bytes]
) -> socket.socket:
    """A request written by hand, so that header values may be anything but CR and LF."""
    data = orjson.dumps(body)
    head = b"".join(
        name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
        for name, value in headers.items()
    )
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
        + head
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    return sock


def raw_status(sock: socket.socket, timeout: float = 60.0) -> tuple[int, bytes]:
    """The status and the whole answer of a ``Connection: close`` request."""
    sock.settimeout(timeout)
    answer = b""
    with sock:
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1]), answer


def wait_until(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def secret_leaks(log: str, secrets: list[str]) -> list[str]:
    """The secrets (shown by their display prefix) of which the log holds the whole or the
    part that is never shown."""
    return [s[:14] for s in secrets if s in log or s[14:] in log or s[-16:] in log]


# -- the shared server: SQLite, a price table, keys made before it starts -----------------


@dataclass
class Metered:
    server: RunningServer
    db: str
    secrets: dict[str, str]

    def key_id(self, name: str) -> int:
        return key_named(self.db, name).id


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    tmp = tmp_path_factory.mktemp("metered")
    db = str(tmp / "ledger.db")
    prices = tmp / "prices.toml"
    prices.write_text(PRICES_TOML)
    secrets: dict[str, str] = {}
    past = datetime.now(UTC) - timedelta(hours=1)
    for name, limits in {
        "streams": {},
        "plain": {},
        "budget": {"budget_pusd": 0},  # set once the prompt's size is known
        "other-models": {"models": ["other"]},
        "expired": {"expires_at": past},
        "limits": {"rpm": 1000, "tpm": 1_000_000},
        "sdk": {},
        "admin": {"admin": True},
        "choices": {},
        "leaver": {},
    }.items():
        secrets[name] = store_key(db, name, **limits)[1]
    # The CLI's way, on the same database: one key made and one revoked by `spigot keys`.
    secrets["cli"] = cli_key(db, "cli", "--rpm", "600", "--budget-usd", "5")
    secrets["revoked"] = cli_key(db, "revoked")
    assert "revoked key" in spigot("keys", "revoke", "revoked", "--db", db)
    server = start_server(
        "--parallel", "8", "--ctx-size", "4096", "--max-queue", "64",
        "--db", db, "--prices", str(prices),
    )  # fmt: skip
    LOGS.append(server.log_path)
    try:
        yield Metered(server, db, secrets)
    finally:
        server.stop()


# -- 1. what clients are told is what the ledger holds ------------------------------------


async def test_streamed_usage_equals_the_ledger_with_clients_leaving(metered: Metered) -> None:
    rng = random.Random(SEED)
    server, secret = metered.server, metered.secrets["streams"]
    plan: list[int | None] = [rng.choice([None, None, 0, 1, 2, 3, 5]) for _ in range(24)]
    plan[0], plan[1] = None, 0  # at least one of each
    plan[2] = 2

    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int, leave_after: int | None) -> Streamed:
            body: dict[str, Any] = {"messages": story(i), "max_tokens": 24}
            if leave_after is not None:
                # Far longer than the client stays, however slowly it reads: it is sure to
                # leave before the end (and only what runs until the abort is generated).
                body.update(max_tokens=LONG, ignore_eos=True)
            return await stream_chat(client, server.base_url, secret, body, leave_after=leave_after)

        seen = await asyncio.gather(*(one(i, cut) for i, cut in enumerate(plan)))

    why = f"(seed {SEED}, plan {plan})"
    assert all(s.status == 200 and s.broken is None for s in seen), why
    ids = [s.request_id for s in seen]
    assert None not in ids and len(set(ids)) == len(ids), why
    finished = [s for s in seen if s.done]
    cut = [s for s in seen if not s.done]
    assert all(s.left for s in cut), why
    assert len(cut) == sum(c is not None for c in plan), why

    key_id = metered.key_id("streams")
    rows = wait_for_rows(metered.db, key_id, len(seen))
    assert server.wait_idle()["in_flight"] == 0
    counts = Counter(r.request_id for r in rows)
    assert not [i for i, n in counts.items() if n > 1], f"rows written twice {why}"
    assert set(counts) == set(ids), why
    by_id = {r.request_id: r for r in rows}

    for s in finished:
        row = by_id[s.request_id]
        assert row.status == "ok", (row, why)
        assert usage_of(row) == s.usage_triple(), (row, s, why)
        assert row.finish_reason == s.finish_reason, (row, s, why)
        assert row.endpoint == "chat" and row.model == MODEL and row.key_id == key_id
        assert row.cost_pusd == price_of(row) > 0
    for s in cut:
        row = by_id[s.request_id]
        assert row.status == "disconnected", (row, s, why)
        # Billed for every token generated until the abort: at least what the client got.
        assert row.completion_tokens >= s.content_chunks, (row, s, why)
        assert row.completion_tokens < LONG, (row, why)  # aborted, not run to the end
        assert row.prompt_tokens > 0 and row.cost_pusd == price_of(row), (row, why)

    # The totals: what clients were told, plus the ledger's word for those who left.
    told = [s.usage_triple() for s in finished] + [usage_of(by_id[s.request_id]) for s in cut]
    with open_store(metered.db) as store:
        totals = store.totals(key_id=key_id)
        spent = store.get_key(key_id).spent_pusd  # type: ignore[union-attr]
        (daily,) = store.usage(key_id=key_id)
    ledger_cost = sum(r.cost_pusd for r in rows)
    assert totals == (
        len(seen),
        sum(t[0] for t in told),
        sum(t[1] for t in told),
        ledger_cost,
    ), why
    assert spent == ledger_cost
    assert (daily.requests, daily.prompt_tokens, daily.completion_tokens) == totals[:3]
    assert daily.cached_tokens == sum(t[2] for t in told) and daily.cost_pusd == ledger_cost


def test_non_streamed_usage_and_disconnect_are_in_the_ledger(metered: Metered) -> None:
    server, secret = metered.server, metered.secrets["plain"]
    key_id = metered.key_id("plain")
    server.wait_idle()
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": story(99), "max_tokens": 16, "temperature": 0},
        headers=auth(secret),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    (row,) = ledger(metered.db, key_id)
    assert row.request_id == response.headers["x-request-id"]
    assert row.status == "ok"
    assert usage_of(row) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )
    assert row.finish_reason == response.json()["choices"][0]["finish_reason"]

    # A non-streamed client that leaves while its answer is being generated.
    sock = raw_request(
        server.port,
        "/v1/chat/completions",
        {"model": MODEL, "messages": story(98), "max_tokens": 400, "ignore_eos": True},
        auth(secret),
    )
    try:
        assert wait_until(lambda: server.engine_stats()["running"] == 1, timeout=30)
    finally:
        sock.close()
    rows = wait_for_rows(metered.db, key_id, 2)
    assert server.wait_idle()["in_flight"] == 0
    (left,) = [r for r in rows if r.request_id != row.request_id]
    assert left.status == "disconnected" and left.endpoint == "chat"
    assert 0 <= left.completion_tokens < 400  # aborted, and billed for what it got
    assert left.cost_pusd == price_of(left)
    with open_store(metered.db) as store:
        assert store.totals(key_id=key_id) == (
            2,
            row.prompt_tokens + left.prompt_tokens,
            row.completion_tokens + left.completion_tokens,
            row.cost_pusd + left.cost_pusd,
        )


# -- 3. a budget is never overspent --------------------------------------------------------


async def test_concurrent_requests_never_overspend_a_budget(metered: Metered) -> None:
    server, secret = metered.server, metered.secrets["budget"]
    messages = [{"role": "user", "content": "Count from one to one hundred."}]
    max_tokens = 16
    async with httpx.AsyncClient(timeout=30) as client:
        tokenized = await client.post(
            f"{server.root_url}/tokenize",
            json={"model": MODEL, "messages": messages},
            headers=auth(secret),
        )
    assert tokenized.status_code == 200, tokenized.text
    prompt_tokens = tokenized.json()["count"]
    # Metering.admit reserves the worst case: every prompt token uncached, every output token.
    worst = cost(PRICE, prompt_tokens, 0, max_tokens)
    budget = 5 * worst
    with open_store(metered.db) as store:
        key = store.update_key("budget", budget_pusd=budget)

    async with httpx.AsyncClient(timeout=120) as client:
        body = {"messages": messages, "max_tokens": max_tokens, "ignore_eos": True}
        seen = await asyncio.gather(
            *(stream_chat(client, server.base_url, secret, body) for _ in range(20))
        )

    ok = [s for s in seen if s.status == 200]
    refused = [s for s in seen if s.status != 200]
    assert len(ok) + len(refused) == 20
    assert ok, "no request was admitted"
    assert all(s.done and s.broken is None for s in ok)
    for s in refused:
        assert s.status == 429 and s.error is not None, s
        assert s.error["code"] == "insufficient_quota" and s.error["type"] == "insufficient_quota"
        assert s.headers is not None and "retry-after" not in s.headers  # waiting won't help

    rows = wait_for_rows(metered.db, key.id, len(ok))
    server.wait_idle()
    assert sorted(r.request_id for r in rows) == sorted(str(s.request_id) for s in ok)
    spent = key_named(metered.db, "budget").spent_pusd
    assert spent == sum(r.cost_pusd for r in rows) == sum(price_of(r) for r in rows)
    assert spent <= budget, f"spent {spent} of a budget of {budget}"
    for s in ok:
        assert s.usage_triple()[1] == max_tokens
    # Five reservations fit the budget whatever the order; what cached tokens save is far
    # less than a sixth reservation, so no sixth request could ever start.
    assert budget - spent < worst
    assert len(ok) == 5

    # Every reservation was released: a budget raised by one request's worth admits exactly
    # one more.
    with open_store(metered.db) as store:
        store.update_key("budget", budget_pusd=spent + worst)
    async with httpx.AsyncClient(timeout=120) as client:
        body = {"messages": messages, "max_tokens": max_tokens, "ignore_eos": True}
        again = await stream_chat(client, server.base_url, secret, body)
        assert again.status == 200 and again.done, again
        after = await stream_chat(client, server.base_url, secret, body)
        assert after.status == 429 and after.error is not None
        assert after.error["code"] == "insufficient_quota"
    assert key_named(metered.db, "budget").spent_pusd <= spent + worst


# -- 5. bad credentials --------------------------------------------------------------------


def test_bad_credentials_are_4xx_never_5xx(metered: Metered) -> None:
    server = metered.server
    url = f"{server.base_url}/chat/completions"
    body = {"model": MODEL, "messages": story(7), "max_tokens": 8}
    rng = random.Random(SEED)
    noise = bytes(rng.choice([*range(0x21, 0x7F), *range(0x80, 0x100)]) for _ in range(64))
    unknown = "sk-spigot-" + "A" * 43
    authorization: dict[str, bytes | str | None] = {
        "missing": None,
        "bearer only": "Bearer",
        "basic": "Basic xyz",
        "no scheme": metered.secrets["plain"],
        "noise": noise,
        "bearer noise": b"Bearer " + noise,
        "unknown key": f"Bearer {unknown}",
        "too long": f"Bearer sk-spigot-{'x' * 300}",
        "revoked": f"Bearer {metered.secrets['revoked']}",
        "expired": f"Bearer {metered.secrets['expired']}",
    }
    with httpx.Client(timeout=60) as client:
        for case, value in authorization.items():
            headers = {} if value is None else {"Authorization": value}
            response = client.post(url, json=body, headers=headers)
            assert response.status_code == 401, (case, response.status_code, response.text)
            error = error_of(response)
            assert error["code"] == "invalid_api_key", (case, error)
            assert error["type"] == "invalid_request_error"
            # Streams are refused the same way, before any event.
            streamed = client.post(url, json={**body, "stream": True}, headers=headers)
            assert streamed.status_code == 401, (case, streamed.text)
            assert error_of(streamed)["code"] == "invalid_api_key"

        # Values no HTTP client library would send, written by hand.
        raw_noise = bytes(
            rng.choice([*range(0x01, 0x0A), *range(0x0B, 0x0D), *range(0x0E, 0x100)])
            for _ in range(64)
        )
        for value in (b"Bearer    ", b"Bearer \t", b"\x00", raw_noise, b"Bearer " + raw_noise):
            status, answer = raw_status(
                raw_request(server.port, "/v1/chat/completions", body, {"Authorization": value})
            )
            assert 400 <= status < 500, (value, answer[:300])

        # 200 kB of header: refused by the server or by uvicorn, with a 4xx, never a 5xx.
        huge = "Bearer " + "A" * 200_000
        for headers in ({"Authorization": huge}, {"X-Padding": huge[7:]}):
            try:
                response = client.post(url, json=body, headers=headers)
            except httpx.RemoteProtocolError:
                pass  # the connection was closed on it: no 5xx either
            else:
                assert 400 <= response.status_code < 500, response.status_code

        # The admin API, the same way; a key that is not admin gets 403.
        for value in (None, "Basic xyz", noise, f"Bearer {unknown}"):
            headers = {} if value is None else {"Authorization": value}
            response = client.get(f"{server.root_url}/admin/keys", headers=headers)
            assert response.status_code == 401, (value, response.text)
        response = client.get(f"{server.root_url}/admin/keys", headers=auth(metered.secrets["cli"]))
        assert response.status_code == 403 and error_of(response)["code"] == "not_admin"

        # /health needs no key; the server still serves keyed requests.
        assert client.get(f"{server.root_url}/health").status_code == 200
        response = client.post(url, json=body, headers=auth(metered.secrets["cli"]))
        assert response.status_code == 200, response.text
    assert server.process.poll() is None


# -- 6. model restrictions, headers, the SDK, the admin API, `spigot usage` ---------------


def test_a_key_for_other_models_gets_403(metered: Metered) -> None:
    response = httpx.post(
        f"{metered.server.base_url}/chat/completions",
        json={"model": MODEL, "messages": story(1), "max_tokens": 8, "stream": True},
        headers=auth(metered.secrets["other-models"]),
        timeout=60,
    )
    assert response.status_code == 403
    error = error_of(response)
    assert error["type"] == "permission_error" and error["code"] == "model_not_allowed"
    assert ledger(metered.db, metered.key_id("other-models")) == []


async def test_a_streamed_response_carries_rate_limit_headers(metered: Metered) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        seen = await stream_chat(
            client,
            metered.server.base_url,
            metered.secrets["limits"],
            {"messages": story(2), "max_tokens": 8},
        )
    assert seen.status == 200 and seen.done and seen.headers is not None
    h = seen.headers
    assert h["content-type"].startswith("text/event-stream")
    assert h["x-ratelimit-limit-requests"] == "1000"
    assert h["x-ratelimit-remaining-requests"] == "999"
    assert h["x-ratelimit-limit-tokens"] == "1000000"
    prompt_tokens = seen.usage_triple()[0]
    # tpm counts the prompt plus max_tokens, reserved at admission.
    assert int(h["x-ratelimit-remaining-tokens"]) == 1_000_000 - prompt_tokens - 8
    for kind in ("requests", "tokens"):
        reset = h[f"x-ratelimit-reset-{kind}"]
        assert reset.endswith("s") and 0 < float(reset[:-1]) <= 60


def test_the_openai_sdk_streams_with_a_key_and_is_refused_without(metered: Metered) -> None:
    client = openai.OpenAI(
        base_url=metered.server.base_url, api_key=metered.secrets["sdk"], max_retries=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 12
    (row,) = ledger(metered.db, metered.key_id("sdk"))
    assert (row.prompt_tokens, row.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )

    bad = openai.OpenAI(
        base_url=metered.server.base_url, api_key="sk-spigot-not-a-key", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
    assert raised.value.code == "invalid_api_key"


def test_a_key_made_over_the_admin_api_works(metered: Metered) -> None:
    server = metered.server
    admin = auth(metered.secrets["admin"])
    made = httpx.post(
        f"{server.root_url}/admin/keys",
        json={"name": "made-by-admin", "rpm": 50, "budget_usd": "1.50"},
        headers=admin,
        timeout=30,
    )
    assert made.status_code == 201, made.text
    created = made.json()
    secret = created["secret"]
    SECRETS.append(secret)
    assert created["name"] == "made-by-admin" and created["rpm"] == 50
    assert created["budget_usd"] == "1.50" and secret.startswith(created["prefix"])

    with httpx.stream(
        "POST",
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": story(3), "max_tokens": 8, "stream": True},
        headers=auth(secret),
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "50"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    (row,) = ledger(metered.db, created["id"])
    assert row.request_id == response.headers["x-request-id"] and row.status == "ok"

    # The admin API reads the same ledger.
    usage = httpx.get(
        f"{server.root_url}/admin/usage",
        params={"key": "made-by-admin"},
        headers=admin,
        timeout=30,
    )
    assert usage.status_code == 200
    total = usage.json()["total"]
    assert (total["requests"], total["completion_tokens"]) == (1, row.completion_tokens)
    # Listing keys never shows a secret.
    listed = httpx.get(f"{server.root_url}/admin/keys", headers=admin, timeout=30)
    assert listed.status_code == 200 and "secret" not in listed.text
    assert not secret_leaks(listed.text, SECRETS)


def test_spigot_usage_reports_the_ledger_totals(metered: Metered) -> None:
    metered.server.wait_idle()
    report = orjson.loads(spigot("usage", "--db", metered.db, "--format", "json"))
    rows = ledger(metered.db)
    assert len(rows) == len({r.request_id for r in rows})
    total = report["total"]
    assert total["requests"] == len(rows) > 30
    assert total["prompt_tokens"] == sum(r.prompt_tokens for r in rows)
    assert total["cached_tokens"] == sum(r.cached_tokens for r in rows)
    assert total["completion_tokens"] == sum(r.completion_tokens for r in rows)
    with open_store(metered.db) as store:
        assert store.totals()[3] == sum(r.cost_pusd for r in rows)
        spent = sum(k.spent_pusd for k in store.list_keys(include_revoked=True))
    cost_usd = sum(r.cost_pusd for r in rows)
    assert spent == cost_usd
    assert Decimal(total["cost_usd"]) * 10**12 == cost_usd
    by_key = {item["key_name"]: item for item in report["data"]}
    assert by_key["streams"]["requests"] == 24
    assert by_key["plain"]["requests"] == 2


# -- 7. --no-metering ----------------------------------------------------------------------


def test_without_metering_there_is_no_database_and_no_key(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    default_db = ROOT / "spigot.db"
    default_existed = default_db.exists()
    server = start_server("--parallel", "2", "--ctx-size", "2048", "--no-metering", "--db", str(db))
    try:
        with httpx.Client(timeout=60) as client:
            for headers in ({}, {"Authorization": "Bearer whatever"}, {"Authorization": "Basic x"}):
                response = client.post(
                    f"{server.base_url}/chat/completions",
                    json={"model": MODEL, "messages": story(5), "max_tokens": 8},
                    headers=headers,
                )
                assert response.status_code == 200, response.text
                assert "x-ratelimit-limit-requests" not in response.headers
            assert client.get(f"{server.root_url}/admin/keys").status_code == 404
    finally:
        server.stop()
    assert not db.exists() and not Path(f"{db}-wal").exists()
    assert default_db.exists() == default_existed
    assert "keys and ledger" not in server.log()


# -- 2. SIGKILL under load ------------------------------------------------------------------


async def kill_under_load(server: RunningServer, secret: str, streams: int) -> list[Streamed]:
    """``streams`` streams at once; SIGKILL once some clients saw [DONE] while others are
    mid-stream. What each client saw."""
    seen = [Streamed() for _ in range(streams)]
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [
            asyncio.create_task(
                stream_chat(
                    client,
                    server.base_url,
                    secret,
                    {"messages": story(i), "max_tokens": 32, "ignore_eos": True},
                    seen=s,
                )
            )
            for i, s in enumerate(seen)
        ]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            finished = sum(s.done for s in seen)
            streaming = sum(s.content_chunks > 0 and not s.done for s in seen)
            if finished >= 2 and streaming >= 1:
                break
            await asyncio.sleep(0.005)
        server.process.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    return seen


def test_a_kill_under_load_loses_no_finished_request_and_duplicates_none(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "crash.db")
    args = ("--parallel", "4", "--ctx-size", "2048", "--max-queue", "64", "--db", db)
    server = start_server(*args)
    LOGS.append(server.log_path)
    try:
        # No key yet: requests run without one and are metered under no key.
        ok = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": MODEL, "messages": story(0), "max_tokens": 8},
            timeout=60,
        )
        assert ok.status_code == 200
        (free,) = ledger(db)
        assert free.key_id is None and free.request_id == ok.headers["x-request-id"]
        # The first key (made by the CLI) turns auth on within KEYS_EXIST_TTL.
        secret = cli_key(db, "crash")

        def refused() -> bool:
            response = httpx.post(
                f"{server.root_url}/tokenize", json={"model": MODEL, "prompt": "x"}, timeout=10
            )
            return response.status_code == 401

        assert wait_until(refused, timeout=KEYS_EXIST_TTL + 3)

        seen = asyncio.run(kill_under_load(server, secret, 12))
        server.process.wait(timeout=10)
        done = [s for s in seen if s.done]
        cut = [s for s in seen if not s.done]
        assert len(done) >= 2 and cut, [(s.content_chunks, s.done) for s in seen]
        # The server died under them: no cut stream ended cleanly.
        assert all(s.broken is not None for s in cut), cut
    finally:
        server.stop()

    # Restarted on the same database.
    server = start_server(*args)
    LOGS.append(server.log_path)
    try:
        key_id = key_named(db, "crash").id
        rows = ledger(db, key_id)
        counts = Counter(r.request_id for r in rows)
        assert all(n == 1 for n in counts.values()), counts
        for s in done:
            assert counts[s.request_id] == 1, f"{s.request_id} saw [DONE] but is not metered"
            (row,) = [r for r in rows if r.request_id == s.request_id]
            assert row.status == "ok" and usage_of(row) == s.usage_triple()
        # Rows of the cut requests may be missing, but none belongs to a request never sent.
        assert set(counts) <= {s.request_id for s in seen}

        response = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": MODEL, "messages": story(50), "max_tokens": 8},
            headers=auth(secret),
            timeout=60,
        )
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        after = ledger(db, key_id)
        assert len(after) == len(rows) + 1
        (new,) = [r for r in after if r.request_id == response.headers["x-request-id"]]
        assert new.status == "ok"
        assert (new.prompt_tokens, new.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    finally:
        server.stop()


# -- 4. rate limits across two servers on one PostgreSQL database --------------------------


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated PostgreSQL database (tests/unit/metering_db.py: its policy for a
    missing server applies)."""
    database: PgDatabase = request.getfixturevalue("pg_database")
    database.empty()
    return database.url


async def test_rpm_holds_across_two_servers_sharing_postgres(pg_url: str) -> None:
    rpm = 4
    args = ("--parallel", "4", "--ctx-size", "2048", "--max-queue", "64", "--db", pg_url)
    store_key(pg_url, "warm-up")  # auth on from the first request
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(*args), range(2)))
    LOGS.extend(s.log_path for s in servers)
    try:

        async def burst(attempt: int) -> tuple[list[httpx.Response], list[float]]:
            _, secret = store_key(pg_url, f"shared-{attempt}", rpm=rpm)
            async with httpx.AsyncClient(timeout=120) as client:

                async def one(i: int) -> tuple[httpx.Response, float]:
                    sent = time.time()
                    response = await client.post(
                        f"{servers[i % 2].base_url}/chat/completions",
                        json={"model": MODEL, "messages": story(i), "max_tokens": 8},
                        headers=auth(secret),
                    )
                    return response, sent

                answers = await asyncio.gather(*(one(i) for i in range(2 * rpm)))
            # Each answer's window ends at (about) its sending plus the reset it was told.
            ends = [t + float(r.headers["x-ratelimit-reset-requests"][:-1]) for r, t in answers]
            return [r for r, _ in answers], ends

        responses, ends = await burst(0)
        if max(ends) - min(ends) > 30:  # a minute boundary split the burst: once more
            responses, ends = await burst(1)
        assert max(ends) - min(ends) < 30

        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: rpm, 429: rpm}, statuses
        for response in responses:
            assert response.headers["x-ratelimit-limit-requests"] == str(rpm)
            if response.status_code == 200:
                continue
            error = error_of(response)
            assert error["code"] == "rate_limit_exceeded", error
            assert error["type"] == "rate_limit_exceeded"
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
        # Both servers admitted and refused; each admitted request is in the shared ledger.
        admitted = {r.headers["x-request-id"] for r in responses if r.status_code == 200}
        for s in servers:
            s.wait_idle()
        assert {r.request_id for r in ledger(pg_url)} >= admitted
        for s in servers:
            assert not secret_leaks(s.log(), SECRETS)
    finally:
        for s in servers:
            s.stop()


# -- last: no secret in any log ------------------------------------------------------------


def test_no_server_log_holds_a_secret(metered: Metered) -> None:
    assert SECRETS and LOGS
    leaks = {str(path): secret_leaks(path.read_text(errors="replace"), SECRETS) for path in LOGS}
    assert not any(leaks.values()), leaks


# -- bugs found: these fail until src/ is fixed ----------------------------------------------


def test_cached_tokens_of_n_choices_are_not_summed_past_what_was_cached(metered: Metered) -> None:
    """BUG: with n > 1, RequestRecord.add_usage sums every choice's cached tokens and caps the
    sum at prompt_tokens, so a prompt billed once is reported (and billed) as wholly cached.

    The scheduler always computes at least one prompt token (``_best_slot``: reuse is at most
    ``len(tokens) - 1``), so no request can truly have ``cached_tokens == prompt_tokens``; the
    usage chunk and the ledger both say it does, and the prompt is billed at the cached price.
    """
    server, secret = metered.server, metered.secrets["choices"]
    messages = [{"role": "user", "content": "Name three kinds of clouds, one word each."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "n": 3}
    with httpx.Client(timeout=60) as client:
        # The first request leaves the prompt cached in three slots; the second reuses it.
        for _ in range(2):
            response = client.post(
                f"{server.base_url}/chat/completions", json=body, headers=auth(secret)
            )
            assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    prompt, cached = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
    rows = wait_for_rows(metered.db, metered.key_id("choices"), 2)
    (row,) = [r for r in rows if r.request_id == response.headers["x-request-id"]]
    assert (row.prompt_tokens, row.cached_tokens) == (prompt, cached)  # consistent, at least
    assert cached < prompt, (
        f"n=3: cached_tokens {cached} of {prompt} prompt tokens; at most {prompt - 1} can be "
        f"reused by any one choice, so the prompt is billed {row.cost_pusd} pico-USD instead "
        f"of at least {cost(PRICE, prompt, prompt - 1, row.completion_tokens)}"
    )


def test_a_non_streamed_client_leaving_is_not_logged_as_a_server_bug(metered: Metered) -> None:
    """BUG: collect() raises ClientDisconnected, which no exception handler takes, so every
    non-streamed client that leaves early is logged by RequestIdMiddleware as
    ``ERROR ... unhandled error in req_...`` with a traceback (a streamed one is not)."""
    server, secret = metered.server, metered.secrets["leaver"]
    server.wait_idle()
    sock = raw_request(
        server.port,
        "/v1/chat/completions",
        # Far more than LONG: at ~170 tokens/s, LONG could end before the client leaves.
        {"model": MODEL, "messages": story(77), "max_tokens": 4000, "ignore_eos": True},
        auth(secret),
    )
    try:
        assert wait_until(lambda: server.engine_stats()["running"] == 1, timeout=30)
    finally:
        sock.close()
    (row,) = wait_for_rows(metered.db, metered.key_id("leaver"), 1)
    assert row.status == "disconnected"
    assert server.wait_idle()["in_flight"] == 0
    assert wait_until(lambda: row.request_id in server.log(), timeout=5)
    logged = [line for line in server.log().splitlines() if row.request_id in line]
    assert not [line for line in logged if "unhandled error" in line], logged
