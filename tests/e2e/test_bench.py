"""``spigot bench`` against a real server: results' shape, exact token counts, failures counted.

Behaviour only, never timings: few requests, few tokens (the model is slow and
the machine shared). The CLI runs as a ``python -m spigot`` subprocess where
its exit status and files matter; elsewhere ``run_bench`` is called directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from benchmarks.docs import MARKERS, end_marker, start_marker
from spigot.bench.load import BenchConfig, Target, run_bench
from spigot.bench.workloads import load_workload
from tests.e2e.server import ROOT, RunningServer, free_port

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEVEL_KEYS = {
    "concurrency",
    "requests",
    "ok",
    "errors",
    "output_tokens",
    "output_tokens_per_s",
    "requests_per_s",
    "wall_s",
    "prompt_tokens_mean",
    "cached_tokens_mean",
    "token_count_source",
    "ttft_ms",
    "itl_ms",
    "tpot_ms",
    "e2e_ms",
    "rounds",
}
PERCENTILES = {"p50", "p90", "p99", "mean", "min", "max", "count"}


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spigot", "bench", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


def standard(*args: str) -> subprocess.CompletedProcess[str]:
    """``make bench``'s suite, repository tooling: run from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.standard", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


def test_cli_run_writes_results_and_a_plot(server: RunningServer, tmp_path: Path) -> None:
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    result = bench(
        "run", "--url", server.base_url, "--concurrency", "1,2", "--requests", "3,4",
        "--max-tokens", "8", "--warmup", "0", "--out", str(out), "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| concurrency |" in result.stdout
    # Progress goes to stderr, one line per level when stderr is not a terminal.
    assert "c=1: 3 requests, 0 errors" in result.stderr

    results = json.loads(out.read_text())
    assert results["schema"] == "spigot-bench/1"
    assert results["config"]["concurrency"] == [1, 2]
    assert results["config"]["requests"] == [3, 4]  # one count per level
    assert results["config"]["targets"][0]["api_key"] is False
    assert {"platform", "python", "cpu", "cpu_count"} <= set(results["machine"])
    (entry,) = results["servers"]
    assert entry["model"] == MODEL
    assert entry["url"] == server.base_url
    assert entry["token_count_source"] == "usage"
    assert [level["concurrency"] for level in entry["levels"]] == [1, 2]
    for level, count in zip(entry["levels"], (3, 4), strict=True):
        assert set(level) == LEVEL_KEYS
        for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            assert set(level[metric]) == PERCENTILES
            assert level[metric]["p50"] is not None
        # ignore_eos + min_tokens: every request generates exactly max_tokens.
        assert level["output_tokens"] == count * 8
        assert (level["requests"], level["ok"]) == (count, count)
        assert level["errors"] == {"total": 0, "by_kind": {}, "samples": []}
        assert level["itl_ms"]["count"] > 0
        assert level["output_tokens_per_s"] > 0
    assert png.read_bytes().startswith(PNG_MAGIC)

    # The saved results can be reported (and plotted) again.
    again = bench("report", str(out), "--plot", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_refuses_request_counts_that_do_not_match_the_levels() -> None:
    result = bench("run", "--url", "http://127.0.0.1:9/v1", "-c", "1,2", "-n", "3,4,5")
    assert result.returncode == 2
    assert "--requests gives 3 counts for 2 levels" in result.stderr
    result = bench("run", "--url", "http://127.0.0.1:9/v1", "-c", "1,2", "-n", "3,0")
    assert result.returncode == 2
    assert "one per level" in result.stderr


def test_cli_against_a_port_nobody_listens_on(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = bench(
        "run", "--url", url, "-c", "1,2", "-n", "2", "--max-tokens", "4", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1
    assert "4 of 4 requests failed" in result.stderr
    assert "Traceback" not in result.stderr
    levels = json.loads(out.read_text())["servers"][0]["levels"]
    assert [level["errors"]["by_kind"] for level in levels] == [{"connection": 2}] * 2
    assert all(level["ok"] == 0 for level in levels)


async def test_an_unknown_model_counts_http_errors(server: RunningServer) -> None:
    config = BenchConfig(
        targets=(Target("spigot", server.base_url, model="no-such-model"),),
        concurrency=(1,),
        requests=2,
        max_tokens=4,
        warmup=0,
    )
    results = await run_bench(config)
    (level,) = results["servers"][0]["levels"]
    assert level["ok"] == 0
    assert level["errors"]["by_kind"] == {"http_404": 2}
    assert "no-such-model" in level["errors"]["samples"][0]


async def test_the_per_request_timeout_is_honoured(server: RunningServer) -> None:
    config = BenchConfig(
        targets=(Target("spigot", server.base_url),),
        concurrency=(1,),
        requests=2,
        max_tokens=300,
        timeout=0.2,
        warmup=0,
    )
    results = await run_bench(config)
    (level,) = results["servers"][0]["levels"]
    assert level["errors"]["by_kind"] == {"timeout": 2}
    # Giving up closes the connection, and the server stops generating.
    stats = server.wait_idle()
    assert stats["running"] == 0
    assert stats["in_flight"] == 0


async def test_completions_endpoint_with_a_shared_prefix(server: RunningServer) -> None:
    config = BenchConfig(
        targets=(Target("spigot", server.base_url),),
        concurrency=(2,),
        requests=2,
        max_tokens=4,
        workload="shared-prefix",
        endpoint="completions",
        warmup=0,
        raw=True,
    )
    results = await run_bench(config)
    (level,) = results["servers"][0]["levels"]
    assert level["errors"]["total"] == 0, level["errors"]
    assert level["output_tokens"] == 2 * 4
    assert {s["prompt"] for s in level["samples"]} <= {p.id for p in load_workload("shared-prefix")}
    assert level["prompt_tokens_mean"] > 900


def test_synthetic_workloads_have_the_promised_lengths(server: RunningServer) -> None:
    def count(text: str) -> int:
        response = httpx.post(
            f"{server.root_url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30
        )
        assert response.status_code == 200, response.text
        return int(response.json()["count"])

    long_counts = [count(p.user) for p in load_workload("long")]
    assert all(950 <= n <= 2100 for n in long_counts), long_counts
    shared = load_workload("shared-prefix")
    assert 900 <= count(shared[0].system or "") <= 1300
    assert all(count(p.user) < 40 for p in shared)


def _split(text: str, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The text outside the named sections' markers, and each section's inside."""
    outside, inside = [], {}
    for name in names:
        head, _, rest = text.partition(start_marker(name))
        inside[name], _, text = rest.partition(end_marker(name))
        outside.append(head)
    return [*outside, text], inside


def test_standard_quick_rewrites_only_its_sections(tmp_path: Path) -> None:
    """``benchmarks.standard --quick`` on a copy of the docs: two parts redrawn, prose kept."""
    doc = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    doc.write_text(original)
    result = standard("--quick", "--only", "decode,prefix", "--out", str(doc))
    assert result.returncode == 0, result.stderr

    # Every section, in the order the file has them.
    names = ["machine", *(m for markers in MARKERS.values() for m in markers)]
    names.sort(key=lambda m: original.index(start_marker(m)))
    before_outside, before = _split(original, names)
    after_outside, after = _split(doc.read_text(), names)
    assert after_outside == before_outside
    for name in ("peers-llama-server", "peers-llama-cpp-python", "interference"):
        assert after[name] == before[name]
    for name in ("machine", "decode", "prefix"):
        assert after[name] != before[name]
    assert "| streams | bare loop tok/s | spigot serve tok/s | spigot / bare |" in after["decode"]
    assert "-m benchmarks.decode --url http://127.0.0.1:" in after["decode"]
    assert "--quick` trial run" in after["prefix"]
    assert "| cold |" in after["prefix"]
    assert "llama-cpp-python" in after["machine"]

    results = json.loads((tmp_path / "bench-results.json").read_text())
    assert set(results["sections"]) == {"decode", "prefix"}
    (prefix_round,) = results["sections"]["prefix"]["data"]["rounds"]
    assert prefix_round["cached_tokens"] > 0  # the warm request reused the cold one's prefix
    # ... and so did the restored one, from host memory this time.
    assert prefix_round["restored_cached_tokens"] > 0
    assert "| restored |" in after["prefix"]
    assert (tmp_path / "img" / "decode.png").read_bytes().startswith(PNG_MAGIC)

    # The results alone redraw the same document.
    drawn = doc.read_text()
    doc.write_text(original)
    again = standard("--render-only", "--out", str(doc))
    assert again.returncode == 0, again.stderr
    assert doc.read_text() == drawn


def test_unique_prompts_reach_the_server_tagged(server: RunningServer, tmp_path: Path) -> None:
    prompts = tmp_path / "one.json"
    prompts.write_text(json.dumps([{"id": "only", "prompt": "Name one colour."}]))
    means = {}
    for flag in ("--repeat-prompts", "--unique-prompts"):
        out = tmp_path / f"{flag}.json"
        result = bench(
            "run", "--url", server.base_url, "--concurrency", "1", "--requests", "3",
            "--max-tokens", "4", "--warmup", "0", "--prompts", str(prompts), flag,
            "--out", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (entry,) = json.loads(out.read_text())["servers"]
        (level,) = entry["levels"]
        assert level["ok"] == 3
        means[flag] = level["prompt_tokens_mean"]
    # The server's own usage counts the tag's tokens in every tagged prompt.
    assert means["--unique-prompts"] > means["--repeat-prompts"] + 2, means
    assert "each prompt tagged unique" in result.stdout
