"""The peers table in docs/benchmarks.md, rendered from aggregated bench levels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs import render_peer
from spigot.bench.request import RequestResult
from spigot.bench.stats import LevelRun, aggregate_level


def level(concurrency: int, cached: int | None, *tokens_per_s: float) -> dict[str, Any]:
    """A level of one round per throughput given."""
    return aggregate_level([level_run(concurrency, cached, t) for t in tokens_per_s])


def level_run(concurrency: int, cached: int | None, tokens_per_s: float) -> LevelRun:
    results = []
    for _ in range(concurrency):
        result = RequestResult(
            prompt_id="p",
            start=0.0,
            end=1.0,
            chunk_times=[0.2, 0.6, 1.0],
            text="abc",
            usage_tokens=3,
            prompt_tokens=70,
            cached_tokens=cached,
        )
        result.output_tokens = 3
        results.append(result)
    wall = 3 * concurrency / tokens_per_s
    return LevelRun(concurrency, wall, results)


def entry(other_cached: int | None, **per_level: Any) -> dict[str, Any]:
    servers = [
        {"name": "spigot", "levels": [level(1, 30, 60.0), level(8, 30, 100.0)]},
        {"name": "llama-server", "levels": [level(1, other_cached, 50.0), level(8, None, 80.0)]},
    ]
    config = {
        "workload": "mixed",
        "prompts_file": None,
        "max_tokens": 3,
        "duration": 25.0,
        "requests": None,
        "rounds": 3,
        "concurrency": [1, 8],
    } | per_level
    machine = {"date": "2026-11-26", "commit": "abc", "cpu": "CPU", "cpu_count": 2}
    peer = {
        "ready": True,
        "commands": ["spigot serve &"],
        "results": {"config": config, "servers": servers},
    }
    return {"machine": machine, "data": {"llama-server": peer}}


def test_the_peer_table_shows_throughput_ratios_and_cached_prompt_tokens(tmp_path: Path) -> None:
    text = render_peer("llama-server", entry(other_cached=10), tmp_path, "img/")
    rows = [
        line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 8 ")
    ]
    assert rows[0].startswith("| 1 | 60.0 | 50.0 | 1.20 | - |")  # one round: no pairs
    assert rows[0].endswith("| 30 of 70 / 10 of 70 |")
    # A server that does not report cached tokens shows a dash, not zero.
    assert rows[1].endswith("| 30 of 70 / - |")
    assert "medians of 3 rounds" in text
    assert (tmp_path / "vs-llama-server.png").stat().st_size > 0


def test_the_peer_table_says_how_much_each_level_ran(tmp_path: Path) -> None:
    by_time = render_peer("llama-server", entry(10), tmp_path, "img/")
    assert "25 s per level" in by_time
    counted = render_peer(
        "llama-server", entry(10, duration=None, requests=[10, 16]), tmp_path, "img/"
    )
    assert "requests per level: 10 at 1, 16 at 8" in counted


def test_the_peer_table_pairs_the_rounds(tmp_path: Path) -> None:
    # Round by round 3.0, 0.8 and 0.6: the paired median (0.8) and the ratio
    # of the two medians (60 / 50) differ when the machine drifts.
    data = entry(10)
    data["data"]["llama-server"]["results"]["servers"] = [
        {"name": "spigot", "levels": [level(8, 30, 60.0, 80.0, 30.0)]},
        {"name": "llama-server", "levels": [level(8, 30, 20.0, 100.0, 50.0)]},
    ]
    text = render_peer("llama-server", data, tmp_path, "img/")
    (row,) = [line for line in text.splitlines() if line.startswith("| 8 ")]
    assert row.startswith("| 8 | 60.0 | 50.0 | 1.20 | 3.00, 0.80, 0.60 (median 0.80) |")
