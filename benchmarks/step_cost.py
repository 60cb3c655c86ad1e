"""What one engine step costs on this machine, without a server: the figures the
prefill time budget and the prefix-cache default rest on.

On the embedded model, with the server's context settings:

* a decode step for 1 and 8 streams;
* what prompt tokens add to a step beside 8 decoding streams, near the start
  of a context and deep into one;
* a decode step for 1 and 8 streams with cached KV of other, finished
  sequences left in the pool (llama.cpp attends over the used range);
* copying a 1,000-token sequence's KV to host memory and back (the prefix
  cache's second tier), against computing those tokens.

Medians of a few steps each; random token ids (their values do not change the
work).

    python -m benchmarks.step_cost
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from spigot.engine.llamacpp import ContextOptions, LlamaCppModel, set_native_logging
from spigot.models import embedded_model_path

STREAM_DEPTH = 450  # tokens each decoding stream already holds


class Bench:
    def __init__(self, threads: int, parallel: int) -> None:
        set_native_logging(False)
        self.model = LlamaCppModel(
            embedded_model_path(),
            ContextOptions(n_ctx=8192, n_seq_max=parallel, n_batch=512, n_threads=threads),
        )
        self._random = random.Random(1)

    def tokens(self, n: int) -> list[int]:
        return [self._random.randrange(1000, 20000) for _ in range(n)]

    def fill(self, seq: int, n: int, start: int = 0) -> None:
        """Put ``n`` tokens of KV into sequence ``seq``, 256 per decode."""
        batch = self.model.batch
        for at in range(start, start + n, 256):
            batch.clear()
            batch.add(seq, self.tokens(min(256, start + n - at)), at, False)
            if self.model.decode() != 0:
                raise RuntimeError("llama_decode failed")

    def step(self, streams: int, pos: int, prompt: tuple[int, int, int] | None = None) -> float:
        """One step: a token for each of ``streams`` sequences at ``pos``, plus
        ``prompt`` = (sequence, start, count) tokens of another; its seconds."""
        batch = self.model.batch
        batch.clear()
        for s in range(streams):
            batch.add(s, self.tokens(1), pos, True)
        if prompt is not None:
            seq, start, count = prompt
            batch.add(seq, self.tokens(count), start, True)
        started = time.perf_counter()
        if self.model.decode() != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    def copy_out_and_in(self, seq: int, tries: int = 5) -> tuple[float, float]:
        """Median seconds to save sequence ``seq``'s KV to host memory and to load it back."""
        saves, loads = [], []
        for _ in range(tries):
            started = time.perf_counter()
            data = self.model.save_sequence(seq)
            saves.append(time.perf_counter() - started)
            if data is None:
                raise RuntimeError("llama.cpp saved nothing")
            started = time.perf_counter()
            if not self.model.load_sequence(seq, data):
                raise RuntimeError("the saved KV did not load back")
            loads.append(time.perf_counter() - started)
            data.close()
        return statistics.median(saves), statistics.median(loads)

    def decode_step(self, streams: int, steps: int = 15) -> float:
        """Median decode-only step for ``streams`` streams; their KV is put back after."""
        times = [self.step(streams, STREAM_DEPTH + i) for i in range(steps)]
        for s in range(streams):
            self.model.remove_sequence(s, STREAM_DEPTH)
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bench = Bench(args.threads, parallel=32)
    for s in range(8):
        bench.fill(s, STREAM_DEPTH)
    plain = {n: bench.decode_step(n) for n in (1, 8)}
    print(f"{args.threads} threads; decoding streams hold {STREAM_DEPTH} tokens each")
    for n, seconds in plain.items():
        print(f"decode step, {n} stream(s): {seconds * 1000:.1f} ms")

    prompt_seq, depth = 9, 0
    for target in (0, 1024, 2048):
        bench.fill(prompt_seq, target - depth, start=depth)
        depth = target
        for count in (8, 32):
            times = []
            for _ in range(3):
                times.append(bench.step(8, STREAM_DEPTH, (prompt_seq, depth, count)))
                bench.model.remove_sequence(prompt_seq, depth)
                for s in range(8):
                    bench.model.remove_sequence(s, STREAM_DEPTH)
            extra = statistics.median(times) - plain[8]
            print(
                f"8 streams + {count} prompt tokens {depth} deep: "
                f"{extra / count * 1000:.2f} ms per prompt token"
            )
    bench.model.remove_sequence(prompt_seq)

    cached_seq = 10
    for cached in (2000, 4000):
        bench.fill(cached_seq, 2000)
        cached_seq += 1
        for n in (1, 8):
            with_cache = bench.decode_step(n)
            print(
                f"decode step, {n} stream(s), {cached} cached tokens of finished sequences: "
                f"{with_cache * 1000:.1f} ms ({with_cache / plain[n]:.2f}x)"
            )
    for seq in range(10, cached_seq):
        bench.model.remove_sequence(seq)

    copied = 20
    started = time.perf_counter()
    bench.fill(copied, 1000)
    computed = time.perf_counter() - started
    save, load = bench.copy_out_and_in(copied)
    print(
        f"1000 tokens of KV: saved to host memory in {save * 1000:.1f} ms, loaded back in "
        f"{load * 1000:.1f} ms; computing them took {computed * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
