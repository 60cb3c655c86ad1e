"""Chunked prefill: how a long prompt arriving disturbs streams that are decoding.

Starts ``--streams`` streams generating ``--tokens`` tokens each; once every
stream is decoding, sends one prompt of about ``--prompt-tokens`` tokens. Reports
the streams' inter-token gaps: their median outside the long prompt's prefill
(before it arrived and after its first token), and the p99 and max while it
was being prefilled, plus that prompt's time to first token. The median leaves
the prefill out so that a server which slows every step cannot improve the
ratio by it.

    python -m benchmarks.interference --url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass

import httpx

from spigot.models import EMBEDDED_MODEL_ID

WORDS = "The quick brown fox jumps over the lazy dog. "  # ~10 tokens


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def stream(client: httpx.AsyncClient, url: str, payload: dict, arrivals: list[float]) -> None:
    async with client.stream("POST", url, json={**payload, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if '"content":"' in line and '"role"' not in line:
                arrivals.append(time.perf_counter())


@dataclass(frozen=True)
class Interference:
    streams: int
    prompt_tokens: int  # asked for; the prompt is about this long
    long_ttft_s: float
    gap_median_s: float  # the streams' inter-token gaps outside the long prefill
    during_p99_s: float | None  # gaps that overlap the long prompt's prefill
    during_max_s: float | None

    @property
    def p99_over_median(self) -> float | None:
        return None if self.during_p99_s is None else self.during_p99_s / self.gap_median_s


async def measure(
    url: str,
    model: str = EMBEDDED_MODEL_ID,
    streams: int = 8,
    tokens: int = 400,
    prompt_tokens: int = 2000,
) -> Interference:
    """Send the long prompt once all ``streams`` are decoding; the gaps it caused."""
    endpoint = f"{url}/chat/completions"
    base = {"model": model, "temperature": 0, "ignore_eos": True}
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [
            asyncio.create_task(
                stream(
                    client,
                    endpoint,
                    {
                        **base,
                        "messages": [{"role": "user", "content": f"Tell story {i}."}],
                        "max_tokens": tokens,
                    },
                    arrivals[i],
                )
            )
            for i in range(streams)
        ]
        # Polling, not an event: the streams' arrival lists are the only state.
        # A stream that ended early (an error) ends the wait; gather raises it.
        while min(map(len, arrivals)) < 20 and not any(t.done() for t in tasks):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        long_arrivals: list[float] = []
        sent = time.perf_counter()
        long_payload = {
            **base,
            "messages": [{"role": "user", "content": WORDS * (prompt_tokens // 10)}],
            "max_tokens": 4,
        }
        await stream(client, endpoint, long_payload, long_arrivals)
        await asyncio.gather(*tasks)
    first = long_arrivals[0]
    pairs = [(a, b) for arr in arrivals for a, b in itertools.pairwise(arr)]
    gaps_during = [b - a for a, b in pairs if b > sent and a < first]
    gaps_outside = [b - a for a, b in pairs if b <= sent or a >= first]
    return Interference(
        streams=streams,
        prompt_tokens=prompt_tokens,
        long_ttft_s=first - sent,
        gap_median_s=statistics.median(gaps_outside),
        # Empty when every stream had finished before the prefill did (too few --tokens).
        during_p99_s=percentile(gaps_during, 99) if gaps_during else None,
        during_max_s=max(gaps_during) if gaps_during else None,
    )


async def run(args: argparse.Namespace) -> None:
    result = await measure(args.url, args.model, args.streams, args.tokens, args.prompt_tokens)
    median = result.gap_median_s
    print(f"streams {args.streams}, long prompt ~{args.prompt_tokens} tokens")
    print(f"long prompt TTFT: {result.long_ttft_s * 1000:.0f} ms")
    print(f"inter-token gap median outside the long prefill: {median * 1000:.1f} ms")
    if result.during_p99_s is None or result.during_max_s is None:
        print("during the long prefill: no stream was decoding (raise --tokens)")
        return
    print(
        f"during the long prefill: p99 {result.during_p99_s * 1000:.1f} ms, "
        f"max {result.during_max_s * 1000:.1f} ms, p99/median {result.during_p99_s / median:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=EMBEDDED_MODEL_ID)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
