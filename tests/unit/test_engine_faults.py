"""The engine and the API around it, on a scripted fake model: normal runs and injected faults."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from spigot.api.app import create_app
from spigot.api.state import ServerState
from spigot.engine.llamacpp.engine import EngineOptions, LlamaCppEngine
from spigot.engine.types import FinishReason, GenOutput, GenRequest, Prompt, SamplingParams
from spigot.models import ModelRouter
from tests.unit.fake_model import E_ACUTE, EOS, FakeModel, token_of


@pytest.fixture
async def engine_factory() -> AsyncIterator[object]:
    engines: list[LlamaCppEngine] = []

    async def make(model: FakeModel, parallel: int = 4) -> LlamaCppEngine:
        engine = LlamaCppEngine(
            "fake", model, EngineOptions(n_ctx=1024, parallel=parallel, max_queue=8)
        )
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def request(
    engine: LlamaCppEngine, max_tokens: int = 32, choice: int = 0, **params: object
) -> GenRequest:
    return GenRequest(
        engine.new_request_id(),
        Prompt.of_tokens((token_of("h"), token_of("i"))),
        SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        choice,
    )


async def collect(engine: LlamaCppEngine, *requests: GenRequest) -> list[GenOutput]:
    return [o async for o in engine.submit(list(requests))]


async def test_scripted_text_usage_and_stop(engine_factory) -> None:
    engine = await engine_factory(FakeModel())
    outputs = await collect(engine, request(engine))
    assert "".join(o.text for o in outputs) == "hello world"
    last = outputs[-1]
    assert last.finish_reason is FinishReason.STOP
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 12)  # 11 + end token


async def test_split_character_is_held_until_whole(engine_factory) -> None:
    engine = await engine_factory(FakeModel(script=[token_of("a"), *E_ACUTE, token_of("b"), EOS]))
    outputs = await collect(engine, request(engine))
    texts = [o.text for o in outputs if o.text]
    assert texts == ["a", "é", "b"]


async def test_stop_string_and_length(engine_factory) -> None:
    engine = await engine_factory(FakeModel())
    outputs = await collect(engine, request(engine, stop=("o w",)))
    assert "".join(o.text for o in outputs) == "hell"
    assert outputs[-1].finish_reason is FinishReason.STOP
    outputs = await collect(engine, request(engine, max_tokens=3))
    assert "".join(o.text for o in outputs) == "hel"
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert outputs[-1].usage.completion_tokens == 3


async def test_abort_reports_consumed_tokens_and_frees_the_slot(engine_factory) -> None:
    model = FakeModel(script=[token_of("x")])
    engine = await engine_factory(model, parallel=1)
    stream = engine.submit([request(engine, max_tokens=10_000)])
    first = await anext(stream)
    assert first.text == "x"
    stream.abort()
    rest = await stream.drain()
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert rest[-1].usage.completion_tokens >= 1
    # The only slot is free again, and its KV is reused: the new prompt "hi"
    # shares its first token with the aborted "hi x x ...", the slot keeps it.
    outputs = await collect(engine, request(engine, max_tokens=2))
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert (0, 1) in model.removed
    assert outputs[-1].usage.cached_tokens == 1


async def test_decode_failure_errors_running_sequences_then_engine_recovers(engine_factory) -> None:
    model = FakeModel(script=[token_of("x")], fail_at_step=4)
    engine = await engine_factory(model)
    outputs = await collect(
        engine, request(engine, max_tokens=50), request(engine, max_tokens=50, choice=1)
    )
    errors = [o for o in outputs if o.finish_reason is FinishReason.ERROR]
    assert {o.choice_index for o in errors} == {0, 1}
    assert all(o.error for o in errors)
    # The next request is served normally.
    outputs = await collect(engine, request(engine, max_tokens=3))
    assert outputs[-1].finish_reason is FinishReason.LENGTH


async def test_kv_pool_full_is_recovered_without_losing_anyone(engine_factory) -> None:
    model = FakeModel(full_at_step=3)
    engine = await engine_factory(model)
    outputs = await collect(engine, request(engine), request(engine, choice=1))
    texts = ["".join(o.text for o in outputs if o.choice_index == i) for i in (0, 1)]
    assert texts == ["hello world", "hello world"]
    assert all(o.finish_reason is not FinishReason.ERROR for o in outputs)


def _long_request(engine: LlamaCppEngine, text: str) -> GenRequest:
    return GenRequest(
        engine.new_request_id(),
        Prompt.of_tokens([token_of(c) for c in text]),
        SamplingParams(max_tokens=3),
    )


async def test_a_saved_prefix_is_loaded_back_and_a_failed_load_loses_nothing(
    engine_factory,
) -> None:
    model = FakeModel()
    engine = await engine_factory(model)
    shared = "the quick brown fox jumps over the dog "
    await collect(engine, _long_request(engine, shared + "a"))
    # An unrelated prompt takes the only cached slot: the first cache is saved.
    await collect(engine, _long_request(engine, "zzzzzzzzzzzzzzzzzzzzzzzz"))
    assert model.saved and engine.core.stats()["saved_prefix_tokens"] > 0
    outputs = await collect(engine, _long_request(engine, shared + "b"))
    assert model.loaded
    assert outputs[-1].usage.cached_tokens == len(shared)
    # A copy that no longer fits: the prompt is computed in full, text unchanged.
    model.fail_loads = True
    await collect(engine, _long_request(engine, "yyyyyyyyyyyyyyyyyyyyyyyy"))
    outputs = await collect(engine, _long_request(engine, shared + "c"))
    assert "".join(o.text for o in outputs) == "hel"
    assert outputs[-1].usage.cached_tokens == 0
    assert outputs[-1].finish_reason is FinishReason.LENGTH


@pytest.fixture
async def app_client(engine_factory) -> AsyncIterator[httpx.AsyncClient]:
    engine = await engine_factory(FakeModel(script=[token_of("x")], fail_at_step=4))
    app = create_app(ServerState(engines={"fake": engine}, router=ModelRouter(["fake"])))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_stream_failing_after_start_ends_with_one_error_event(app_client) -> None:
    response = await app_client.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e]
    assert b"[DONE]" not in response.content
    assert events[0].startswith(b"data: ")
    *chunks, last = [orjson.loads(e.removeprefix(b"data: ")) for e in events]
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)
    assert set(last) == {"error"}
    assert set(last["error"]) == {"message", "type", "param", "code"}


async def test_non_streamed_failure_is_500_with_openai_body(app_client) -> None:
    response = await app_client.post(
        "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 50}
    )
    assert response.status_code == 500
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"].startswith("req_")
