"""Chunked prefill: how a long prompt arriving disturbs streams that are decoding.

Starts ``--streams`` streams generating ``--tokens`` tokens each; once every
stream is decoding, sends one prompt of about ``--prompt-tokens`` tokens. Reports
the streams' inter-token gaps: the median over the whole run and the p99 and
max while the long prompt was being prefilled (from its arrival to its first
token), plus that prompt's time to first token.

    python -m spigot.bench.interference --url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

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


async def run(args: argparse.Namespace) -> None:
    url = f"{args.url}/chat/completions"
    base = {"model": args.model, "temperature": 0, "ignore_eos": True}
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [
            asyncio.create_task(
                stream(
                    client,
                    url,
                    {
                        **base,
                        "messages": [{"role": "user", "content": f"Tell story {i}."}],
                        "max_tokens": args.tokens,
                    },
                    arrivals[i],
                )
            )
            for i in range(args.streams)
        ]
        # Polling, not an event: the streams' arrival lists are the only state.
        while min(len(a) for a in arrivals) < 20:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        long_arrivals: list[float] = []
        sent = time.perf_counter()
        long_payload = {
            **base,
            "messages": [{"role": "user", "content": WORDS * (args.prompt_tokens // 10)}],
            "max_tokens": 4,
        }
        await stream(client, url, long_payload, long_arrivals)
        await asyncio.gather(*tasks)
    first = long_arrivals[0]
    gaps_all = [b - a for arr in arrivals for a, b in itertools.pairwise(arr)]
    gaps_during = [
        b - a for arr in arrivals for a, b in itertools.pairwise(arr) if b > sent and a < first
    ]
    median = statistics.median(gaps_all)
    p99 = percentile(gaps_during, 99)
    print(f"streams {args.streams}, long prompt ~{args.prompt_tokens} tokens")
    print(f"long prompt TTFT: {(first - sent) * 1000:.0f} ms")
    print(f"inter-token gap median (whole run): {median * 1000:.1f} ms")
    print(
        f"during the long prefill: p99 {p99 * 1000:.1f} ms, max {max(gaps_during) * 1000:.1f} ms, "
        f"p99/median {p99 / median:.2f}x"
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
