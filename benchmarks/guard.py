"""The guard's cost and hold-back on real model output.

    python -m benchmarks.guard policy guard-bench.toml      # 100 phrase rules + every detector
    python -m benchmarks.guard held --url http://127.0.0.1:8000/v1 --policy guard-bench.toml

``policy`` writes the benchmark policy: 100 literal-phrase rules (two words
each, from a fixed list, all redacting) plus one rule per built-in detector.
Compare a server started with ``--guard`` on it against one without, side by
side, with ``spigot bench run --compare``.

``held`` streams the shipped prompt set from an (unguarded) server, keeps
every delta as the client received it, and replays each stream through the
policy's output guard: after each delta it records how many characters the
guard holds back, and how long the guard took. Same algorithm as the server,
measured without the network's noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.resources import files
from pathlib import Path

import httpx
import orjson

from spigot.guard import Policy
from spigot.guard.detectors import DETECTORS
from spigot.models import EMBEDDED_MODEL_ID

ADJECTIVES = (
    "amber",
    "brisk",
    "cobalt",
    "dusty",
    "eager",
    "fabled",
    "gilded",
    "hollow",
    "ivory",
    "jagged",
    "kindly",
    "lunar",
    "mellow",
    "nimble",
    "opal",
    "placid",
    "quartz",
    "russet",
    "silent",
    "tawny",
    "umber",
    "velvet",
    "woven",
    "xenial",
    "yonder",
)
NOUNS = (
    "anchor",
    "beacon",
    "citadel",
    "dynamo",
    "ember",
    "falcon",
    "glacier",
    "harbor",
    "iris",
    "juniper",
    "kestrel",
    "lantern",
    "meadow",
    "nebula",
    "orchard",
    "pylon",
    "quiver",
    "rampart",
    "sextant",
    "tundra",
)


def phrases(count: int = 100) -> list[str]:
    """``count`` distinct two-word phrases, the same every run."""
    out = [f"{a} {n}" for n in NOUNS for a in ADJECTIVES]
    return out[:count]


def policy_toml(rules: int = 100) -> str:
    lines: list[str] = []
    for i, phrase in enumerate(phrases(rules)):
        lines += [
            "[[rule]]",
            f'id = "phrase-{i:03d}"',
            'kind = "phrase"',
            f'phrases = ["{phrase}"]',
            'action = "redact"',
            "",
        ]
    for name in DETECTORS:
        lines += [
            "[[rule]]",
            f'id = "detector-{name}"',
            'kind = "detector"',
            f'detector = "{name}"',
            'action = "redact"',
            "",
        ]
    return "\n".join(lines)


def stream_deltas(url: str, model: str, prompt: str, max_tokens: int) -> list[str]:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    deltas: list[str] = []
    with httpx.stream("POST", f"{url}/chat/completions", json=payload, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in orjson.loads(line[6:])["choices"]:
                text = choice["delta"].get("content")
                if text:
                    deltas.append(text)
    return deltas


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def held(url: str, policy: Policy, model: str, max_tokens: int) -> dict[str, float]:
    prompts = json.loads(files("spigot.bench").joinpath("prompts/mixed.json").read_text())
    helds: list[float] = []
    per_delta_us: list[float] = []
    streams = 0
    for entry in prompts["prompts"]:
        deltas = stream_deltas(url, model, entry["prompt"], max_tokens)
        guard = policy.output.guard()
        for delta in deltas:
            start = time.perf_counter()
            step = guard.feed(delta)
            per_delta_us.append((time.perf_counter() - start) * 1e6)
            helds.append(step.held)
            if step.blocked is not None:
                break
        guard.finish()
        streams += 1
    return {
        "streams": streams,
        "deltas": len(helds),
        "held_median": statistics.median(helds),
        "held_p99": percentile(helds, 99),
        "held_max": max(helds),
        "guard_us_per_delta_median": statistics.median(per_delta_us),
        "guard_us_per_delta_p99": percentile(per_delta_us, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("policy", help="write the benchmark policy")
    p.add_argument("out", type=Path)
    p.add_argument("--rules", type=int, default=100)
    h = sub.add_parser("held", help="characters held back, replayed on real output")
    h.add_argument("--url", default="http://127.0.0.1:8000/v1")
    h.add_argument("--policy", type=Path, required=True)
    h.add_argument("--model", default=EMBEDDED_MODEL_ID)
    h.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.command == "policy":
        args.out.write_text(policy_toml(args.rules), encoding="utf-8")
        print(f"wrote {args.out}: {args.rules} phrase rules + {len(DETECTORS)} detectors")
        return
    result = held(args.url, Policy.from_file(args.policy), args.model, args.max_tokens)
    for key, value in result.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
