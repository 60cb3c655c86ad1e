"""Decode speed of ``spigot serve`` against the bare llama.cpp ceiling, side by side.

The ceiling is a bare decode loop on the same model, threads and context: one
``llama_batch`` per step with one token per sequence, argmax in numpy, no
scheduler, no server. The server is measured over HTTP with streamed chat
requests that generate exactly ``--tokens`` tokens (``ignore_eos``). Rounds
alternate between the two so machine noise hits both alike; medians are
reported.

    python -m benchmarks.decode --rounds 3 --tokens 128 --streams 1,8
    python -m benchmarks.decode --url http://127.0.0.1:8000/v1   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

from spigot.engine.llamacpp import ContextOptions, LlamaCppModel, set_native_logging
from spigot.models import EMBEDDED_MODEL_ID, embedded_model_path

PROMPT = "Write a long story about a lighthouse keeper and the sea."


@dataclass
class Result:
    name: str
    streams: int
    tok_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.tok_s)


def bare_decode(model: LlamaCppModel, streams: int, tokens: int) -> float:
    """Aggregate decode tokens/s of a bare loop with ``streams`` sequences."""
    model.clear_memory()
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=True)
    batch = model.batch
    batch.clear()
    for s in range(streams):
        batch.add(s, prompt, 0, True)
    assert model.decode() == 0
    last = [
        int(np.argmax(model.logits_row(s * len(prompt) + len(prompt) - 1))) for s in range(streams)
    ]
    pos = len(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        batch.clear()
        for s in range(streams):
            batch.add(s, [last[s]], pos, True)
        assert model.decode() == 0
        last = [int(np.argmax(model.logits_row(s))) for s in range(streams)]
        pos += 1
    elapsed = time.perf_counter() - start
    model.clear_memory()
    return streams * tokens / elapsed


async def _one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[int, float, float]:
    payload = {
        "model": EMBEDDED_MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    count = 0
    async with client.stream("POST", url, json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = orjson.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return count, first, last


async def server_decode(base_url: str, streams: int, tokens: int) -> float:
    """Aggregate decode tokens/s over HTTP: tokens after each stream's first, over the span."""
    url = f"{base_url}/chat/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        results = await asyncio.gather(*(_one_stream(client, url, tokens) for _ in range(streams)))
    # Like the bare loop, prefill is left out: tokens after each stream's
    # first, over the time from the first stream's first token to the end.
    counted = sum(r[0] - 1 for r in results)
    span = max(r[2] for r in results) - min(r[1] for r in results)
    return counted / span


def start_server(port: int, threads: int, parallel: int) -> object:
    import subprocess
    import sys

    process = subprocess.Popen(
        [
            sys.executable, "-m", "spigot", "serve", "--port", str(port),
            "--threads", str(threads), "--parallel", str(parallel), "--no-metering",
            "--log-level", "warning",
        ]
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start")


BARE, SERVED = "bare loop", "spigot serve"


def measure(
    base_url: str,
    model_path: Path,
    levels: Sequence[int],
    rounds: int,
    tokens: int,
    threads: int,
    log: Callable[[str], None] = print,
) -> dict[tuple[str, int], Result]:
    """Bare loop and the running server at ``base_url``, alternating, ``rounds`` times.

    The server must have been started with ``--parallel`` of at least ``max(levels)``.
    """
    set_native_logging(False)
    parallel = max(levels)
    results: dict[tuple[str, int], Result] = {}
    for round_no in range(rounds):
        for streams in levels:
            # The bare loop loads its own copy only while it runs, so the
            # two never decode at the same time.
            model = LlamaCppModel(
                model_path,
                ContextOptions(n_ctx=8192, n_seq_max=parallel, n_batch=512, n_threads=threads),
            )
            try:
                bare = bare_decode(model, streams, tokens)
            finally:
                model.close()
            served = asyncio.run(server_decode(base_url, streams, tokens))
            results.setdefault((BARE, streams), Result(BARE, streams, [])).tok_s.append(bare)
            results.setdefault((SERVED, streams), Result(SERVED, streams, [])).tok_s.append(served)
            log(
                f"round {round_no + 1} streams {streams}: "
                f"bare {bare:.1f} tok/s, spigot {served:.1f} tok/s"
            )
    return results


def table(results: dict[tuple[str, int], Result], levels: Sequence[int]) -> list[str]:
    """The markdown table of medians, and the scaling of spigot over the first level."""
    lines = [
        "| streams | bare loop tok/s | spigot serve tok/s | spigot / bare |",
        "|---|---|---|---|",
    ]
    for streams in levels:
        bare = results[(BARE, streams)].median
        served = results[(SERVED, streams)].median
        lines.append(f"| {streams} | {bare:.1f} | {served:.1f} | {served / bare:.0%} |")
    one = results[(SERVED, levels[0])].median
    for streams in levels[1:]:
        lines.append("")
        lines.append(
            f"spigot, {streams} streams vs {levels[0]}: "
            f"{results[(SERVED, streams)].median / one:.2f}x aggregate tokens/s"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument(
        "--url",
        default=None,
        help="measure this running server (started with --parallel >= the most streams) "
        "instead of starting one on --port",
    )
    parser.add_argument("--out", type=Path, default=None, help="append a markdown table here")
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]

    path = embedded_model_path()
    if args.url:
        results = measure(args.url, path, levels, args.rounds, args.tokens, args.threads)
    else:
        server = start_server(args.port, args.threads, max(levels))
        try:
            results = measure(
                f"http://127.0.0.1:{args.port}/v1",
                path,
                levels,
                args.rounds,
                args.tokens,
                args.threads,
            )
        finally:
            server.terminate()  # type: ignore[attr-defined]
            server.wait()  # type: ignore[attr-defined]

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
        f"model {path.name}; {args.tokens} tokens per stream; medians of {args.rounds} rounds.",
        "",
        *table(results, levels),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
