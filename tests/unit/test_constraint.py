"""Constrained decoding (``spigot.engine.llamacpp.constraint``) and the engine around it.

The mask kernel against a naive one; the grammar cache; lazy triggers split
over tokens; the engine on the fake model: masks per sequence, endings, and a
failing grammar that ends its own sequence only; and what an upstream is sent. The real model's
version is ``tests/e2e/test_constrained_engine.py``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable

import numpy as np
import numpy.typing as npt
import pytest
from llguidance import LLMatcher

from spigot.engine.llamacpp import constraint as constraint_module
from spigot.engine.llamacpp.constraint import (
    Grammars,
    SequenceGrammar,
    apply_bitmask,
    mask_words,
)
from spigot.engine.llamacpp.engine import EngineOptions, LlamaCppEngine
from spigot.engine.protocol import PromptError, Unsupported
from spigot.engine.types import (
    Constraint,
    FinishReason,
    GenOutput,
    GenRequest,
    Prompt,
    SamplingParams,
)
from spigot.upstream import ModelRoute, Target, Upstream, UpstreamConfig, UpstreamEngine
from spigot.upstream.payload import body_of
from tests.unit.fake_model import EOS, FakeModel, fake_grammar_tokenizer, token_of

FAKE_VOCAB = 30


def regex(pattern: str) -> str:
    return LLMatcher.grammar_from_regex(pattern)


def naive_apply(logits: npt.NDArray[np.float32], words: npt.NDArray[np.int32]) -> None:
    for token in range(logits.shape[0]):
        if not (int(words[token // 32]) >> (token % 32)) & 1:
            logits[token] = -np.inf


def random_mask(rng: np.random.Generator, n_vocab: int, kind: str) -> npt.NDArray[np.int32]:
    n_words = mask_words(n_vocab)
    if kind == "random":
        return rng.integers(-(2**31), 2**31, n_words, dtype=np.int64).astype(np.int32)
    if kind == "sparse":  # a few tokens, as for JSON structure
        words = np.zeros(n_words, dtype=np.int32)
        for token in rng.integers(0, n_words * 32, rng.integers(0, 8)):
            words[token // 32] |= (
                np.int32(1 << (token % 32)) if token % 32 < 31 else np.int32(-(2**31))
            )
        return words
    if kind == "dense":  # nearly all, as inside a JSON string
        words = np.full(n_words, -1, dtype=np.int32)
        for token in rng.integers(0, n_words * 32, rng.integers(0, 40)):
            bit = np.int32(1 << (token % 32)) if token % 32 < 31 else np.int32(-(2**31))
            words[token // 32] &= ~bit
        return words
    return np.full(n_words, 0 if kind == "none" else -1, dtype=np.int32)


@pytest.mark.parametrize("n_vocab", [1, 31, 32, 33, 100, 1000, 49152, 50257])
@pytest.mark.parametrize("kind", ["random", "sparse", "dense", "none", "all"])
def test_fast_kernel_equals_the_naive_one(n_vocab: int, kind: str) -> None:
    rng = np.random.default_rng(n_vocab * 7 + len(kind))
    for _ in range(5 if n_vocab > 10_000 else 20):
        # Padding bits past the vocabulary may be anything: they must not matter.
        words = random_mask(rng, n_vocab, kind)
        logits = rng.standard_normal(n_vocab).astype(np.float32)
        expected = logits.copy()
        naive_apply(expected, words)
        allowed = apply_bitmask(logits, words)
        np.testing.assert_array_equal(logits, expected)
        assert allowed == int(np.isfinite(expected).sum())


def test_the_kernel_writes_into_the_row_it_is_given() -> None:
    # The engine passes a view onto llama.cpp's logits: no copy may be masked instead.
    buffer = np.zeros(2 * 64, dtype=np.float32)
    row = buffer[64:]
    words = np.array([0b101, 0], dtype=np.int32)
    assert apply_bitmask(row, words) == 2
    assert np.isfinite(buffer[64:]).nonzero()[0].tolist() == [0, 2]
    assert np.isfinite(buffer[:64]).all()


# -- the grammar cache ---------------------------------------------------------------


def grammars(capacity: int = 32) -> tuple[Grammars, list[int]]:
    built: list[int] = []

    def build() -> object:
        built.append(1)
        return fake_grammar_tokenizer()

    return Grammars(build, FAKE_VOCAB, capacity), built  # type: ignore[arg-type]


def test_the_tokenizer_is_built_once_whatever_the_threads() -> None:
    cache, built = grammars()
    threads = [
        threading.Thread(target=cache.prepare, args=(Constraint(regex("[a-z]+")),))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [1]
    assert len(cache) == 1


def test_grammars_are_kept_least_recently_used_first_out() -> None:
    cache, _ = grammars(capacity=2)
    a, b, c = regex("a+"), regex("b+"), regex("c+")
    cache.prepare(Constraint(a))
    cache.prepare(Constraint(b))
    cache.prepare(Constraint(a))  # a is the most recent now
    assert cache.compiles == 2
    cache.prepare(Constraint(c))  # evicts b
    assert cache.compiles == 3
    cache.matcher(a)
    assert cache.compiles == 3
    # An evicted grammar is compiled again when a sequence needs it.
    matcher = cache.matcher(b)
    assert cache.compiles == 4
    assert matcher.consume_token(token_of("b"))


def test_a_prepared_constraint_needs_no_compile_however_full_the_cache() -> None:
    cache, _ = grammars(capacity=1)
    prepared = cache.prepare(Constraint(regex("a+")))
    cache.prepare(Constraint(regex("b+")))  # evicts a+ from the cache
    compiles = cache.compiles
    sequence = SequenceGrammar(cache, prepared)
    # The engine thread started from the prepared matcher: nothing was compiled.
    assert cache.compiles == compiles
    assert sequence.matcher is not None and sequence.matcher.consume_token(token_of("a"))
    # A constraint nobody prepared is still compiled where it is needed.
    SequenceGrammar(cache, Constraint(regex("a+")))
    assert cache.compiles == compiles + 1


def test_each_sequence_gets_its_own_matcher() -> None:
    cache, _ = grammars()
    grammar = regex("ab")
    first, second = cache.matcher(grammar), cache.matcher(grammar)
    assert first.consume_token(token_of("a"))
    # The cached one and the second copy are still at the start.
    assert not second.consume_token(token_of("b"))
    assert cache.matcher(grammar).consume_token(token_of("a"))


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (LLMatcher.grammar_from_lark("start: foo"), 'unknown name: "foo"'),
        ("garbage{", "Expected token"),
        (LLMatcher.grammar_from_regex("a("), "regex"),
    ],
)
def test_a_grammar_llguidance_refuses_is_a_prompt_error(grammar: str, message: str) -> None:
    cache, _ = grammars()
    with pytest.raises(PromptError, match="grammar") as refused:
        cache.prepare(Constraint(grammar))
    assert message.lower() in str(refused.value).lower()
    assert len(cache) == 0


def test_an_empty_trigger_is_refused() -> None:
    cache, _ = grammars()
    with pytest.raises(PromptError, match="trigger"):
        cache.prepare(Constraint(regex("a"), trigger=""))


# -- lazy grammars -------------------------------------------------------------------


def feed(grammar: SequenceGrammar, pieces: list[str]) -> int | None:
    """Feed pieces as tokens (before the trigger only their bytes count; after it,
    letter by letter); the index of the piece after which the grammar masks."""
    started = None
    for i, piece in enumerate(pieces):
        if grammar.masking:
            for ch in piece:
                grammar.accept(token_of(ch), ch.encode())
            continue
        grammar.accept(token_of(piece[0]) if piece else EOS, piece.encode())
        if grammar.masking:
            started = i
    return started


def splits(text: str) -> list[list[str]]:
    """``text`` cut into pieces at every pair of points."""
    out = []
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            out.append([p for p in (text[:i], text[i:j], text[j:]) if p])
    return out


@pytest.mark.parametrize("pieces", splits("say go ab"))
def test_a_trigger_is_found_across_token_boundaries(pieces: list[str]) -> None:
    cache, _ = grammars()
    grammar = SequenceGrammar(cache, Constraint(regex("go [ab]+ x"), trigger="go "))
    assert not grammar.masking
    started = feed(grammar, pieces)
    # It started at the piece that completed the trigger, having consumed
    # everything from the trigger's start on.
    ends = np.cumsum([len(p) for p in pieces])
    assert started == int(np.searchsorted(ends, len("say go ")))
    assert grammar.error is None
    # Where the text leaves the grammar: "a", "b" or " " may follow, nothing else.
    scratch = np.zeros(FAKE_VOCAB, dtype=np.float32)
    assert grammar.mask(scratch)
    allowed = {int(t) for t in np.flatnonzero(np.isfinite(scratch))}
    assert allowed == {token_of("a"), token_of("b"), token_of(" ")}


def test_no_trigger_no_mask() -> None:
    cache, _ = grammars()
    grammar = SequenceGrammar(cache, Constraint(regex("go x"), trigger="go "))
    assert feed(grammar, ["g", "o", "g", "o", "x", " go", "o "]) is None
    assert grammar.matcher is None and grammar.error is None


def test_text_after_the_trigger_that_the_grammar_refuses_is_an_error() -> None:
    cache, _ = grammars()
    grammar = SequenceGrammar(cache, Constraint(regex("go a"), trigger="go"))
    feed(grammar, ["let", "s", " go b"])
    assert grammar.error is not None
    assert "constrained decoding failed" in grammar.error
    assert not grammar.masking


# -- the engine on the fake model ------------------------------------------------------


@pytest.fixture
async def engine_factory() -> AsyncIterator[Callable[..., object]]:
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
    engine: LlamaCppEngine,
    grammar: str | None = None,
    trigger: str | None = None,
    max_tokens: int = 32,
    choice: int = 0,
    **params: object,
) -> GenRequest:
    constraint = None if grammar is None else Constraint(grammar, trigger)
    if constraint is not None:
        engine.prepare_constraint(constraint)
    return GenRequest(
        engine.new_request_id(),
        Prompt.of_tokens((token_of("h"), token_of("i"))),
        SamplingParams(max_tokens=max_tokens, constraint=constraint, **params),  # type: ignore[arg-type]
        choice,
    )


async def collect(engine: LlamaCppEngine, *requests: GenRequest) -> list[GenOutput]:
    return [o async for o in engine.submit(list(requests))]


def text_of(outputs: list[GenOutput], choice: int = 0) -> str:
    return "".join(o.text for o in outputs if o.choice_index == choice)


def last_of(outputs: list[GenOutput], choice: int = 0) -> GenOutput:
    return [o for o in outputs if o.choice_index == choice][-1]


async def test_a_constrained_sequence_ends_when_its_grammar_is_complete(engine_factory) -> None:
    model = FakeModel(obey_masks=True)
    engine = await engine_factory(model)
    # The script says "hello world"; the grammar bends it ("w", "o", "r", "l"
    # are refused: the first allowed token, "a", instead) and ends it.
    outputs = await collect(engine, request(engine, regex("hel+(o|p) [a-c]+d")))
    assert text_of(outputs) == "hello aaaad"
    last = last_of(outputs)
    assert last.finish_reason is FinishReason.STOP
    assert last.usage is not None and last.usage.completion_tokens == 11
    assert engine.model.tokenizers_built == 1  # type: ignore[attr-defined]


async def test_masks_stay_in_their_own_rows(engine_factory) -> None:
    model = FakeModel(obey_masks=True)
    engine = await engine_factory(model)
    outputs = await collect(
        engine,
        request(engine, regex("[a-c]+ x"), max_tokens=4, choice=0),
        request(engine, None, choice=1),
        request(engine, regex("hello world"), choice=2),
    )
    assert text_of(outputs, 0) == "aaaa"
    assert last_of(outputs, 0).finish_reason is FinishReason.LENGTH
    assert text_of(outputs, 1) == "hello world"  # free, beside two constrained neighbours
    assert text_of(outputs, 2) == "hello world"
    assert last_of(outputs, 2).finish_reason is FinishReason.STOP
    masked = [row for row in model.sampled_rows if not np.isfinite(row).all()]
    free = [row for row in model.sampled_rows if np.isfinite(row).all()]
    assert len(masked) == 4 + 11  # every constrained step masked
    assert len(free) == 12  # the free one's 11 letters and its end token: never masked


async def test_a_matcher_error_ends_that_sequence_only(engine_factory) -> None:
    # The fake sampler ignores masks: its scripted "h" is a token the grammar refuses.
    model = FakeModel()
    engine = await engine_factory(model)
    outputs = await collect(
        engine, request(engine, regex("abc"), choice=0), request(engine, None, choice=1)
    )
    failed = last_of(outputs, 0)
    assert failed.finish_reason is FinishReason.ERROR
    assert failed.error is not None and "constrained decoding failed" in failed.error
    assert failed.usage is not None and failed.usage.completion_tokens == 1
    assert text_of(outputs, 0) == ""
    assert text_of(outputs, 1) == "hello world"
    assert last_of(outputs, 1).finish_reason is FinishReason.STOP
    # And the engine goes on serving, constrained requests too.
    model.obey_masks = True
    outputs = await collect(engine, request(engine, regex("hello")))
    assert (text_of(outputs), last_of(outputs).finish_reason) == ("hello", FinishReason.STOP)


async def test_a_mask_that_allows_nothing_ends_the_sequence_unsampled(
    engine_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nothing_allowed(logits: npt.NDArray[np.float32], words: npt.NDArray[np.int32]) -> int:
        logits.fill(-np.inf)
        return 0

    monkeypatch.setattr(constraint_module, "apply_bitmask", nothing_allowed)
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(
        engine, request(engine, regex("hello"), choice=0), request(engine, None, choice=1)
    )
    failed = last_of(outputs, 0)
    assert failed.finish_reason is FinishReason.ERROR
    assert failed.error is not None and "allows no token" in failed.error
    assert failed.usage is not None and failed.usage.completion_tokens == 0
    assert text_of(outputs, 1) == "hello world"


async def test_a_grammar_not_prepared_fails_on_the_engine_thread(engine_factory) -> None:
    engine = await engine_factory(FakeModel())
    bad = Constraint(LLMatcher.grammar_from_lark("start: foo"))
    with pytest.raises(PromptError):
        engine.prepare_constraint(bad)
    # Submitted all the same: that sequence fails, not the engine.
    unprepared = GenRequest(
        engine.new_request_id(),
        Prompt.of_tokens((token_of("h"),)),
        SamplingParams(max_tokens=8, constraint=bad),
    )
    outputs = await collect(engine, unprepared, request(engine, None, choice=1))
    assert last_of(outputs, 0).finish_reason is FinishReason.ERROR
    assert "unknown name" in (last_of(outputs, 0).error or "")
    assert text_of(outputs, 1) == "hello world"


async def test_max_tokens_cuts_a_constrained_sequence(engine_factory) -> None:
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(engine, request(engine, regex("hello world"), max_tokens=3))
    assert (text_of(outputs), last_of(outputs).finish_reason) == ("hel", FinishReason.LENGTH)


@pytest.mark.parametrize("held", [{"ignore_eos": True}, {"min_tokens": 20}])
async def test_the_grammar_decides_the_end_despite_held_back_eos(engine_factory, held) -> None:
    # After "hello world" the grammar may end or go on: the script's end token
    # is allowed, and ends the sequence although end-of-generation was held back.
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(engine, request(engine, regex("hello( world)*"), **held))
    assert text_of(outputs) == "hello world"
    assert last_of(outputs).finish_reason is FinishReason.STOP


async def test_a_lazy_grammar_masks_from_its_trigger_on(engine_factory) -> None:
    model = FakeModel(obey_masks=True)
    engine = await engine_factory(model)
    # Free until "o w" (split over three tokens), then "o w" must go on as "o wa+d".
    outputs = await collect(engine, request(engine, regex("o wa+d"), trigger="o w"))
    assert text_of(outputs) == "hello waaad"
    assert last_of(outputs).finish_reason is FinishReason.STOP
    free, masked = model.sampled_rows[:7], model.sampled_rows[7:]
    assert all(np.isfinite(row).all() for row in free)
    assert masked and not any(np.isfinite(row).all() for row in masked)


async def test_once_triggered_the_grammar_decides_the_end(engine_factory) -> None:
    # End of generation is held back until the trigger, then the grammar allows
    # it after "world": the script's end token ends the sequence.
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(
        engine, request(engine, regex("o world( x)*"), trigger="o w", ignore_eos=True)
    )
    assert text_of(outputs) == "hello world"
    assert last_of(outputs).finish_reason is FinishReason.STOP


async def test_a_lazy_grammar_that_refuses_its_trigger_ends_that_sequence(engine_factory) -> None:
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(
        engine,
        request(engine, regex("lx"), trigger="lo", choice=0),
        request(engine, None, choice=1),
    )
    assert last_of(outputs, 0).finish_reason is FinishReason.ERROR
    assert text_of(outputs, 1) == "hello world"


async def test_stop_strings_apply_to_constrained_output(engine_factory) -> None:
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(engine, request(engine, regex("hello world"), stop=("o w",)))
    assert (text_of(outputs), last_of(outputs).finish_reason) == ("hell", FinishReason.STOP)


async def test_logprobs_list_only_tokens_the_grammar_allows(engine_factory) -> None:
    engine = await engine_factory(FakeModel(obey_masks=True))
    outputs = await collect(engine, request(engine, regex("he(l|y)lo"), logprobs=5))
    logprobs = [lp for o in outputs for lp in o.logprobs]
    assert [lp.token for lp in logprobs] == list("hello")
    # One token allowed at each step but the third, where two are (equal logits).
    assert [len(lp.top) for lp in logprobs] == [1, 1, 2, 1, 1]
    assert all(np.isfinite(lp.logprob) for lp in logprobs)


# -- an engine elsewhere -------------------------------------------------------------


def test_an_upstream_is_sent_the_openai_fields_not_the_grammar() -> None:
    upstream = Upstream(UpstreamConfig(name="u", base_url="http://127.0.0.1:9/v1"))
    engine = UpstreamEngine(ModelRoute("served", (Target("u", "m"),)), {"u": upstream})
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    constraint = Constraint(regex("a+"), openai={"response_format": response_format})
    engine.prepare_constraint(constraint)
    with pytest.raises(Unsupported):
        engine.prepare_constraint(Constraint(regex("a+")))  # a grammar alone means nothing there
    request = GenRequest(
        "r",
        Prompt(token_count=1, messages=({"role": "user", "content": "hi"},), count_exact=False),
        SamplingParams(max_tokens=8, constraint=constraint),
    )
    body = body_of(request, "m")
    assert body["response_format"] == response_format
    assert "grammar" not in body and body["messages"] == [{"role": "user", "content": "hi"}]
    free = GenRequest("r", request.prompt, SamplingParams(max_tokens=8))
    assert "response_format" not in body_of(free, "m")
