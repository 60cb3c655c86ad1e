"""Why one thread decodes: a second OpenMP team slows every ggml barrier.

llama-cpp-python builds ggml with OpenMP. libgomp keeps a team of worker
threads for every thread that ever ran a parallel region (a ggml graph), and
once the process holds more of them than cores it stops spinning at barriers.
This times one stream of the bare decode loop (``benchmarks.decode``) on a
worker thread, each scenario in a fresh process, rounds alternating:

* ``alone``: no other thread of the process ever decoded;
* ``beside an idle team``: the main thread first decoded one token on a
  second context of the same model, as the engine's start-up probe once did;
* the same with ``OMP_WAIT_POLICY=active``, the usual advice for spinning.

    python -m benchmarks.omp_teams --rounds 3 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.decode import bare_decode
from spigot.engine.llamacpp import ContextOptions, LlamaCppModel, set_native_logging
from spigot.models import embedded_model_path

ROOT = Path(__file__).resolve().parents[1]  # the repository
# name -> (the main thread decodes first, extra environment)
SCENARIOS: dict[str, tuple[bool, dict[str, str]]] = {
    "alone": (False, {}),
    "beside an idle team": (True, {}),
    "beside an idle team, OMP_WAIT_POLICY=active": (True, {"OMP_WAIT_POLICY": "active"}),
}


def _model(threads: int) -> LlamaCppModel:
    options = ContextOptions(n_ctx=8192, n_seq_max=1, n_batch=512, n_threads=threads)
    return LlamaCppModel(embedded_model_path(), options)


def measure(main_decodes_first: bool, tokens: int, threads: int) -> float:
    """One stream's tokens/s, decoded on a worker thread of this process."""
    set_native_logging(False)
    if main_decodes_first:
        other = _model(threads)
        other.batch.clear()
        other.batch.add(0, [max(other.bos_id, 0)], 0, True)
        if other.decode() != 0:
            raise RuntimeError("the main thread's decode failed")
    model = _model(threads)
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(bare_decode(model, 1, tokens)))
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError("the worker thread's decode failed")
    return result[0]


def run_scenario(name: str, tokens: int, threads: int) -> float:
    """``measure`` in a fresh process, so that no team outlives a scenario."""
    _, env = SCENARIOS[name]
    command = [sys.executable, "-m", "benchmarks.omp_teams", "--measure", name]
    command += ["--tokens", str(tokens), "--threads", str(threads)]
    done = subprocess.run(
        command,
        env={**os.environ, **env},
        cwd=ROOT,  # where ``benchmarks`` imports from
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])


def compare(rounds: int, tokens: int, threads: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    for round_no in range(rounds):
        order = list(SCENARIOS) if round_no % 2 == 0 else list(reversed(SCENARIOS))
        for name in order:
            results[name].append(run_scenario(name, tokens, threads))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        main_first, _ = SCENARIOS[args.measure]
        speed = measure(main_first, args.tokens, args.threads)
        print(json.dumps({"tokens_per_s": speed}))
        return
    results = compare(args.rounds, args.tokens, args.threads)
    print(f"one stream on a worker thread, {args.tokens} tokens, medians of {args.rounds} rounds")
    print("| scenario | tok/s | rounds |")
    print("|---|---|---|")
    for name, speeds in results.items():
        each = ", ".join(f"{s:.1f}" for s in speeds)
        print(f"| {name} | {statistics.median(speeds):.1f} | {each} |")


if __name__ == "__main__":
    main()
