"""Prefix reuse: time to first token of a cold request against a warm one sharing its prefix.

Each round makes a fresh ~1,000-token system prompt, asks one question
(cold: the whole prompt is computed) and then another with the same system
prompt (warm: only the new turn is computed). Then a request with another
system prompt takes the KV pool's cache, and a third question with the first
system prompt is answered from the copy saved in host memory (restored).
Medians over rounds.

    python -m benchmarks.prefix --url http://127.0.0.1:8000/v1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from spigot.models import EMBEDDED_MODEL_ID

SYSTEM_SENTENCE = "You are the keeper of a lighthouse and you answer questions about the sea. "
OTHER_SENTENCE = "You are a baker and you answer questions about bread and ovens of all kinds. "


def ttft(url: str, model: str, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first content chunk, and the cached tokens reported."""
    payload = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    cached = 0
    with httpx.stream("POST", f"{url}/chat/completions", json=payload, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and '"content":"' in line and '"role"' not in line:
                first = time.perf_counter() - start
            if '"cached_tokens":' in line:
                cached = int(line.split('"cached_tokens":')[1].split("}")[0])
    assert first is not None
    return first, cached


@dataclass(frozen=True)
class Round:
    cold_s: float
    warm_s: float
    cached_tokens: int
    restored_s: float | None = None  # after another prompt took the pool's cache
    restored_cached_tokens: int = 0


def measure(
    url: str,
    model: str = EMBEDDED_MODEL_ID,
    rounds: int = 5,
    sentences: int = 62,
    log: Callable[[str], None] = print,
) -> list[Round]:
    """Cold and warm TTFT of ``rounds`` fresh system prompts of ``sentences`` sentences."""
    out = []
    for i in range(rounds):
        # A fresh session id first, so no earlier round's cache matches.
        system = f"Session {uuid.uuid4()}. " + SYSTEM_SENTENCE * sentences
        c, _ = ttft(url, model, system, "What is a lighthouse?")
        w, cached = ttft(url, model, system, "Who keeps a lighthouse?")
        ttft(url, model, f"Session {uuid.uuid4()}. " + OTHER_SENTENCE * sentences, "Hello?")
        r, restored_cached = ttft(url, model, system, "Why is a lighthouse tall?")
        out.append(Round(c, w, cached, r, restored_cached))
        log(
            f"round {i + 1}: cold {c * 1000:.0f} ms, warm {w * 1000:.0f} ms (cached {cached}), "
            f"restored {r * 1000:.0f} ms (cached {restored_cached})"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=EMBEDDED_MODEL_ID)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=62, help="~16 tokens each")
    args = parser.parse_args()
    rounds = measure(args.url, args.model, args.rounds, args.sentences)
    c = statistics.median(r.cold_s for r in rounds)
    w = statistics.median(r.warm_s for r in rounds)
    r = statistics.median(r.restored_s or 0.0 for r in rounds)
    print(
        f"median TTFT: cold {c * 1000:.0f} ms, warm {w * 1000:.0f} ms, restored "
        f"{r * 1000:.0f} ms; warm/cold {w / c:.0%}, restored/cold {r / c:.0%}"
    )


if __name__ == "__main__":
    main()
