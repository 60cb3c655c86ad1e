"""The results of a ``spigot bench`` run as a JSON-ready dict, and queries over it.

Shape (``SCHEMA``)::

    {schema, started_at, elapsed_s, config, machine,
     servers: [{name, url, model, model_source, endpoint, info, token_count_source,
                levels: [one dict per concurrency level, see stats.aggregate_level]}],
     comparison: [per level: {metric: {a, b, b_over_a}}, errors: {a, b}]   # two servers}
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spigot import __version__
from spigot.bench.stats import LevelRun, aggregate_level, ratio

SCHEMA = "spigot-bench/1"


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (the load average says how busy it was)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "spigot": __version__,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return None


def samples(runs: Sequence[LevelRun]) -> list[dict[str, Any]]:
    """Every request of a level, for ``--raw``."""
    rows = []
    for round_no, run in enumerate(runs):
        # When each request was sent within its round: the burst that opens a
        # level and the requests that follow it wait for different things.
        round_start = min((r.start for r in run.results), default=0.0)
        for r in run.results:
            rows.append(
                {
                    "round": round_no,
                    "sent_ms": round((r.start - round_start) * 1000, 3),
                    "prompt": r.prompt_id,
                    "ok": r.ok,
                    "ttft_ms": None if r.ttft is None else round(r.ttft * 1000, 3),
                    "e2e_ms": round(r.e2e * 1000, 3),
                    "output_tokens": r.output_tokens,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "error": None if r.ok else f"{r.error_label}: {r.error}",
                }
            )
    return rows


def server_entry(
    *,
    name: str,
    url: str,
    model: str,
    model_source: str,
    endpoint: str,
    info: dict[str, Any],
    runs: Mapping[int, Sequence[LevelRun]],
    raw: bool,
) -> dict[str, Any]:
    """One server's part of the results: its levels in the order they were asked for."""
    levels = []
    for level_runs in runs.values():
        level = aggregate_level(level_runs)
        if raw:
            level["samples"] = samples(level_runs)
        levels.append(level)
    sources = {lv["token_count_source"] for lv in levels} - {None}
    return {
        "name": name,
        "url": url,
        "model": model,
        "model_source": model_source,
        "endpoint": endpoint,
        "info": info,
        "token_count_source": sources.pop()
        if len(sources) == 1
        else ("mixed" if sources else None),
        "levels": levels,
    }


def assemble(
    config: dict[str, Any],
    machine: dict[str, Any],
    servers: list[dict[str, Any]],
    started: dt.datetime,
    elapsed: float,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "config": config,
        "machine": machine,
        "servers": servers,
    }
    if len(servers) == 2:
        results["comparison"] = compare(servers[0], servers[1])
    return results


_COMPARED = {
    "output_tokens_per_s": ("output_tokens_per_s",),
    "requests_per_s": ("requests_per_s",),
    "ttft_p50_ms": ("ttft_ms", "p50"),
    "ttft_p99_ms": ("ttft_ms", "p99"),
    "itl_p50_ms": ("itl_ms", "p50"),
    "tpot_p50_ms": ("tpot_ms", "p50"),
    "e2e_p50_ms": ("e2e_ms", "p50"),
    "e2e_p99_ms": ("e2e_ms", "p99"),
}


def _pick(level: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = level
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: each metric of A and B and the ratio B / A."""
    rows = []
    for level_a, level_b in zip(a["levels"], b["levels"], strict=True):
        row: dict[str, Any] = {"concurrency": level_a["concurrency"]}
        for name, keys in _COMPARED.items():
            va, vb = _pick(level_a, keys), _pick(level_b, keys)
            row[name] = {"a": va, "b": vb, "b_over_a": ratio(vb, va)}
        row["errors"] = {"a": level_a["errors"]["total"], "b": level_b["errors"]["total"]}
        rows.append(row)
    return rows


def error_totals(results: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per server name: (failed requests, all requests)."""
    return {
        s["name"]: (
            sum(lv["errors"]["total"] for lv in s["levels"]),
            sum(lv["requests"] for lv in s["levels"]),
        )
        for s in results["servers"]
    }


def error_kinds(results: dict[str, Any], name: str) -> str:
    """A server's failures by kind over all levels, as ``connection 4, http_404 1``."""
    counts: dict[str, int] = {}
    for server in results["servers"]:
        if server["name"] != name:
            continue
        for level in server["levels"]:
            for kind, n in level["errors"]["by_kind"].items():
                counts[kind] = counts.get(kind, 0) + n
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
