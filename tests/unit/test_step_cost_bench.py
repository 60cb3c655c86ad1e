"""benchmarks.step_cost on the real embedded model: its steps decode, its KV bookkeeping holds."""

from __future__ import annotations

from benchmarks.step_cost import STREAM_DEPTH, Bench


def test_decode_steps_leave_the_streams_as_they_were() -> None:
    bench = Bench(threads=2, parallel=4)
    try:
        for s in range(2):
            bench.fill(s, STREAM_DEPTH)
        first = bench.decode_step(2, steps=3)
        # Every step's tokens were removed again: the same steps decode once more
        # (llama.cpp refuses positions that do not follow the KV).
        again = bench.decode_step(2, steps=3)
        assert first > 0 and again > 0
        assert bench.step(2, STREAM_DEPTH, (3, 0, 8)) > 0  # plus a prompt chunk
    finally:
        bench.model.close()


def test_a_saved_sequence_loads_back_with_its_tokens() -> None:
    bench = Bench(threads=2, parallel=2)
    try:
        bench.fill(0, 40)
        save, load = bench.copy_out_and_in(0, tries=2)
        assert save > 0 and load > 0
        # The KV came back whole: the next position decodes, the one after it too.
        assert bench.step(1, 40) > 0
        assert bench.step(1, 41) > 0
    finally:
        bench.model.close()
