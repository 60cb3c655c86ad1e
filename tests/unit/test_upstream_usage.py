"""Usage when the upstream reports none: /tokenize, tokenizer.json, content events."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spigot.engine.types import (
    FinishReason,
    GenOutput,
    GenRequest,
    Prompt,
    SamplingParams,
    UsageSource,
)
from spigot.upstream import ModelRoute, Target, Upstream, UpstreamConfig, UpstreamEngine
from spigot.upstream.usage import TokenizeKind
from tests.scripted_upstream import ScriptedUpstream, start_scripted_upstream
from tests.unit.test_upstream_routing import save_word_tokenizer

MODEL = "m"


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedUpstream]:
    srv = start_scripted_upstream(f"{MODEL}:4096")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def up(server: ScriptedUpstream) -> ScriptedUpstream:
    server.reset()
    return server


async def engine_for(up: ScriptedUpstream, tokenizer: Path | None = None) -> UpstreamEngine:
    config = UpstreamConfig(
        "a", up.base_url, connect_timeout=1, first_event_timeout=1, idle_timeout=1,
        health_interval=60,
    )  # fmt: skip
    engine = UpstreamEngine(
        ModelRoute("served", (Target("a", MODEL),), tokenizer=tokenizer), {"a": Upstream(config)}
    )
    await engine.start()
    return engine


async def generate(engine: UpstreamEngine, prompt: Prompt) -> list[GenOutput]:
    request = GenRequest(engine.new_request_id(), prompt, SamplingParams(max_tokens=64))
    stream = engine.submit([request])
    await stream.ready()
    return [o async for o in stream]


def chat(engine: UpstreamEngine) -> Prompt:
    return engine.prepare_chat([{"role": "user", "content": "hello world"}])


async def test_counted_by_content_events_when_nothing_else_is_known(up: ScriptedUpstream) -> None:
    engine = await engine_for(up)
    try:
        up.script({"usage": "none", "words": ["Hello", " big", " world"]})
        prompt = chat(engine)
        outputs = await generate(engine, prompt)
        usage = outputs[-1].usage
        assert usage is not None and usage.source is UsageSource.COUNTED
        assert usage.completion_tokens == 3 and usage.prompt_tokens == prompt.token_count
        assert engine._router.upstreams["a"].tokenize.kind is TokenizeKind.NONE
        # Found out once: the next stream does not ask again.
        up.script({"usage": "none"})
        await generate(engine, chat(engine))
        assert len(up.tokenize_calls()) == 1
    finally:
        await engine.stop()


async def test_counted_with_a_tokenizer_json(up: ScriptedUpstream, tmp_path: Path) -> None:
    path = save_word_tokenizer(tmp_path / "tokenizer.json", ["Hello", "world", "hello"])
    engine = await engine_for(up, tokenizer=path)
    try:
        up.script({"usage": "none", "words": ["Hello,", " world"]})
        prompt = chat(engine)
        assert prompt.token_count == 2 + 4 + 3
        outputs = await generate(engine, prompt)
        usage = outputs[-1].usage
        assert usage is not None and usage.source is UsageSource.COUNTED
        assert usage.completion_tokens == 3  # Hello , world: not the 2 events
        assert usage.prompt_tokens == prompt.token_count
    finally:
        await engine.stop()


@pytest.mark.parametrize("kind", ["vllm", "llama"])
async def test_counted_with_the_upstreams_tokenize(up: ScriptedUpstream, kind: str) -> None:
    up.configure(tokenize=kind)
    engine = await engine_for(up)
    try:
        up.script({"usage": "none", "words": ["one", " two", " three", " four"]})
        outputs = await generate(engine, chat(engine))
        usage = outputs[-1].usage
        assert usage is not None and usage.source is UsageSource.COUNTED
        assert usage.completion_tokens == 4
        # vLLM counts the conversation with its template (the scripted one adds 10);
        # llama-server only text: contents + 4 per message + 3.
        assert usage.prompt_tokens == (2 + 10 if kind == "vllm" else 2 + 4 + 3)
        assert engine._router.upstreams["a"].tokenize.kind.value == kind
    finally:
        await engine.stop()


async def test_partial_usage_is_counted_too(up: ScriptedUpstream) -> None:
    up.configure(tokenize="vllm")
    engine = await engine_for(up)
    try:
        up.script({"usage": "none", "words": ["a b", " c", " d"], "die_after": 2})
        outputs = await generate(engine, engine.prepare_text("x y z"))
        last = outputs[-1]
        assert last.finish_reason is FinishReason.ERROR
        assert last.usage is not None and last.usage.source is UsageSource.PARTIAL
        assert last.usage.completion_tokens == 3  # "a b c" by /tokenize, not 2 events
        assert last.usage.prompt_tokens == 3 + 1
    finally:
        await engine.stop()


async def test_partial_usage_keeps_upstream_counts_seen_so_far(up: ScriptedUpstream) -> None:
    engine = await engine_for(up)
    try:
        script: dict[str, Any] = {"usage": "every", "prompt_tokens": 11, "die_after": 3}
        up.script(script)
        outputs = await generate(engine, chat(engine))
        usage = outputs[-1].usage
        assert usage is not None and usage.source is UsageSource.PARTIAL
        assert (usage.prompt_tokens, usage.completion_tokens) == (11, 3)
    finally:
        await engine.stop()
