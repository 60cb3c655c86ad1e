"""What constrained decoding costs: the engine with and without a JSON schema, side by side.

In one process, no HTTP. Each round the engine decodes ``--streams`` requests
(greedy, or seeded at ``--temperature``) of ``--tokens`` tokens twice, rounds
alternating: free (``ignore_eos``)
and constrained by a nested schema too long to finish within ``--tokens``
(an array of at least 20 people), so both generate exactly as many tokens in
batches of the same shape. Tokens/s are counted from each run's first output
on (prompts left out); medians of the rounds, and constrained / free.

Then, per token of the constrained outputs (replayed through a fresh matcher):
the mask's computation (llguidance) and its application to a 49,152-logit row
(``apply_bitmask``; llguidance's numpy kernel beside it), p50 and p99; and
what ``prepare_constraint`` takes for a schema not seen before, with the
first mask after it.

    python -m benchmarks.constrained --streams 1,8 --tokens 128 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import numpy as np
from llguidance import LLMatcher
from llguidance.numpy import apply_token_bitmask_inplace

from spigot.engine.llamacpp import EngineOptions, LlamaCppEngine, set_native_logging
from spigot.engine.llamacpp.constraint import apply_bitmask, mask_words
from spigot.engine.types import Constraint, GenRequest, SamplingParams
from spigot.models import embedded_model_path

PROMPT = [
    {"role": "system", "content": "You answer with one JSON object."},
    {"role": "user", "content": "List the people of a small company with their details."},
]
# What spigot/api/structured.py compiles schemas with.
JSON_OPTIONS: Any = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
}


def people_schema(variant: int = 0) -> dict[str, Any]:
    """A nested schema: objects in an array, enums, a pattern, anyOf. ``variant``
    changes a limit, so that each variant is a grammar not compiled before."""
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40 + variant},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "role": {"enum": ["engineer", "manager", "designer", "sales"]},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 60},
                    "city": {"type": "string", "maxLength": 40},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
                "additionalProperties": False,
            },
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}},
            "manager": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 40}]},
        },
        "required": ["name", "age", "role", "address", "skills", "manager"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "company": {"type": "string", "maxLength": 40},
            "people": {"type": "array", "items": person, "minItems": 20},
        },
        "required": ["company", "people"],
        "additionalProperties": False,
    }


def grammar_of(schema: dict[str, Any]) -> str:
    return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)


async def tokens_per_second(
    engine: LlamaCppEngine,
    streams: int,
    tokens: int,
    constraint: Constraint | None,
    temperature: float = 0.0,
) -> tuple[float, list[str]]:
    """Aggregate decode tokens/s of ``streams`` requests; their texts."""
    prompt = engine.prepare_chat(PROMPT)
    requests = [
        GenRequest(
            engine.new_request_id(),
            prompt,
            SamplingParams(
                max_tokens=tokens,
                temperature=temperature,
                seed=seed,
                ignore_eos=constraint is None,
                constraint=constraint,
            ),
        )
        for seed in range(streams)
    ]
    first: list[float] = []
    counted = [0]

    async def consume(request: GenRequest) -> str:
        text = []
        async for out in engine.submit([request]):
            if not first:
                first.append(time.perf_counter())
                counted[0] = engine.core.steps
            text.append(out.text)
        return "".join(text)

    texts = await asyncio.gather(*(consume(r) for r in requests))
    elapsed = time.perf_counter() - first[0]
    # Every step after the first output carried one token of every stream.
    steps = engine.core.steps - counted[0]
    return streams * steps / elapsed, list(texts)


def replay_masks(engine: LlamaCppEngine, grammar: str, texts: list[str]) -> dict[str, list[float]]:
    """Seconds per token: computing the mask, applying it, llguidance's kernel."""
    grammars = engine.core.grammars
    tokenizer = grammars.tokenizer()
    words = np.zeros(mask_words(engine.model.n_vocab), dtype=np.int32)
    rng = np.random.default_rng(0)
    row = rng.standard_normal(engine.model.n_vocab).astype(np.float32)
    times: dict[str, list[float]] = {"compute": [], "apply": [], "llguidance kernel": []}
    for text in texts:
        matcher = grammars.matcher(grammar)
        for token in tokenizer.tokenize_str(text):
            started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            computed = time.perf_counter()
            logits = row.copy()
            applying = time.perf_counter()
            apply_bitmask(logits, words)
            applied = time.perf_counter()
            logits = row.copy()
            theirs = time.perf_counter()
            apply_token_bitmask_inplace(logits, words)
            times["compute"].append(computed - started)
            times["apply"].append(applied - applying)
            times["llguidance kernel"].append(time.perf_counter() - theirs)
            if not matcher.consume_token(token):
                break
    return times


def compile_times(engine: LlamaCppEngine, count: int) -> dict[str, list[float]]:
    """Seconds of ``prepare_constraint`` for new schemas, and of their first mask."""
    words = np.zeros(mask_words(engine.model.n_vocab), dtype=np.int32)
    times: dict[str, list[float]] = {"prepare_constraint": [], "first mask": []}
    for variant in range(1, count + 1):
        constraint = Constraint(grammar_of(people_schema(variant)))
        started = time.perf_counter()
        engine.prepare_constraint(constraint)
        prepared = time.perf_counter()
        matcher = engine.core.grammars.matcher(constraint.grammar)
        masking = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times["prepare_constraint"].append(prepared - started)
        times["first mask"].append(time.perf_counter() - masking)
    return times


def percentile_us(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e6


async def measure(args: argparse.Namespace) -> None:
    set_native_logging(False)
    streams = [int(s) for s in args.streams.split(",")]
    engine = LlamaCppEngine.load(
        "bench",
        embedded_model_path(),
        EngineOptions(parallel=max(streams), threads=args.threads, prefix_cache=False),
    )
    await engine.start()
    try:
        started = time.perf_counter()
        grammar = grammar_of(people_schema())
        constraint = Constraint(grammar)
        engine.prepare_constraint(constraint)  # the tokenizer too, the first time
        print(
            f"first prepare_constraint (tokenizer included): {time.perf_counter() - started:.3f} s"
        )
        await tokens_per_second(engine, 1, 8, None)  # warm up
        rates: dict[int, dict[str, list[float]]] = {}
        texts: list[str] = []
        for n in streams:
            rates[n] = {"free": [], "constrained": []}
            for _ in range(args.rounds):
                free, _ = await tokens_per_second(engine, n, args.tokens, None, args.temperature)
                tight, out = await tokens_per_second(
                    engine, n, args.tokens, constraint, args.temperature
                )
                rates[n]["free"].append(free)
                rates[n]["constrained"].append(tight)
                texts += out
        masks = replay_masks(engine, grammar, texts[: args.replay])
        compiles = compile_times(engine, args.compiles)
    finally:
        engine.close()

    print(
        f"\ndecode tok/s, {args.tokens} tokens per stream, temperature {args.temperature}, "
        f"medians of {args.rounds} rounds"
    )
    print("| streams | free | constrained | constrained / free |")
    print("|---|---|---|---|")
    for n, runs in rates.items():
        free, tight = statistics.median(runs["free"]), statistics.median(runs["constrained"])
        print(f"| {n} | {free:.1f} | {tight:.1f} | {tight / free:.2f} |")
    print(f"\nper token, {len(masks['compute'])} tokens of {args.replay} constrained outputs")
    print("| step | p50 us | p99 us | mean us |")
    print("|---|---|---|---|")
    for name, values in masks.items():
        p50, p99 = percentile_us(values, 50), percentile_us(values, 99)
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {statistics.fmean(values) * 1e6:.1f} |")
    print(f"\nnew schemas, {args.compiles} of them")
    print("| step | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, values in compiles.items():
        p50, p99 = percentile_us(values, 50) / 1000, percentile_us(values, 99) / 1000
        print(f"| {name} | {p50:.2f} | {p99:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (argmax)")
    parser.add_argument("--replay", type=int, default=8, help="constrained outputs replayed")
    parser.add_argument("--compiles", type=int, default=20, help="new schemas compiled")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
