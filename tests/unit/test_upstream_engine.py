"""UpstreamEngine against real scripted upstream processes (tests/scripted_upstream.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from spigot.engine.protocol import EngineRefused, EngineUnavailable, QueueFull
from spigot.engine.types import (
    FinishReason,
    GenOutput,
    GenRequest,
    Prompt,
    SamplingParams,
    UsageSource,
)
from spigot.upstream import ModelRoute, Target, Upstream, UpstreamConfig, UpstreamEngine
from tests.scripted_upstream import ScriptedUpstream, free_port, start_scripted_upstream

MODEL = "m"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ScriptedUpstream, ScriptedUpstream]]:
    one = start_scripted_upstream(f"{MODEL}:4096", "other")
    try:
        two = start_scripted_upstream(f"{MODEL}:2048")
    except BaseException:
        one.stop()
        raise
    try:
        yield one, two
    finally:
        one.stop()
        two.stop()


@pytest.fixture
def up1(servers: tuple[ScriptedUpstream, ScriptedUpstream]) -> ScriptedUpstream:
    servers[0].reset()
    return servers[0]


@pytest.fixture
def up2(servers: tuple[ScriptedUpstream, ScriptedUpstream]) -> ScriptedUpstream:
    servers[1].reset()
    return servers[1]


def config(name: str, base_url: str, **overrides: Any) -> UpstreamConfig:
    settings: dict[str, Any] = {
        "connect_timeout": 1.0,
        "first_event_timeout": 1.5,
        "idle_timeout": 1.5,
        "health_interval": 60.0,
        **overrides,
    }
    return UpstreamConfig(name, base_url, **settings)


async def make_engine(
    *targets: tuple[str, str],
    configs: dict[str, UpstreamConfig],
    **route: Any,
) -> UpstreamEngine:
    upstreams = {name: Upstream(c) for name, c in configs.items()}
    engine = UpstreamEngine(
        ModelRoute("served", tuple(Target(u, m) for u, m in targets), **route), upstreams
    )
    await engine.start()
    return engine


@pytest.fixture
async def one(up1: ScriptedUpstream) -> AsyncIterator[UpstreamEngine]:
    engine = await make_engine(("a", MODEL), configs={"a": config("a", up1.base_url, api_key="k1")})
    yield engine
    await engine.stop()


@pytest.fixture
async def two(up1: ScriptedUpstream, up2: ScriptedUpstream) -> AsyncIterator[UpstreamEngine]:
    engine = await make_engine(
        ("a", MODEL),
        ("b", MODEL),
        configs={"a": config("a", up1.base_url), "b": config("b", up2.base_url)},
    )
    yield engine
    await engine.stop()


def chat(engine: UpstreamEngine, content: str = "hello there") -> Prompt:
    return engine.prepare_chat([{"role": "user", "content": content}])


def requests(engine: UpstreamEngine, prompt: Prompt, n: int = 1, **params: Any) -> list[GenRequest]:
    sampling = SamplingParams(**{"max_tokens": 64, "max_tokens_given": False, **params})
    return [GenRequest(engine.new_request_id(), prompt, sampling, i) for i in range(n)]


async def generate(
    engine: UpstreamEngine, prompt: Prompt, n: int = 1, **params: Any
) -> list[GenOutput]:
    stream = engine.submit(requests(engine, prompt, n, **params))
    await stream.ready()
    return [output async for output in stream]


def texts(outputs: list[GenOutput]) -> str:
    return "".join(o.text for o in outputs)


async def test_a_chat_stream_with_upstream_usage(
    one: UpstreamEngine, up1: ScriptedUpstream
) -> None:
    up1.script({"cached_tokens": 1})
    outputs = await generate(one, chat(one))
    assert texts(outputs) == "You said: hello there"
    assert [o.text for o in outputs[:-1]] == ["You", " said:", " hello", " there"]
    last = outputs[-1]
    assert last.finish_reason is FinishReason.STOP and last.text == ""
    assert last.usage is not None and last.usage.source is UsageSource.UPSTREAM
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 4)
    assert last.usage.cached_tokens == 1
    (record,) = up1.requests()
    assert record["path"] == "/v1/chat/completions"
    body = record["body"]
    assert body["model"] == MODEL and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in body and "n" not in body
    assert record["headers"]["authorization"] == "Bearer k1"
    assert record["headers"]["x-request-id"].startswith("spigot-")
    assert one.max_context == 4096
    assert one.stats()["in_flight"] == 0


async def test_completions_with_token_ids_logprobs_and_max_tokens(
    one: UpstreamEngine, up1: ScriptedUpstream
) -> None:
    outputs = await generate(
        one, one.prepare_token_ids([1, 2]), max_tokens=2, max_tokens_given=True, logprobs=2
    )
    assert texts(outputs) == "Continuing: 1"
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert [lp.token for o in outputs for lp in o.logprobs] == ["Continuing:", " 1"]
    assert outputs[0].logprobs[0].top[0] == ("Continuing:", b"Continuing:", -0.5)
    body = up1.requests()[0]["body"]
    assert body["prompt"] == [1, 2] and body["max_tokens"] == 2 and body["logprobs"] == 2


async def test_failover_on_503(
    two: UpstreamEngine, up1: ScriptedUpstream, up2: ScriptedUpstream
) -> None:
    up1.script({"status": 503, "body": {"error": {"message": "overloaded"}}})
    outputs = await generate(two, chat(two))
    assert texts(outputs) == "You said: hello there"
    assert len(up1.requests()) == 1 and len(up2.requests()) == 1


async def test_refused_connection_then_failover(up2: ScriptedUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    engine = await make_engine(
        ("dead", MODEL),
        ("b", MODEL),
        configs={"dead": config("dead", dead), "b": config("b", up2.base_url)},
    )
    try:
        dead_upstream = engine._router.upstreams["dead"]
        assert not dead_upstream.healthy  # start() noticed, and did not fail
        dead_upstream.healthy = True  # as if the health check had not noticed yet
        outputs = await generate(engine, chat(engine))
        assert texts(outputs) == "You said: hello there"
        assert dead_upstream.breaker.failures == 1
    finally:
        await engine.stop()


async def test_ping_only_upstream_times_out_then_fails_over_without_duplicates(
    two: UpstreamEngine, up1: ScriptedUpstream, up2: ScriptedUpstream
) -> None:
    up1.script({"ping_only": True})
    started = time.monotonic()
    outputs = await generate(two, chat(two))
    assert time.monotonic() - started >= 1.5  # first_event_timeout
    assert texts(outputs) == "You said: hello there"
    assert sum(1 for o in outputs if o.finished) == 1
    (record,) = up1.requests()
    assert record["client_closed_at"] is not None


async def test_error_as_first_event_then_failover(
    two: UpstreamEngine, up1: ScriptedUpstream, up2: ScriptedUpstream
) -> None:
    up1.script({"error_first": True})
    outputs = await generate(two, chat(two))
    assert texts(outputs) == "You said: hello there"
    assert len(up2.requests()) == 1


async def test_retry_after_is_waited_on_the_only_target(
    one: UpstreamEngine, up1: ScriptedUpstream
) -> None:
    up1.script(
        {
            "status": 429,
            "body": {"error": {"message": "slow down"}},
            "headers": {"Retry-After": "1"},
        }
    )
    outputs = await generate(one, chat(one))
    assert texts(outputs) == "You said: hello there"
    first, second = up1.requests()
    assert second["received_at"] - first["received_at"] >= 1.0


async def test_a_long_retry_after_ends_the_tries(
    one: UpstreamEngine, up1: ScriptedUpstream
) -> None:
    body = {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}}
    up1.script({"status": 429, "body": body, "headers": {"Retry-After": "30"}})
    stream = one.submit(requests(one, chat(one)))
    with pytest.raises(EngineRefused) as caught:
        await stream.ready()
    assert caught.value.status == 429 and caught.value.body == body
    assert caught.value.headers == {"Retry-After": "30"}
    assert len(up1.requests()) == 1
    # The upstream asked for a pause: nothing is sent there meanwhile.
    later = one.submit(requests(one, chat(one)))
    with pytest.raises(EngineUnavailable) as unavailable:
        await later.ready()
    assert unavailable.value.retry_after is not None and unavailable.value.retry_after > 25


async def test_a_400_passes_through_unchanged_and_spares_the_breaker(
    two: UpstreamEngine, up1: ScriptedUpstream, up2: ScriptedUpstream
) -> None:
    body = {
        "error": {
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
            "extra": "kept",
        }
    }
    up1.script({"status": 400, "body": body})
    stream = two.submit(requests(two, chat(two)))
    with pytest.raises(EngineRefused) as caught:
        await stream.ready()
    assert caught.value.status == 400 and caught.value.body == body
    assert len(up1.requests()) == 1 and up2.requests() == []
    assert two.stats()["upstream.a.failures"] == 0
    up1.script({"status": 404, "body": "no such thing"})
    with pytest.raises(EngineRefused) as text:
        await two.submit(requests(two, chat(two))).ready()
    assert text.value.body == {
        "error": {"message": "no such thing", "type": "upstream_error", "param": None, "code": None}
    }


async def test_breaker_opens_and_the_target_is_skipped(
    two: UpstreamEngine, up1: ScriptedUpstream, up2: ScriptedUpstream
) -> None:
    up1.script(*[{"status": 500, "body": "down"}] * 5)
    for _ in range(5):
        assert texts(await generate(two, chat(two))) == "You said: hello there"
    assert two.stats()["upstream.a.breaker_open"] == 1
    for _ in range(2):
        assert texts(await generate(two, chat(two))) == "You said: hello there"
    assert len(up1.requests()) == 5 and len(up2.requests()) == 7


async def test_all_tries_failing_with_5xx(one: UpstreamEngine, up1: ScriptedUpstream) -> None:
    up1.script(*[{"status": 502, "body": "bad gateway"}] * 3)
    with pytest.raises(EngineRefused) as caught:
        await one.submit(requests(one, chat(one))).ready()
    assert caught.value.status == 502 and len(up1.requests()) == 3


async def test_all_tries_timing_out(one: UpstreamEngine, up1: ScriptedUpstream) -> None:
    up1.script({"ping_only": True})
    with pytest.raises(EngineUnavailable, match=r"no event within 1\.5 s"):
        await one.submit(requests(one, chat(one))).ready()
    assert len(up1.requests()) == 1  # a timeout is not retried on the same target


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ({"die_after": 2}, "connection failed"),
        ({"eof_after": 2}, "unfinished"),
        ({"error_after": 2, "error": {"error": {"message": "GPU fell off"}}}, "GPU fell off"),
        ({"stall_after": 2}, "sent nothing for 1.5 s"),
    ],
)
async def test_failure_after_the_first_event(
    one: UpstreamEngine, up1: ScriptedUpstream, script: dict[str, Any], message: str
) -> None:
    up1.script(script)
    outputs = await generate(one, chat(one))
    assert [o.text for o in outputs] == ["You", " said:", ""]
    last = outputs[-1]
    assert last.finish_reason is FinishReason.ERROR and last.error is not None
    assert message in last.error
    assert last.usage is not None and last.usage.source is UsageSource.PARTIAL
    assert last.usage.completion_tokens == 2
    assert last.usage.prompt_tokens == chat(one).token_count  # the estimate


async def test_abort_closes_the_upstream_connection(
    one: UpstreamEngine, up1: ScriptedUpstream
) -> None:
    up1.script({"pings_after": 2})
    stream = one.submit(requests(one, chat(one)))
    await stream.ready()
    seen = [await stream.__anext__(), await stream.__anext__()]
    assert texts(seen) == "You said:"
    aborted_at = time.time()
    stream.abort()
    (last,) = await stream.drain()
    assert last.finish_reason is FinishReason.ABORT
    assert last.usage is not None and last.usage.source is UsageSource.PARTIAL
    assert last.usage.completion_tokens == 2
    closed_at = None
    for _ in range(20):
        closed_at = up1.requests()[0]["client_closed_at"]
        if closed_at is not None:
            break
        await asyncio.sleep(0.05)
    assert closed_at is not None and closed_at - aborted_at < 1.0
    assert one.stats()["in_flight"] == 0


async def test_n_choices_each_their_own_request(one: UpstreamEngine, up1: ScriptedUpstream) -> None:
    outputs = await generate(one, chat(one), n=3)
    assert {o.choice_index for o in outputs} == {0, 1, 2}
    for i in range(3):
        mine = [o for o in outputs if o.choice_index == i]
        assert texts(mine) == "You said: hello there" and mine[-1].finished
    assert len(up1.requests()) == 3


async def test_one_refused_choice_refuses_the_request(
    one: UpstreamEngine, up1: ScriptedUpstream
) -> None:
    up1.script({"status": 400, "body": {"error": {"message": "no"}}}, {"delay_first": 0.5})
    stream = one.submit(requests(one, chat(one), n=2))
    with pytest.raises(EngineRefused):
        await stream.ready()
    stream.abort()
    await stream.drain(within=2)
    for _ in range(20):
        if one.stats()["in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert one.stats()["in_flight"] == 0


async def test_queue_full_when_the_targets_are_busy(up1: ScriptedUpstream) -> None:
    engine = await make_engine(
        ("a", MODEL), configs={"a": config("a", up1.base_url, max_in_flight=1)}
    )
    try:
        up1.script({"pings_after": 1})
        stream = engine.submit(requests(engine, chat(engine)))
        await stream.ready()
        with pytest.raises(QueueFull):
            engine.submit(requests(engine, chat(engine)))
        stream.abort()
        await stream.drain()
        assert texts(await generate(engine, chat(engine))) == "You said: hello there"
    finally:
        await engine.stop()


async def test_extras_are_carried(one: UpstreamEngine, up1: ScriptedUpstream) -> None:
    up1.script(
        {
            "chunk_extra": {"system_fingerprint": "fp-1", "service_tier": "default"},
            "delta_extra": {"reasoning_content": "thinking"},
        }
    )
    outputs = await generate(one, chat(one))
    content = [o for o in outputs if o.text]
    assert all(
        o.chunk_extra == {"system_fingerprint": "fp-1", "service_tier": "default"} for o in content
    )
    assert all(o.delta_extra == {"reasoning_content": "thinking"} for o in content)
    assert outputs[-1].chunk_extra is None and outputs[-1].delta_extra is None


@pytest.mark.parametrize(
    "quirks",
    [
        {"role_every_chunk": True},
        {"usage": "every"},
        {"usage": "finish"},
        {"crlf": True},
        {"event_field": "completion"},
        {"pings": True},
        {"done": False},
        {"chunk_size": 7},
        {"crlf": True, "pings": True, "event_field": "x", "done": False, "usage": "every"},
    ],
)
async def test_quirks_are_normalised(
    one: UpstreamEngine, up1: ScriptedUpstream, quirks: dict[str, Any]
) -> None:
    up1.script(quirks)
    outputs = await generate(one, chat(one))
    assert [o.text for o in outputs] == ["You", " said:", " hello", " there", ""]
    last = outputs[-1]
    assert last.finish_reason is FinishReason.STOP
    assert last.usage is not None and last.usage.source is UsageSource.UPSTREAM
    assert last.usage.completion_tokens == 4


async def test_start_survives_a_down_upstream_and_recovers(up1: ScriptedUpstream) -> None:
    up1.configure(models_status=503)
    engine = await make_engine(
        ("a", MODEL), configs={"a": config("a", up1.base_url, health_interval=0.2)}
    )
    try:
        assert engine.max_context == 32768  # not learned
        with pytest.raises(EngineUnavailable):
            await engine.submit(requests(engine, chat(engine))).ready()
        up1.configure(models_status=200)
        for _ in range(40):
            if engine.stats()["upstream.a.healthy"]:
                break
            await asyncio.sleep(0.05)
        assert texts(await generate(engine, chat(engine))) == "You said: hello there"
        assert engine.max_context == 4096  # learned by the health check
    finally:
        await engine.stop()


async def test_abort_before_the_first_event(one: UpstreamEngine, up1: ScriptedUpstream) -> None:
    up1.script({"ping_only": True})
    stream = one.submit(requests(one, chat(one)))
    await asyncio.sleep(0.2)
    stream.abort()
    with pytest.raises(EngineUnavailable, match="cancelled"):
        await asyncio.wait_for(stream.ready(), 1)
    await stream.drain(within=1)
    await asyncio.sleep(0.2)
    assert up1.requests()[0]["client_closed_at"] is not None
    assert one.stats()["in_flight"] == 0 and one.stats()["upstream.a.in_flight"] == 0


async def test_stop_ends_running_streams(up1: ScriptedUpstream) -> None:
    engine = await make_engine(("a", MODEL), configs={"a": config("a", up1.base_url)})
    up1.script({"pings_after": 1})
    stream = engine.submit(requests(engine, chat(engine)))
    await stream.ready()
    assert (await stream.__anext__()).text == "You"
    await engine.stop()
    outputs = await stream.drain(within=1)
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert outputs[-1].usage is not None and outputs[-1].usage.completion_tokens == 1


async def test_engines_share_an_upstream_and_the_whole_list_can_be_served(
    up1: ScriptedUpstream,
) -> None:
    from spigot.upstream import discover_routes, list_models

    listed = await list_models(up1.base_url)
    assert [(m.id, m.max_context) for m in listed] == [(MODEL, 4096), ("other", None)]
    cfg = config("a", up1.base_url, max_in_flight=1)
    routes = await discover_routes(cfg)
    assert [(r.name, r.targets, r.max_context) for r in routes] == [
        (MODEL, (Target("a", MODEL),), 4096),
        ("other", (Target("a", "other"),), None),
    ]
    shared = {"a": Upstream(cfg)}
    engines = [UpstreamEngine(route, shared) for route in routes]
    await asyncio.gather(*(e.start() for e in engines))
    try:
        assert [e.max_context for e in engines] == [4096, 32768]
        up1.script({"pings_after": 1})
        stream = engines[0].submit(requests(engines[0], chat(engines[0])))
        await stream.ready()
        with pytest.raises(QueueFull):  # one upstream, one slot, two models
            engines[1].submit(requests(engines[1], chat(engines[1])))
        stream.abort()
        await stream.drain()
        await engines[0].stop()
        outputs = await generate(engines[1], chat(engines[1]))  # still open for the other
        assert texts(outputs) == "You said: hello there"
        assert up1.requests()[-1]["body"]["model"] == "other"
    finally:
        for engine in engines:
            await engine.stop()
