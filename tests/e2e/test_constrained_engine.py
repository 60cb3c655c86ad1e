"""Constrained decoding on the real model, in-process: the engine without HTTP.

Requests go straight to ``LlamaCppEngine`` (as the API would submit them, after
``prepare_constraint``): sampled JSON always matches its schema, a batch mixes
constrained and free sequences without masks leaking between them, lazy
grammars start at their trigger, ``max_tokens`` cuts, and a refused grammar
or a failing matcher costs one request, never the engine.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema_rs
import pytest
from llguidance import LLMatcher

from spigot.engine.llamacpp import EngineOptions, LlamaCppEngine, set_native_logging
from spigot.engine.protocol import PromptError
from spigot.engine.types import Constraint, FinishReason, GenOutput, GenRequest, SamplingParams
from spigot.models import embedded_model_path

pytestmark = pytest.mark.e2e

# What the API compiles a response_format's schema with (spigot/api/structured.py).
JSON_OPTIONS: Any = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"enum": ["red", "green", "blue"]},
            "maxItems": 3,
        },
        "contact": {
            "anyOf": [
                {"type": "null"},
                {"type": "string", "maxLength": 30},
                {
                    "type": "object",
                    "properties": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
                    "required": ["phone"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "required": ["name", "age", "role", "address", "tags", "contact"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 7},
            "maxItems": 7,
        },
        "hourly": {"type": "boolean"},
    },
    "required": ["city", "unit", "days", "hourly"],
    "additionalProperties": False,
}

SCHEMA_PROMPT = [
    {"role": "system", "content": "You answer with one JSON object."},
    {"role": "user", "content": "Describe a person: name, age, role, address, tags, contact."},
]
WEATHER_PROMPT = [{"role": "user", "content": "Which forecast do you want? Answer in JSON."}]
FREE_PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "Give me three tips for sleeping well.",
]


def schema_constraint(schema: dict[str, Any]) -> Constraint:
    return Constraint(
        LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    )


@pytest.fixture
async def engine() -> AsyncIterator[LlamaCppEngine]:
    set_native_logging(False)
    # Without the prefix cache: a request's text is compared with another run's.
    engine = LlamaCppEngine.load(
        "smollm2",
        embedded_model_path(),
        EngineOptions(n_ctx=8192, parallel=8, prefix_cache=False),
    )
    await engine.start()
    try:
        yield engine
    finally:
        engine.close()


def chat_request(
    engine: LlamaCppEngine,
    messages: list[dict[str, str]],
    constraint: Constraint | None = None,
    **params: Any,
) -> GenRequest:
    if constraint is not None:
        # In the prep pool, as the API does.
        engine.prepare_constraint(constraint)
    params.setdefault("max_tokens", 300)
    return GenRequest(
        engine.new_request_id(),
        engine.prepare_chat(messages),
        SamplingParams(constraint=constraint, **params),
    )


async def collect(engine: LlamaCppEngine, request: GenRequest) -> list[GenOutput]:
    return [o async for o in engine.submit([request])]


async def run(engine: LlamaCppEngine, request: GenRequest) -> tuple[str, GenOutput]:
    """A request's whole text and its last output."""
    outputs = await collect(engine, request)
    return "".join(o.text for o in outputs), outputs[-1]


async def run_all(
    engine: LlamaCppEngine, requests: list[GenRequest]
) -> list[tuple[str, GenOutput]]:
    return list(await asyncio.gather(*(run(engine, r) for r in requests)))


# About 20 s on 2 idle cores; over 5 minutes while other tests load them.
@pytest.mark.timeout(900)
async def test_fifty_seeds_of_a_nested_schema_all_validate(engine: LlamaCppEngine) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    constraint = schema_constraint(PERSON)
    # All at once: eight decode, the rest queue and take each slot that frees.
    requests = [
        chat_request(engine, SCHEMA_PROMPT, constraint, temperature=1.0, seed=seed)
        for seed in range(50)
    ]
    results = await run_all(engine, requests)
    assert len(results) == 50
    for text, last in results:
        assert last.finish_reason is FinishReason.STOP, (text, last)
        document = json.loads(text)
        assert validator.is_valid(document), (text, list(validator.iter_errors(document)))
    # Sampling at temperature 1: the seeds make different documents.
    assert len({text for text, _ in results}) > 40


async def test_a_mixed_batch_keeps_every_mask_to_its_own_sequence(engine: LlamaCppEngine) -> None:
    free = [
        chat_request(
            engine, [{"role": "user", "content": p}], temperature=0, max_tokens=60, logprobs=5
        )
        for p in FREE_PROMPTS
    ]
    constrained = [
        chat_request(engine, SCHEMA_PROMPT, schema_constraint(PERSON), temperature=1.0, seed=1),
        chat_request(engine, WEATHER_PROMPT, schema_constraint(WEATHER), temperature=1.0, seed=2),
        chat_request(engine, SCHEMA_PROMPT, schema_constraint(PERSON), temperature=0),
        chat_request(engine, WEATHER_PROMPT, schema_constraint(WEATHER), temperature=0.7, seed=3),
    ]
    mixed = [r for pair in zip(constrained, free, strict=True) for r in pair]
    assert len(mixed) == 8
    outputs = await asyncio.gather(*(collect(engine, r) for r in mixed))
    schemas = [PERSON, WEATHER, PERSON, WEATHER]
    for got, schema in zip(outputs[0::2], schemas, strict=True):
        text = "".join(o.text for o in got)
        assert got[-1].finish_reason is FinishReason.STOP, text
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), text
    for got in outputs[1::2]:
        text = "".join(o.text for o in got)
        # Free prose, not JSON; and no token of it was sampled from a masked row:
        # a mask leaves its refused tokens at -inf, which logprobs never list, so
        # every step of a free sequence still has its five alternatives.
        assert not text.lstrip().startswith("{"), text
        alternatives = [len(lp.top) for o in got for lp in o.logprobs]
        assert len(alternatives) == got[-1].usage.completion_tokens  # type: ignore[union-attr]
        assert set(alternatives) == {5}, text


async def greedy_tokens(engine: LlamaCppEngine, messages: list[dict[str, str]]) -> list[str]:
    """The tokens of a greedy reply, each as text (from its logprobs)."""
    request = chat_request(engine, messages, temperature=0, max_tokens=24, logprobs=0)
    outputs = [o async for o in engine.submit([request])]
    return [lp.token for o in outputs for lp in o.logprobs]


async def test_a_lazy_grammar_takes_over_at_its_trigger(engine: LlamaCppEngine) -> None:
    messages = [{"role": "user", "content": FREE_PROMPTS[1]}]
    tokens = await greedy_tokens(engine, messages)
    # A trigger the greedy reply reaches on a token boundary: up to there the
    # lazy request samples exactly as the free one did.
    trigger = "".join(tokens[2:4])
    before = "".join(tokens[:2])
    grammar = LLMatcher.grammar_from_regex(re.escape(trigger) + " [0-9]{3}!")
    text, last = await run(
        engine,
        chat_request(engine, messages, Constraint(grammar, trigger=trigger), temperature=0),
    )
    assert last.finish_reason is FinishReason.STOP, text
    assert text.startswith(before + trigger)
    assert re.fullmatch(re.escape(trigger) + " [0-9]{3}!", text[len(before) :]), text


async def test_max_tokens_cuts_constrained_json(engine: LlamaCppEngine) -> None:
    text, last = await run(
        engine,
        chat_request(engine, SCHEMA_PROMPT, schema_constraint(PERSON), max_tokens=6, seed=7),
    )
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage is not None and last.usage.completion_tokens == 6
    assert text.startswith('{"name":"'), text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_refused_grammars_and_failing_matchers_cost_one_request(
    engine: LlamaCppEngine,
) -> None:
    with pytest.raises(PromptError, match="unknown name"):
        engine.prepare_constraint(Constraint(LLMatcher.grammar_from_lark("start: nothing")))
    # A lazy grammar that refuses the text from its own trigger on ("e", the
    # commonest letter, from which "zzz" cannot follow): the matcher fails on
    # the engine thread, beside a request that goes on.
    failing = chat_request(
        engine,
        [{"role": "user", "content": FREE_PROMPTS[1]}],
        Constraint(LLMatcher.grammar_from_regex("zzz"), trigger="e"),
        temperature=0,
    )
    beside = chat_request(engine, WEATHER_PROMPT, schema_constraint(WEATHER), seed=5)
    (_, failed), (text, last) = await run_all(engine, [failing, beside])
    assert failed.finish_reason is FinishReason.ERROR
    assert failed.error is not None and "constrained decoding failed" in failed.error
    assert last.finish_reason is FinishReason.STOP
    assert jsonschema_rs.validator_for(WEATHER).is_valid(json.loads(text))
    # And the engine serves the next constrained request as usual.
    text, last = await run(
        engine, chat_request(engine, SCHEMA_PROMPT, schema_constraint(PERSON), seed=11)
    )
    assert last.finish_reason is FinishReason.STOP
    assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(text))
