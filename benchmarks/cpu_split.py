"""Where one stream's CPU goes: each thread of `spigot serve`, and the client, per token.

Starts a server, streams ``--tokens`` tokens to one client in this process,
and reads each server thread's CPU time from ``/proc`` before and after (Linux
only). On a machine whose cores all decode (``--threads`` = cores), every
millisecond the event loop or the client spends per token is taken from
llama.cpp's threads, which is why one stream over HTTP cannot reach a bare
decode loop's speed there.

    python -m benchmarks.cpu_split --tokens 1024
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from pathlib import Path

from benchmarks.decode import server_decode, start_server

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """Seconds of CPU (user + system) per thread id of a process."""
    times: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return times


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8798)
    args = parser.parse_args()

    server = start_server(args.port, args.threads, 1)
    url = f"http://127.0.0.1:{args.port}/v1"
    try:
        pid = server.pid  # type: ignore[attr-defined]
        asyncio.run(server_decode(url, 1, 16))  # warm up: threads exist, caches filled
        before, client_before, wall_before = thread_cpu(pid), own_cpu(), time.perf_counter()
        rate = asyncio.run(server_decode(url, 1, args.tokens))
        after, client_after, wall = thread_cpu(pid), own_cpu(), time.perf_counter()
    finally:
        server.terminate()  # type: ignore[attr-defined]
        server.wait()  # type: ignore[attr-defined]

    per_token = 1000 / args.tokens
    print(f"one stream, {args.tokens} tokens, {args.threads} llama.cpp threads: {rate:.1f} tok/s")
    print(f"wall: {(wall - wall_before) * per_token:.2f} ms per token")
    spent = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
    for seconds, tid in spent:
        if seconds * per_token < 0.01:
            continue
        name = "main thread (event loop, HTTP)" if tid == pid else f"thread {tid}"
        print(f"server {name}: {seconds * per_token:.2f} ms CPU per token")
    print(
        f"client (this process): {(client_after - client_before) * per_token:.2f} ms CPU per token"
    )


if __name__ == "__main__":
    main()
