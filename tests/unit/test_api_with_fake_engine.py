"""The API through the real app over a scripted engine (``fake_engine.ScriptedEngine``): what
the engine protocol makes possible and the real model cannot show deterministically (exact
wire bytes, refusals before the first byte, failures mid-stream, estimates, remote engines)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from spigot.api.app import create_app
from spigot.api.metering import Metering
from spigot.api.prep import PrepPool
from spigot.api.state import ServerState
from spigot.engine.protocol import EngineRefused, EngineUnavailable
from spigot.engine.types import FinishReason, GenRequest, UsageSource
from spigot.guard import Policy
from spigot.metering import Price, Store, open_store
from spigot.metering.prices import PriceTable
from spigot.models import ModelRouter
from tests.unit.fake_engine import ScriptedEngine

PER_TOKEN = 1_000_000  # pico-USD: one USD per million tokens
PRICES = PriceTable({"*": Price.per_million(prompt="1", completion="1")})
HELLO = [{"role": "user", "content": "hello there"}]  # "user: hello there": 3 words, 17 chars
DONE = b"data: [DONE]\n\n"

INPUT_RULES = Policy.from_toml(
    '[[rule]]\nid = "no-x"\nkind = "phrase"\nphrases = ["forbidden"]\naction = "block"\n'
    'applies_to = ["input"]\n'
)
OUTPUT_RULES = Policy.from_toml(
    '[[rule]]\nid = "no-y"\nkind = "phrase"\nphrases = ["never said"]\naction = "block"\n'
)


def make_app(
    engine: ScriptedEngine, *, store: Store | None = None, guard: Policy | None = None
) -> tuple[FastAPI, ServerState]:
    state = ServerState(
        engines={engine.model_id: engine},
        router=ModelRouter([engine.model_id]),
        guard=guard,
        metering=None if store is None else Metering(store, PRICES, require_auth=False),
        prep=PrepPool(1),
    )
    return create_app(state), state


@asynccontextmanager
async def serve(
    engine: ScriptedEngine,
    *,
    store: Store | None = None,
    secret: str | None = None,
    guard: Policy | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app around ``engine``, called in-process (started as the lifespan would)."""
    app, state = make_app(engine, store=store, guard=guard)
    headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
    await engine.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as client:
            yield client
    finally:
        await engine.stop()
        state.prep.close()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "metering.db")


@pytest.fixture
def store(db_path: str) -> Iterator[Store]:
    with open_store(db_path) as opened:
        yield opened


def reservations(db_path: str) -> list[tuple[str, int, int]]:
    """(request_id, amount_pusd, tokens) of every open reservation, read outside the store."""
    with closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute("SELECT request_id, amount_pusd, tokens FROM reservations").fetchall()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def events(response: httpx.Response) -> list[bytes]:
    """The SSE events of a (buffered) streamed response, each checked to be one compact
    ``data:`` line; the body must be nothing but such events."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    body = response.content
    assert body.endswith(b"\n\n")
    raw = body[:-2].split(b"\n\n")
    for event in raw:
        assert event.startswith(b"data: ") and b"\n" not in event, event
    return raw


def chunks(raw: list[bytes]) -> list[dict[str, Any]]:
    parsed = []
    for event in raw:
        payload = event.removeprefix(b"data: ")
        if payload == b"[DONE]":
            continue
        chunk = orjson.loads(payload)
        assert orjson.dumps(chunk) == payload  # compact JSON
        parsed.append(chunk)
    return parsed


def per_choice(request: GenRequest) -> list[str]:
    i = request.choice_index
    return [f"c{i}a", f" c{i}b"]


# -- the wire, byte by byte -----------------------------------------------------------------


async def test_streamed_chat_n2_interleaves_choices_then_usage_then_done() -> None:
    engine = ScriptedEngine(pieces=per_choice)
    async with serve(engine) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "scripted",
                "messages": HELLO,
                "n": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    raw = events(response)
    assert raw[-1] == b"data: [DONE]" and response.content.count(b"[DONE]") == 1
    assert response.content.endswith(DONE)
    parsed = chunks(raw)
    head = {k: parsed[0][k] for k in ("id", "object", "created", "model")}
    assert head["id"].startswith("chatcmpl-") and head["object"] == "chat.completion.chunk"
    assert head["model"] == "scripted"
    for chunk in parsed:
        assert {k: chunk[k] for k in head} == head
    *choice_chunks, usage = parsed
    shape = []
    for chunk in choice_chunks:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}
        shape.append((choice["index"], choice["delta"], choice["finish_reason"]))
    assert shape == [
        (0, {"role": "assistant", "content": ""}, None),
        (1, {"role": "assistant", "content": ""}, None),
        (0, {"content": "c0a"}, None),
        (1, {"content": "c1a"}, None),
        (0, {"content": " c0b"}, None),
        (1, {"content": " c1b"}, None),
        (0, {}, "stop"),
        (1, {}, "stop"),
    ]
    assert usage["choices"] == []
    # The prompt is counted once for its two choices; every choice's tokens count.
    assert usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def test_streamed_chat_without_include_usage_sends_no_usage_chunk() -> None:
    engine = ScriptedEngine(pieces=["Hi", " you"])
    async with serve(engine) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "scripted", "messages": HELLO, "stream": True, "max_tokens": 1},
        )
    raw = events(response)
    assert raw[-1] == b"data: [DONE]"
    parsed = chunks(raw)
    assert all(c["choices"] and c["usage"] is None for c in parsed)
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in parsed] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hi"}, None),
        ({}, "length"),
    ]


async def test_streamed_completions_two_prompts_n2() -> None:
    engine = ScriptedEngine()  # the reply is the prompt's words
    async with serve(engine) as client:
        response = await client.post(
            "/v1/completions",
            json={
                "model": "scripted",
                "prompt": ["one two", "three four five"],
                "n": 2,
                "max_tokens": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    raw = events(response)
    assert raw[-1] == b"data: [DONE]" and response.content.endswith(DONE)
    parsed = chunks(raw)
    *choice_chunks, usage = parsed
    assert all(c["id"].startswith("cmpl-") and c["object"] == "text_completion" for c in parsed)
    shape = []
    for chunk in choice_chunks:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
        shape.append((choice["index"], choice["text"], choice["finish_reason"]))
    # Choices 0, 1 are the first prompt's, 2, 3 the second's (cut by max_tokens).
    assert shape == [
        (0, "one", None),
        (1, "one", None),
        (2, "three", None),
        (3, "three", None),
        (0, " two", None),
        (1, " two", None),
        (2, " four", None),
        (3, " four", None),
        (0, "", "stop"),
        (1, "", "stop"),
        (2, "", "length"),
        (3, "", "length"),
    ]
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == 2 + 3  # each prompt once, not once per choice
    assert usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["total_tokens"] == 13


# -- refused before the first byte: nothing stays reserved or running ----------------------


REFUSED_BODY = {
    "error": {
        "message": "upstream says slow down",
        "type": "rate_limit_exceeded",
        "param": None,
        "code": "upstream_rate_limit",
    }
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("fault", ["refused", "unavailable", "queue_full"])
async def test_a_refusal_reaches_the_client_and_frees_everything(
    fault: str, stream: bool, store: Store, db_path: str
) -> None:
    key, secret = store.create_key("one", max_concurrent=1)
    engine = ScriptedEngine(delay=0.001)
    if fault == "refused":
        engine.refuse = EngineRefused(
            429, REFUSED_BODY, {"Retry-After": "7", "x-upstream-secret": "s3"}
        )
    elif fault == "unavailable":
        engine.refuse = EngineUnavailable("every upstream is down", retry_after=3)
    else:
        engine.queue_limit = 0
    body = {"model": "scripted", "messages": HELLO, "stream": stream}
    async with serve(engine, store=store, secret=secret) as client:
        refused = await client.post("/v1/chat/completions", json=body)
        if fault == "refused":
            assert refused.status_code == 429
            assert refused.json() == REFUSED_BODY
            assert refused.headers["retry-after"] == "7"
            assert "x-upstream-secret" not in refused.headers
        else:
            assert refused.status_code == 503
            error = refused.json()["error"]
            assert error["type"] == "server_error"
            expected = (
                ("upstream_unavailable", "3") if fault == "unavailable" else ("overloaded", "1")
            )
            assert (error["code"], refused.headers["retry-after"]) == expected
        assert "text/event-stream" not in refused.headers["content-type"]
        # Nothing generates, nothing is reserved, nothing was billed.
        assert engine.running == 0
        assert len(engine.submitted) == (0 if fault == "queue_full" else 1)
        assert reservations(db_path) == []
        assert store.ledger(key_id=key.id) == []
        # The key's one concurrent slot is free again.
        engine.refuse, engine.queue_limit = None, 64
        served = await client.post("/v1/chat/completions", json=body)
        assert served.status_code == 200, served.text
    rows = store.ledger(key_id=key.id)
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in rows] == [("ok", 3, 3)]
    assert reservations(db_path) == []


# -- failing after it started --------------------------------------------------------------


@pytest.mark.parametrize("source", [UsageSource.PARTIAL, UsageSource.ENGINE])
async def test_a_failure_after_two_outputs_ends_with_one_error_event(
    source: UsageSource, store: Store, db_path: str
) -> None:
    key, secret = store.create_key("k")
    engine = ScriptedEngine(
        pieces=["a", "b", "c", "d"], fail_after=2, error_message="GPU on fire", cut_source=source
    )
    async with serve(engine, store=store, secret=secret) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "scripted",
                "messages": HELLO,
                "n": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    raw = events(response)
    assert b"[DONE]" not in response.content
    parsed = chunks(raw)
    *choice_chunks, last = parsed
    assert last == {
        "error": {"message": "GPU on fire", "type": "server_error", "param": None, "code": None}
    }
    assert sum("error" in c for c in parsed) == 1
    contents = [
        (c["choices"][0]["index"], c["choices"][0]["delta"]["content"])
        for c in choice_chunks
        if c["choices"][0]["delta"].get("content")
    ]
    assert contents == [(0, "a"), (1, "a"), (0, "b"), (1, "b")]
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks)
    assert engine.running == 0
    [row] = store.ledger(key_id=key.id)
    # The ledger keeps what the engine reported: its source, every token both choices made.
    assert (row.status, row.usage_source) == ("error", source.value)
    assert (row.prompt_tokens, row.completion_tokens) == (3, 4)
    assert reservations(db_path) == []


async def test_a_failure_not_streamed_is_a_500_and_billed_as_error(store: Store) -> None:
    key, secret = store.create_key("k")
    engine = ScriptedEngine(pieces=["a", "b", "c"], fail_after=1)
    async with serve(engine, store=store, secret=secret) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "scripted", "messages": HELLO}
        )
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "scripted engine failure"
    [row] = store.ledger(key_id=key.id)
    assert (row.status, row.usage_source, row.completion_tokens) == ("error", "partial", 1)


# -- estimates: reserved on the estimate, billed on the engine's count ---------------------


async def test_the_reservation_prices_the_estimate_before_the_engine_runs(
    store: Store, db_path: str
) -> None:
    # The estimate (17 characters) plus max_tokens is over the budget; the exact count is not.
    key, secret = store.create_key("k", budget_pusd=10 * PER_TOKEN)
    engine = ScriptedEngine.remote()
    body = {"model": "remote", "messages": HELLO, "max_tokens": 2}
    async with serve(engine, store=store, secret=secret) as client:
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "insufficient_quota"
        [prompt] = engine.prepared
        assert (prompt.count_exact, prompt.token_count) == (False, 17)
        assert engine.submitted == []
        assert reservations(db_path) == []
        # The same request counted exactly (3 + 2 tokens) fits the budget.
        engine.count_exact = True
        served = await client.post("/v1/chat/completions", json=body)
        assert served.status_code == 200, served.text
    assert [r.prompt_tokens for r in store.ledger(key_id=key.id)] == [3]


async def test_the_engines_prompt_count_replaces_the_estimate(store: Store, db_path: str) -> None:
    key, secret = store.create_key("k")
    engine = ScriptedEngine.remote(pieces=["x", "y"], delay=0.05)
    async with serve(engine, store=store, secret=secret) as client:
        pending = asyncio.ensure_future(
            client.post(
                "/v1/chat/completions",
                json={
                    "model": "remote",
                    "messages": HELLO,
                    "max_tokens": 5,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
        )
        async with asyncio.timeout(5):
            await engine.generating.wait()
        assert engine.running == 1
        # While it runs, the reservation holds the estimate's worst case.
        [(_, amount, tokens)] = reservations(db_path)
        assert (amount, tokens) == ((17 + 5) * PER_TOKEN, 17 + 5)
        response = await pending
    usage = chunks(events(response))[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 2)
    [row] = store.ledger(key_id=key.id)
    assert (row.prompt_tokens, row.completion_tokens, row.usage_source) == (3, 2, "upstream")
    assert row.cost_pusd == 5 * PER_TOKEN
    assert reservations(db_path) == []


async def test_not_streamed_usage_is_the_engines_count() -> None:
    engine = ScriptedEngine.remote(pieces=["x"], reported_prompt_tokens=40)
    async with serve(engine) as client:
        response = await client.post(
            "/v1/completions", json={"model": "remote", "prompt": "a b", "max_tokens": 3}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == "x"
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (40, 1)


# -- a remote engine's tokens ---------------------------------------------------------------


async def test_tokenize_needs_a_local_tokenizer() -> None:
    async with serve(ScriptedEngine.remote()) as client:
        for path, body in (
            ("/tokenize", {"model": "remote", "prompt": "a b c"}),
            ("/detokenize", {"model": "remote", "tokens": [1, 2]}),
        ):
            response = await client.post(path, json=body)
            assert response.status_code == 400, path
            error = response.json()["error"]
            assert error["param"] == "model" and "another server" in error["message"]
    async with serve(ScriptedEngine()) as client:
        response = await client.post("/tokenize", json={"model": "scripted", "prompt": "a b a"})
        assert response.status_code == 200
        assert response.json() == {"tokens": [1, 2, 1], "count": 3, "max_model_len": 4096}


@pytest.mark.parametrize("why", ["input_rules", "echo"])
async def test_token_id_prompts_to_a_remote_engine_cannot_be_checked_or_echoed(
    why: str,
) -> None:
    engine = ScriptedEngine.remote()
    guard = INPUT_RULES if why == "input_rules" else None
    body = {"model": "remote", "prompt": [5, 6, 7], "max_tokens": 2, "echo": why == "echo"}
    async with serve(engine, guard=guard) as client:
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "prompt" and "send the prompt as text" in error["message"]
        assert engine.submitted == []
        # As text it passes the same rules (and is echoed).
        body["prompt"] = "five six seven"
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text


async def test_token_id_prompts_pass_to_a_remote_engine_otherwise() -> None:
    engine = ScriptedEngine.remote(pieces=["ok"])
    async with serve(engine) as client:
        response = await client.post(
            "/v1/completions", json={"model": "remote", "prompt": [5, 6, 7], "max_tokens": 2}
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "ok"
    [request] = engine.submitted
    assert request.prompt.token_ids == (5, 6, 7) and request.prompt.text is None


async def test_token_id_prompts_are_echoed_by_a_local_engine() -> None:
    engine = ScriptedEngine(pieces=["!"])
    async with serve(engine) as client:
        tokens = await client.post("/tokenize", json={"model": "scripted", "prompt": "hi there"})
        ids = tokens.json()["tokens"]
        response = await client.post(
            "/v1/completions",
            json={"model": "scripted", "prompt": ids, "max_tokens": 2, "echo": True},
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "hi there!"


# -- what an engine elsewhere sends that spigot does not know -------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("guarded", [False, True], ids=["no-policy", "output-policy"])
async def test_extras_pass_only_without_output_rules(endpoint: str, guarded: bool) -> None:
    engine = ScriptedEngine.remote(
        pieces=["Hi", " there"],
        chunk_extra={"system_fingerprint": "fp_up"},
        delta_extra={"reasoning_content": "thinking"},
    )
    body: dict[str, Any]
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": HELLO}
    else:
        path, body = "/v1/completions", {"prompt": "say hi"}
    async with serve(engine, guard=OUTPUT_RULES if guarded else None) as client:
        response = await client.post(
            path, json={"model": "remote", "stream": True, "max_tokens": 5, **body}
        )
    parsed = chunks(events(response))
    contents = []
    for chunk in parsed:
        choice = chunk["choices"][0]
        part = choice["delta"] if endpoint == "chat" else choice
        text = part.get("content") if endpoint == "chat" else part["text"]
        if not text:
            continue
        contents.append(text)
        carried = (chunk.get("system_fingerprint"), part.get("reasoning_content"))
        assert carried == ((None, None) if guarded else ("fp_up", "thinking"))
    assert "".join(contents) == "Hi there"
    assert (b"fp_up" in response.content) is not guarded
    assert (b"thinking" in response.content) is not guarded


# -- what the client left unset --------------------------------------------------------------


async def test_unset_sampling_fields_reach_the_engine_as_defaulted() -> None:
    engine = ScriptedEngine.remote(pieces=["x"])
    async with serve(engine) as client:
        for body in (
            {"messages": HELLO},
            {"messages": HELLO, "temperature": 0.3},
            {"messages": HELLO, "top_p": 0.5, "temperature": 0.0, "max_tokens": 9},
        ):
            response = await client.post("/v1/chat/completions", json={"model": "remote", **body})
            assert response.status_code == 200, response.text
        response = await client.post(
            "/v1/completions", json={"model": "remote", "prompt": "a", "top_p": 0.9}
        )
        assert response.status_code == 200, response.text
    params = [r.params for r in engine.submitted]
    assert [p.defaulted for p in params] == [
        frozenset({"temperature", "top_p"}),
        frozenset({"top_p"}),
        frozenset(),
        frozenset({"temperature"}),
    ]
    assert [(p.temperature, p.top_p) for p in params] == [
        (1.0, 1.0),
        (0.3, 1.0),
        (0.0, 0.5),
        (1.0, 0.9),
    ]
    # No max_tokens: the cap is the whole context, for reserving only (the engine is not told).
    assert [(p.max_tokens, p.max_tokens_given) for p in params] == [
        (4096, False),
        (4096, False),
        (9, True),
        (16, True),  # the completions default
    ]


# -- an output rule stops its choice in the engine -----------------------------------------


async def test_a_blocked_choice_is_aborted_in_the_engine_and_billed_so_far(
    store: Store,
) -> None:
    key, secret = store.create_key("k")
    policy = Policy.from_toml(
        '[[rule]]\nid = "s"\nkind = "phrase"\nphrases = ["secret"]\naction = "block"\n'
    )
    engine = ScriptedEngine(pieces=["ok", " secret", " more", " more", " more"], delay=0.001)
    async with serve(engine, store=store, secret=secret, guard=policy) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "scripted", "messages": HELLO, "stream": True},
        )
    assert b"secret" not in response.content
    parsed = chunks(events(response))
    assert parsed[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed) == "ok "
    [request] = engine.submitted
    assert engine.aborted == [request.request_id]
    last = engine.ended[request.request_id]
    assert last.finish_reason is FinishReason.ABORT and last.usage is not None
    [row] = store.ledger(key_id=key.id)
    assert (row.finish_reason, row.status, row.usage_source) == ("content_filter", "ok", "partial")
    # Billed what the engine made until it stopped: fewer than all five pieces.
    assert row.completion_tokens == last.usage.completion_tokens < 5


# -- the client leaves mid-stream ----------------------------------------------------------


async def post_and_leave(
    app: FastAPI, path: str, body: dict[str, Any], secret: str, *, after_chunks: int
) -> bytes:
    """POST straight to the ASGI app and send ``http.disconnect`` once ``after_chunks`` events
    have arrived (httpx's ASGI transport cannot leave early); what was sent until then."""
    data = orjson.dumps(body)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"authorization", f"Bearer {secret}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    leave = asyncio.Event()
    received: list[bytes] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": data, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if b"".join(received).count(b"\n\n") >= after_chunks:
                leave.set()

    async with asyncio.timeout(10):
        await app(scope, receive, send)
    return b"".join(received)


async def test_a_client_that_leaves_is_billed_what_the_engine_made(
    store: Store, db_path: str
) -> None:
    key, secret = store.create_key("k", max_concurrent=1)
    engine = ScriptedEngine(pieces=[f" w{i}" for i in range(50)], delay=0.01)
    app, state = make_app(engine, store=store)
    await engine.start()
    try:
        body = {"model": "scripted", "messages": HELLO, "stream": True}
        # The role chunk and two content chunks, then the client is gone.
        sent = await post_and_leave(app, "/v1/chat/completions", body, secret, after_chunks=3)
    finally:
        await engine.stop()
        state.prep.close()
    assert b"[DONE]" not in sent and b" w1" in sent
    [request] = engine.submitted
    assert engine.aborted == [request.request_id]
    last = engine.ended[request.request_id]
    assert last.finish_reason is FinishReason.ABORT and last.usage is not None
    [row] = store.ledger(key_id=key.id)
    assert (row.status, row.usage_source) == ("disconnected", "partial")
    assert row.completion_tokens == last.usage.completion_tokens
    assert 2 <= row.completion_tokens < 50
    assert reservations(db_path) == []
    assert engine.running == 0


# -- more sequences than the engine takes in one request -----------------------------------


async def test_n_beyond_the_engines_capacity_is_a_400_before_anything_runs(
    store: Store, db_path: str
) -> None:
    key, secret = store.create_key("k")
    engine = ScriptedEngine(capacity=2)
    async with serve(engine, store=store, secret=secret) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "scripted", "messages": HELLO, "n": 3}
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
    assert engine.prepared == [] and engine.submitted == []
    assert reservations(db_path) == [] and store.ledger(key_id=key.id) == []


# -- found with the fake -------------------------------------------------------------------


async def test_tokenize_answers_400_when_the_engine_cannot_prepare_the_text() -> None:
    async with serve(ScriptedEngine()) as client:  # a prompt with no words: PromptError
        completions = await client.post(
            "/v1/completions", json={"model": "scripted", "prompt": " "}
        )
        assert completions.status_code == 400
        response = await client.post("/tokenize", json={"model": "scripted", "prompt": " "})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


async def test_messages_reach_the_engine_with_their_roles_as_sent() -> None:
    engine = ScriptedEngine.remote()
    async with serve(engine) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": engine.model_id,
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
            },
        )
    assert response.status_code == 200, response.text
    (prompt,) = engine.prepared
    assert prompt.messages == (
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    )
