"""The engine's decode steps against the bare loop's, in one process, with no HTTP.

Separates what the engine costs (scheduling, sampling, text, handing outputs
to the event loop) from what serving costs (the event loop's HTTP work and
the client, competing for the same cores). Both run on one model and context,
rounds alternating: the engine decodes ``--streams`` greedy requests of
``--tokens`` tokens, timed from the first output on so the prompts are left
out, then the bare loop of ``benchmarks.decode`` decodes as many, on the
engine thread between requests.

    python -m benchmarks.engine_vs_bare --streams 1,8 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.decode import PROMPT, bare_decode
from spigot.engine.llamacpp import EngineOptions, LlamaCppEngine, set_native_logging
from spigot.engine.types import GenRequest, Prompt, SamplingParams
from spigot.models import embedded_model_path


async def engine_step_ms(engine: LlamaCppEngine, streams: int, tokens: int) -> float:
    """Milliseconds per engine step while ``streams`` requests decode together."""
    prompt = Prompt.of_tokens(engine.model.tokenize(PROMPT, add_special=True, parse_special=True))
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    requests = [GenRequest(engine.new_request_id(), prompt, params) for _ in range(streams)]
    first: dict[str, float] = {}

    async def consume(request: GenRequest) -> None:
        async for _ in engine.submit([request]):
            if not first:
                first["time"] = time.perf_counter()
                first["step"] = engine.core.steps

    await asyncio.gather(*(consume(r) for r in requests))
    steps = engine.core.steps - first["step"]
    return (time.perf_counter() - first["time"]) / max(steps, 1) * 1000


async def compare(
    streams: list[int], tokens: int, rounds: int, threads: int
) -> dict[int, dict[str, list[float]]]:
    """Per stream count: the engine's and the bare loop's ms per step, per round."""
    set_native_logging(False)
    engine = LlamaCppEngine.load(
        "bench",
        embedded_model_path(),
        EngineOptions(parallel=max(streams), threads=threads, prefix_cache=False),
    )
    await engine.start()
    try:
        await engine_step_ms(engine, 1, 8)  # warm up
        results: dict[int, dict[str, list[float]]] = {}
        for n in streams:
            runs: dict[str, list[float]] = {"engine": [], "bare": []}
            for _ in range(rounds):
                runs["engine"].append(await engine_step_ms(engine, n, tokens))
                # On the engine thread, idle meanwhile: the context decodes on
                # one thread only (``LlamaCppModel.decode``).
                bare = engine.core.call(lambda n=n: bare_decode(engine.model, n, tokens))
                runs["bare"].append(n / await asyncio.wrap_future(bare) * 1000)
            results[n] = runs
        return results
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    results = asyncio.run(compare(streams, args.tokens, args.rounds, args.threads))
    print(f"ms per decode step, {args.tokens} tokens per stream, medians of {args.rounds} rounds")
    print("| streams | engine | bare loop | engine / bare |")
    print("|---|---|---|---|")
    for n, runs in results.items():
        e, b = statistics.median(runs["engine"]), statistics.median(runs["bare"])
        print(f"| {n} | {e:.2f} | {b:.2f} | {e / b:.2f} |")


if __name__ == "__main__":
    main()
