"""Turning request results into the numbers a level reports.

Pure functions over ``RequestResult``s, no I/O: percentiles, per-level
aggregation, error counts, and the merge of several rounds of one level.
Latencies are reported in milliseconds; only successful requests enter the
latency and throughput figures, failed ones are counted by kind.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spigot.bench.request import RequestResult

# Distinct error messages kept per level, so a failing run says why.
ERROR_SAMPLES = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    The same definition as numpy's default (``method="linear"``); None when
    there are no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """p50/p90/p99, mean, min, max and count, each multiplied by ``scale`` (s -> ms)."""

    def scaled(value: float | None) -> float | None:
        return None if value is None else round(value * scale, 3)

    return {
        "p50": scaled(percentile(values, 50)),
        "p90": scaled(percentile(values, 90)),
        "p99": scaled(percentile(values, 99)),
        "mean": scaled(statistics.fmean(values)) if values else None,
        "min": scaled(min(values)) if values else None,
        "max": scaled(max(values)) if values else None,
        "count": len(values),
    }


def count_errors(results: Iterable[RequestResult]) -> dict[str, Any]:
    """``{"total", "by_kind": {label: n}, "samples": [first distinct messages]}``."""
    by_kind: Counter[str] = Counter()
    samples: list[str] = []
    for result in results:
        if result.ok:
            continue
        label = result.error_label or "other"
        by_kind[label] += 1
        message = f"{label}: {result.error}"
        if message not in samples and len(samples) < ERROR_SAMPLES:
            samples.append(message)
    return {
        "total": sum(by_kind.values()),
        "by_kind": dict(sorted(by_kind.items())),
        "samples": samples,
    }


def token_source(results: Iterable[RequestResult]) -> str | None:
    """How output tokens were counted: one source, ``mixed``, or None without successes."""
    sources = {r.token_source for r in results if r.ok}
    if not sources:
        return None
    return sources.pop() if len(sources) == 1 else "mixed"


@dataclass
class LevelRun:
    """One round of one concurrency level against one server."""

    concurrency: int
    wall_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def round_summary(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "requests": len(self.results),
            "ok": len(self.ok),
            "errors": len(self.results) - len(self.ok),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.output_tokens_per_s, 3),
            "requests_per_s": round(self.requests_per_s, 4),
        }


def aggregate_level(runs: Sequence[LevelRun]) -> dict[str, Any]:
    """One level's figures over its rounds.

    Latency percentiles pool every successful request of every round;
    throughputs are the median of the rounds' (each round has its own wall
    time, so pooling them would weigh a slow round by its length).
    """
    if not runs:
        raise ValueError("a level needs at least one run")
    results = [r for run in runs for r in run.results]
    ok = [r for r in results if r.ok]
    ttft = [t for r in ok if (t := r.ttft) is not None]
    tpot = [t for r in ok if (t := r.tpot) is not None]
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    cached_tokens = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return {
        "concurrency": runs[0].concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": count_errors(results),
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_per_s": round(statistics.median(r.output_tokens_per_s for r in runs), 3),
        "requests_per_s": round(statistics.median(r.requests_per_s for r in runs), 4),
        "wall_s": round(sum(r.wall_s for r in runs), 4),
        "prompt_tokens_mean": round(statistics.fmean(prompt_tokens), 1) if prompt_tokens else None,
        # Where the server reports them: how much of the prompts came from its cache.
        "cached_tokens_mean": round(statistics.fmean(cached_tokens), 1) if cached_tokens else None,
        "token_count_source": token_source(results),
        "ttft_ms": summarize(ttft),
        "itl_ms": summarize([g for r in ok for g in r.gaps]),
        "tpot_ms": summarize(tpot),
        "e2e_ms": summarize([r.e2e for r in ok]),
        "rounds": [run.round_summary() for run in runs],
    }


def ratio(b: float | None, a: float | None) -> float | None:
    """b / a, or None when either is missing or a is zero."""
    if a is None or b is None or a == 0:
        return None
    return round(b / a, 4)
