"""The gateway's overhead: the same upstream streamed directly and through spigot.

Starts ``benchmarks.fast_upstream`` (a paced fake engine that costs next to
nothing) and ``spigot serve --upstream`` in front of it, then runs ``spigot
bench run`` against both, interleaved level by level (``--compare``), with
``--rounds`` rounds so that throughputs are medians. Reports per level the
TTFT p50 the gateway adds, its throughput as a share of direct, and the
gateway process's CPU time per streamed token (user + system, from /proc).

    python -m benchmarks.gateway --levels 1,8,64 --out build/gateway.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--token-ms", type=float, default=10.0, help="upstream pace per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-worker", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gateway.json")
    args = parser.parse_args()

    up_port, gw_port = _free_port(), _free_port()
    logs = Path(tempfile.mkdtemp(prefix="spigot-gateway-bench-"))
    python = sys.executable
    with (logs / "upstream.log").open("wb") as up_log, (logs / "gateway.log").open("wb") as gw_log:
        upstream = subprocess.Popen(
            [
                python,
                "-m",
                "benchmarks.fast_upstream",
                "--port",
                str(up_port),
                "--token-ms",
                str(args.token_ms),
            ],
            cwd=ROOT,
            stdout=up_log,
            stderr=subprocess.STDOUT,
        )
        gateway = subprocess.Popen(
            [
                python, "-m", "spigot", "serve", "--port", str(gw_port),
                "--upstream", f"fast=http://127.0.0.1:{up_port}/v1",
                "--db", str(logs / "ledger.db"), "--log-level", "warning",
            ],
            cwd=ROOT,
            stdout=gw_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        _wait(f"http://127.0.0.1:{gw_port}/health", gateway)
        levels = [int(x) for x in args.levels.split(",")]
        requests = ",".join(str(c * args.requests_per_worker) for c in levels)
        out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        cpu_before = cpu_seconds(gateway.pid)
        command = [
            python, "-m", "spigot", "bench", "run",
            "--url", f"http://127.0.0.1:{up_port}/v1", "--name", "direct",
            "--compare", f"http://127.0.0.1:{gw_port}/v1", "--compare-name", "gateway",
            "--model", "fast", "--compare-model", "fast",
            "-c", args.levels, "-n", requests, "--rounds", str(args.rounds),
            "--max-tokens", str(args.max_tokens), "--out", str(out), "-q",
        ]  # fmt: skip
        subprocess.run(command, cwd=ROOT, check=True)
        cpu = cpu_seconds(gateway.pid) - cpu_before
    finally:
        for process in (gateway, upstream):
            process.terminate()
            process.wait(timeout=30)
    results: dict[str, Any] = json.loads(out.read_text())
    gateway_levels = next(s for s in results["servers"] if s["name"] == "gateway")["levels"]
    tokens = sum(lv.get("output_tokens", 0) for lv in gateway_levels)
    summary = {
        "command": " ".join(["python -m benchmarks.gateway", *sys.argv[1:]]),
        "upstream_token_ms": args.token_ms,
        "levels": [
            {
                "concurrency": row["concurrency"],
                "ttft_p50_ms_direct": row["ttft_p50_ms"]["a"],
                "ttft_p50_ms_gateway": row["ttft_p50_ms"]["b"],
                "ttft_p50_added_ms": _minus(row["ttft_p50_ms"]["b"], row["ttft_p50_ms"]["a"]),
                "throughput_direct": row["output_tokens_per_s"]["a"],
                "throughput_gateway": row["output_tokens_per_s"]["b"],
                "throughput_ratio": row["output_tokens_per_s"]["b_over_a"],
                "errors": row["errors"],
            }
            for row in results["comparison"]
        ],
        "gateway_cpu_s": round(cpu, 2),
        "gateway_tokens": tokens,
        "gateway_cpu_us_per_token": round(cpu / tokens * 1e6, 1) if tokens else None,
    }
    results["gateway_summary"] = summary
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def _minus(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 2)


if __name__ == "__main__":
    raise SystemExit(main())
