"""Local-model serving of two spigot versions, side by side: does a change regress?

Starts ``spigot serve`` (the embedded model, no metering) from this checkout
and from another source tree (a ``git worktree`` of the baseline commit, run
with this venv through ``PYTHONPATH``), then ``spigot bench run --compare``
interleaves them level by level with ``--rounds`` rounds (medians).

    git worktree add /tmp/base <commit>
    python -m benchmarks.versions --baseline /tmp/base -c 1,8 --out build/versions.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gateway import _free_port, _wait

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other source tree")
    parser.add_argument("-c", "--levels", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "versions.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="spigot-versions-"))
    ports = {"this": _free_port(), "baseline": _free_port()}
    trees = {"this": ROOT / "src", "baseline": args.baseline.resolve() / "src"}
    processes = {}
    for name, port in ports.items():
        env = {**os.environ, "PYTHONPATH": str(trees[name])}
        with (logs / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "spigot", "serve", "--port", str(port), "--no-metering"],
                env=env,
                cwd=logs,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    try:
        for name, port in ports.items():
            _wait(f"http://127.0.0.1:{port}/health", processes[name])
        levels = [int(x) for x in args.levels.split(",")]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable, "-m", "spigot", "bench", "run",
                "--url", f"http://127.0.0.1:{ports['baseline']}/v1", "--name", "baseline",
                "--compare", f"http://127.0.0.1:{ports['this']}/v1", "--compare-name", "this",
                "-c", args.levels,
                "-n", ",".join(str(c * args.requests_per_worker) for c in levels),
                "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens),
                "--out", str(args.out), "-q",
            ],
            cwd=ROOT,
            check=True,
        )  # fmt: skip
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
