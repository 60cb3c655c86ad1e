"""Breaker, routing, the upstream request and prompt estimates (no server)."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest

from spigot.engine.protocol import PromptError, QueueFull, Unsupported
from spigot.engine.types import GenRequest, Prompt, SamplingParams
from spigot.upstream import ModelRoute, Target, Upstream, UpstreamConfig, UpstreamEngine
from spigot.upstream.failures import retry_after_of
from spigot.upstream.payload import body_of, headers_of, path_of
from spigot.upstream.routing import Router
from spigot.upstream.upstream import BreakerState, CircuitBreaker, parse_models


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_failures_in_a_row() -> None:
    clock = Clock()
    breaker = CircuitBreaker(5, 30.0, clock)
    for _ in range(4):
        breaker.failure()
    breaker.success()  # resets the run
    for _ in range(4):
        breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allows()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    assert breaker.reopens_in() == 30.0


def test_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock)
    breaker.failure()
    clock.now += 30
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows()
    assert breaker.take()  # the probe
    assert not breaker.allows() and not breaker.take()
    breaker.failure()  # the probe failed: open again, for the whole time
    assert breaker.state is BreakerState.OPEN
    clock.now += 30
    assert breaker.take()
    breaker.release_probe()  # ended without telling (a 400): another may probe
    assert breaker.take()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def upstreams(
    *names: str, max_in_flight: int = 4, clock: Clock | None = None
) -> dict[str, Upstream]:
    return {
        n: Upstream(
            UpstreamConfig(n, f"http://{n}.invalid/v1", max_in_flight=max_in_flight),
            clock=clock or Clock(),
        )
        for n in names
    }


def test_router_prefers_the_less_loaded_and_the_first_listed_on_ties() -> None:
    ups = upstreams("a", "b")
    router = Router([Target("a", "m"), Target("b", "m")], ups, random.Random(1))
    for _ in range(10):
        assert router.pick(router.eligible()) == Target("a", "m")
    ups["a"].in_flight = 1
    assert router.pick(router.eligible()) == Target("b", "m")


def test_router_skips_open_breakers_unhealthy_and_backed_off_upstreams() -> None:
    clock = Clock()
    ups = upstreams("a", "b", "c", clock=clock)
    router = Router([Target(n, "m") for n in "abc"], ups)
    for _ in range(5):
        ups["a"].breaker.failure()
    ups["b"].healthy = False
    assert router.eligible() == [Target("c", "m")]
    ups["c"].back_off(2.0)
    assert router.eligible() == []
    assert router.place(1) is None
    assert router.retry_after() == 2.0
    clock.now += 2.0
    assert router.eligible() == [Target("c", "m")]


def test_retries_prefer_untried_targets() -> None:
    ups = upstreams("a", "b", "c")
    router = Router([Target(n, "m") for n in "abc"], ups, random.Random(0))
    got = router.acquire(avoid=Target("b", "m"), tried=[Target("a", "m"), Target("b", "m")])
    assert got is not None and got[0] == Target("c", "m")


def test_place_is_all_or_nothing() -> None:
    ups = upstreams("a", "b", max_in_flight=2)
    router = Router([Target("a", "m"), Target("b", "m")], ups)
    placed = router.place(3)
    assert placed is not None and len(placed) == 3
    assert ups["a"].in_flight + ups["b"].in_flight == 3
    with pytest.raises(QueueFull):
        router.place(2)
    assert ups["a"].in_flight + ups["b"].in_flight == 3
    for _, slot in placed:
        slot.upstream.release(slot)
        slot.upstream.release(slot)  # twice is once
    assert ups["a"].in_flight == ups["b"].in_flight == 0


def test_half_open_upstream_takes_one_sequence() -> None:
    clock = Clock()
    ups = upstreams("a", clock=clock)
    ups["a"].breaker = CircuitBreaker(1, 30.0, clock)
    ups["a"].breaker.failure()
    clock.now += 30
    router = Router([Target("a", "m")], ups)
    with pytest.raises(QueueFull):
        router.place(2)
    placed = router.place(1)
    assert placed is not None and placed[0][1].probe
    assert router.place(1) is None  # the probe is out: down until it tells
    ups["a"].release(placed[0][1])
    assert router.place(1) is not None


def test_unknown_upstreams_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown upstreams: x"):
        Router([Target("x", "m")], upstreams("a"))


def request(prompt: Prompt, **params: object) -> GenRequest:
    return GenRequest("req-1", prompt, SamplingParams(**{"max_tokens": 16, **params}))  # type: ignore[arg-type]


def test_chat_body() -> None:
    messages = ({"role": "user", "content": "hi"},)
    req = request(
        Prompt(3, messages=messages, count_exact=False),
        temperature=0.0,
        seed=7,
        logit_bias=((5, -100.0),),
        stop=("\n",),
        logprobs=2,
        max_tokens_given=False,
        presence_penalty=0.5,
    )
    assert path_of(req) == "/chat/completions"
    assert body_of(req, "remote") == {
        "model": "remote",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 7,
        "presence_penalty": 0.5,
        "logit_bias": {"5": -100.0},
        "stop": ["\n"],
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert headers_of(req)["x-request-id"] == "req-1"


def test_completions_bodies() -> None:
    text = request(
        Prompt(3, text="abc", count_exact=False), logprobs=3, ignore_eos=True, min_tokens=2
    )
    body = body_of(text, "r")
    assert path_of(text) == "/completions"
    assert body["prompt"] == "abc" and body["max_tokens"] == 16 and body["logprobs"] == 3
    assert body["ignore_eos"] is True and body["min_tokens"] == 2
    tokens = request(Prompt.of_tokens([1, 2, 3]))
    assert body_of(tokens, "r")["prompt"] == [1, 2, 3]
    assert "ignore_eos" not in body_of(tokens, "r")


def test_retry_after_forms() -> None:
    assert retry_after_of(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert retry_after_of(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert retry_after_of(httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after_of(httpx.Headers({})) is None
    assert retry_after_of(httpx.Headers({"Retry-After": "soon"})) is None


def test_models_listing() -> None:
    body = {
        "data": [
            {"id": "a", "max_model_len": 4096},
            {"id": "b"},
            {"id": "c", "context_length": 128000},
            {"nope": 1},
        ]
    }
    assert [(m.id, m.max_context) for m in parse_models(body)] == [
        ("a", 4096),
        ("b", None),
        ("c", 128000),
    ]


def engine(tokenizer: Path | None = None) -> UpstreamEngine:
    return UpstreamEngine(
        ModelRoute("served", (Target("a", "m"),), tokenizer=tokenizer), upstreams("a")
    )


def test_prompt_estimates_without_a_tokenizer() -> None:
    eng = engine()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "héllo"}], "name": "bob"},
    ]
    prompt = eng.prepare_chat(messages)
    assert not prompt.count_exact and prompt.messages == tuple(messages)
    # UTF-8 bytes of the contents (9 + 6 + 3) + 4 per message + 3
    assert prompt.token_count == 18 + 8 + 3
    text = eng.prepare_text("abc")
    assert text.text == "abc" and text.token_count == 4 and not text.count_exact
    assert eng.prepare_token_ids([5, 6]).token_ids == (5, 6)
    with pytest.raises(PromptError):
        eng.prepare_token_ids([1, -1])
    with pytest.raises(Unsupported):
        eng.detokenize([1])
    assert not eng.tokenizes_locally and eng.vocab_size is None and eng.capacity == 128
    assert eng.max_context == 32768


def save_word_tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_prompt_estimates_with_a_tokenizer(tmp_path: Path) -> None:
    eng = engine(save_word_tokenizer(tmp_path / "tokenizer.json", ["hello", "world"]))
    prompt = eng.prepare_chat([{"role": "user", "content": "hello world, hello"}])
    assert prompt.token_count == 4 + 4 + 3  # hello world , hello
    assert eng.prepare_text("hello world").token_count == 3
