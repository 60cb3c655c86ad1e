"""The continuous-batching scheduler, driven with hand-made requests and tokens."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spigot.engine.llamacpp.prefix_cache import (
    MIN_SAVED_TOKENS,
    DropKV,
    ForgetKV,
    LoadKV,
    SaveKV,
)
from spigot.engine.llamacpp.saved_prefixes import common_prefix_length
from spigot.engine.llamacpp.scheduler import (
    Chunk,
    Scheduler,
    SchedulerConfig,
    SeqStatus,
    Sequence,
    StepPlan,
)
from spigot.engine.types import FinishReason, GenRequest, Prompt, SamplingParams

_ids = itertools.count()


def make_seq(num_prompt: int, max_tokens: int = 1000, request_id: str | None = None) -> Sequence:
    rid = request_id if request_id is not None else f"req-{next(_ids)}"
    prompt = tuple(range(100, 100 + num_prompt))
    return Sequence.from_request(
        GenRequest(rid, Prompt.of_tokens(prompt), SamplingParams(max_tokens=max_tokens))
    )


def make_scheduler(
    max_running: int = 4,
    kv_capacity: int = 10_000,
    max_step_tokens: int = 64,
    prefill_chunk: int = 32,
    prefix_cache: bool = False,
    prefix_cache_tokens: int = 0,
    saved_prefix_tokens: int = 0,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_running,
            kv_capacity,
            max_step_tokens,
            prefill_chunk,
            prefix_cache,
            prefix_cache_tokens=prefix_cache_tokens,
            saved_prefix_tokens=saved_prefix_tokens,
        )
    )


def run_step(sched: Scheduler, token: int = 7) -> StepPlan:
    """One engine step: schedule, then sample ``token`` for every completed chunk."""
    plan = sched.schedule()
    sampled = {c.seq: token for c in plan.chunks if c.completes}
    sched.update(plan, sampled)
    return plan


def chunking_scheduler() -> Scheduler:
    """Three slots, 100-token prompt chunks, 50 while streams decode."""
    return Scheduler(
        SchedulerConfig(
            max_running=3,
            kv_capacity=10_000,
            max_step_tokens=512,
            prefill_chunk=100,
            prefill_chunk_decoding=50,
        )
    )


def chunk_of(plan: StepPlan, seq: Sequence) -> Chunk:
    found = [c for c in plan.chunks if c.seq is seq]
    assert len(found) == 1, f"{seq.request_id} has {len(found)} chunks"
    return found[0]


def sizes(plan: StepPlan) -> dict[str, int]:
    return {c.seq.request_id: c.end - c.start for c in plan.chunks}


# -- config --------------------------------------------------------------------


def test_config_rejects_step_smaller_than_running_set() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_running=8, kv_capacity=100, max_step_tokens=4, prefill_chunk=4)


def test_sequence_from_request() -> None:
    seq = make_seq(5, request_id="r")
    assert seq.tokens == [100, 101, 102, 103, 104]
    assert (seq.num_prompt, seq.num_computed, seq.num_generated, seq.num_pending) == (5, 0, 0, 5)
    assert seq.request_id == "r"
    assert seq.status is SeqStatus.WAITING and seq.slot is None


# -- admission -----------------------------------------------------------------


def test_admission_is_bounded_by_slots_and_the_rest_wait_fifo() -> None:
    sched = make_scheduler(max_running=2)
    seqs = [make_seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    assert sched.running == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    assert sorted(s.slot for s in seqs[:2]) == [0, 1]  # type: ignore[type-var]
    assert all(s.status is SeqStatus.RUNNING for s in seqs[:2])
    assert all(s.status is SeqStatus.WAITING and s.slot is None for s in seqs[2:])


def test_waiting_sequences_are_admitted_in_arrival_order() -> None:
    sched = make_scheduler(max_running=1)
    seqs = [make_seq(2) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    admitted: list[Sequence] = []
    while sched.has_work():
        run_step(sched)
        (current,) = sched.running
        if current not in admitted:
            admitted.append(current)
        sched.finish(current, FinishReason.STOP)
    assert admitted == seqs
    assert all(s.finish_reason is FinishReason.STOP for s in seqs)


def test_has_work() -> None:
    sched = make_scheduler()
    assert not sched.has_work()
    seq = make_seq(2)
    sched.add(seq)
    assert sched.has_work()
    run_step(sched)
    assert sched.has_work()
    sched.finish(seq, FinishReason.LENGTH)
    assert not sched.has_work()


def test_admission_waits_for_kv_room_when_something_runs() -> None:
    sched = make_scheduler(max_running=4, kv_capacity=20)
    a, b, c = make_seq(10), make_seq(9), make_seq(2)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    # a needs 10 + 1; b would need 9 + 1 more: 21 > 20. c must not jump the queue.
    assert sched.running == [a]
    assert list(sched.waiting) == [b, c]


def test_first_sequence_is_admitted_even_if_larger_than_the_pool() -> None:
    sched = make_scheduler(kv_capacity=8)
    big = make_seq(20)
    sched.add(big)
    sched.schedule()
    assert sched.running == [big]


# -- decode and prefill --------------------------------------------------------


def test_first_step_prefills_and_completes_short_prompts() -> None:
    sched = make_scheduler()
    a, b = make_seq(5), make_seq(3)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(c.seq, c.start, c.end) for c in plan.chunks] == [(a, 0, 5), (b, 0, 3)]
    assert all(c.completes for c in plan.chunks)
    sched.update(plan, {a: 1, b: 2})
    assert a.tokens[-1] == 1 and b.tokens[-1] == 2
    assert (a.num_computed, a.num_pending, a.num_generated) == (5, 1, 1)


def test_every_decoding_sequence_gets_exactly_one_token_per_step() -> None:
    sched = make_scheduler(max_running=3, max_step_tokens=8, prefill_chunk=8)
    seqs = [make_seq(2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # prefill all three (6 tokens)
    for step in range(1, 6):
        plan = run_step(sched, token=step)
        assert len(plan.chunks) == 3
        for s in seqs:
            chunk = chunk_of(plan, s)
            assert (chunk.start, chunk.end) == (2 + step - 1, 2 + step)
            assert s.num_generated == step + 1
            assert s.tokens[-1] == step


def test_sampled_token_goes_into_the_next_step() -> None:
    sched = make_scheduler()
    seq = make_seq(4)
    sched.add(seq)
    run_step(sched, token=42)
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert seq.tokens[chunk.start : chunk.end] == [42]
    assert chunk.completes


def test_long_prompt_is_chunked_while_others_keep_decoding() -> None:
    sched = make_scheduler(max_running=4, max_step_tokens=64, prefill_chunk=16)
    short = make_seq(4)
    sched.add(short)
    run_step(sched)  # short is now decoding
    long = make_seq(100)
    sched.add(long)

    chunks: list[tuple[int, int, bool]] = []
    while long.num_generated == 0:
        before = short.num_generated
        plan = sched.schedule()
        decode = chunk_of(plan, short)
        assert decode.end - decode.start == 1
        prefill = chunk_of(plan, long)
        assert prefill.end - prefill.start <= 16
        chunks.append((prefill.start, prefill.end, prefill.completes))
        sched.update(plan, {c.seq: 9 for c in plan.chunks if c.completes})
        assert short.num_generated == before + 1

    assert chunks == [(i, min(i + 16, 100), i + 16 >= 100) for i in range(0, 100, 16)]
    assert long.num_computed == 100 and long.num_pending == 1


def test_prefill_chunk_is_shared_by_all_prefilling_sequences() -> None:
    sched = make_scheduler(max_running=4, max_step_tokens=64, prefill_chunk=10)
    a, b = make_seq(7), make_seq(7)
    sched.add(a)
    sched.add(b)
    plan = run_step(sched)
    # Oldest first: a gets all 7, b the remaining 3.
    assert sizes(plan) == {a.request_id: 7, b.request_id: 3}
    assert chunk_of(plan, a).start == 0
    plan = sched.schedule()
    assert sizes(plan) == {a.request_id: 1, b.request_id: 4}
    assert chunk_of(plan, b).start == 3
    assert chunk_of(plan, b).completes


def test_step_tokens_never_exceed_max_step_tokens() -> None:
    sched = make_scheduler(max_running=4, max_step_tokens=6, prefill_chunk=100)
    decoders = [make_seq(1) for _ in range(3)]
    for s in decoders:
        sched.add(s)
    run_step(sched)
    long = make_seq(50)
    sched.add(long)
    plan = run_step(sched)
    assert plan.num_tokens == 6  # three decode tokens and three prompt tokens
    assert chunk_of(plan, long).end == 3
    for _ in range(5):
        assert run_step(sched).num_tokens <= 6


def test_chunk_completes_only_on_the_last_chunk() -> None:
    seq = make_seq(10)
    assert not Chunk(seq, 0, 4).completes
    assert not Chunk(seq, 4, 9).completes
    assert Chunk(seq, 9, 10).completes


def test_plan_num_tokens() -> None:
    a, b = make_seq(10), make_seq(3)
    plan = StepPlan([Chunk(a, 2, 7), Chunk(b, 0, 3)])
    assert plan.num_tokens == 8
    assert StepPlan().num_tokens == 0


# -- finish and abort ------------------------------------------------------------


def test_finish_frees_the_slot_for_the_next_step() -> None:
    sched = make_scheduler(max_running=1)
    a, b = make_seq(3), make_seq(3)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    slot = a.slot
    sched.finish(a, FinishReason.LENGTH)
    assert a.status is SeqStatus.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert sched.running == []
    run_step(sched)
    assert sched.running == [b] and b.slot == slot


def test_abort_waiting_sequence() -> None:
    sched = make_scheduler(max_running=1)
    a, b, c = make_seq(3), make_seq(3), make_seq(3)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    assert sched.abort(b.request_id) is b
    assert b.status is SeqStatus.FINISHED and b.finish_reason is FinishReason.ABORT
    assert list(sched.waiting) == [c]


def test_abort_running_sequence_frees_its_slot() -> None:
    sched = make_scheduler(max_running=1)
    a, b = make_seq(3), make_seq(3)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.abort(a.request_id) is a
    assert a.status is SeqStatus.FINISHED and a.finish_reason is FinishReason.ABORT
    assert sched.running == []
    plan = run_step(sched)
    assert sched.running == [b]
    assert chunk_of(plan, b).start == 0


def test_abort_unknown_request() -> None:
    sched = make_scheduler()
    sched.add(make_seq(2))
    assert sched.abort("nobody") is None
    assert len(sched.waiting) == 1


def test_sequence_aborted_during_a_step_is_not_updated() -> None:
    sched = make_scheduler()
    seq = make_seq(3)
    sched.add(seq)
    plan = sched.schedule()
    sched.abort(seq.request_id)
    sched.update(plan, {seq: 5})
    assert seq.tokens == [100, 101, 102]
    assert seq.num_computed == 0


def test_kv_used_counts_computed_tokens_of_running_sequences() -> None:
    sched = make_scheduler(prefill_chunk=4)
    a, b = make_seq(3), make_seq(6)
    sched.add(a)
    sched.add(b)
    assert sched.kv_used() == 0
    run_step(sched)  # a: 3, b: 1
    assert sched.kv_used() == 4
    sched.finish(a, FinishReason.STOP)
    assert sched.kv_used() == 1


# -- continuous batching ---------------------------------------------------------


def test_new_sequence_joins_at_the_very_next_step() -> None:
    sched = make_scheduler(max_running=2, max_step_tokens=16, prefill_chunk=16)
    a, b, c = make_seq(3), make_seq(3), make_seq(5)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    run_step(sched)
    assert c.status is SeqStatus.WAITING
    sched.finish(a, FinishReason.STOP)
    plan = run_step(sched)
    # c is admitted and prefilled in the same step in which b decodes.
    assert sched.running == [b, c]
    assert sizes(plan) == {b.request_id: 1, c.request_id: 5}
    assert c.slot == a.slot


# -- preemption ------------------------------------------------------------------


def test_preemption_drops_newest_and_recomputes_it_later() -> None:
    sched = make_scheduler(max_running=2, kv_capacity=20, max_step_tokens=16, prefill_chunk=16)
    a, b, c = make_seq(8), make_seq(8), make_seq(2)
    for s in (a, b, c):
        sched.add(s)
    plan = run_step(sched, token=1)  # both prefilled: 9 tokens each
    assert sizes(plan) == {a.request_id: 8, b.request_id: 8}
    assert list(sched.waiting) == [c]
    assert run_step(sched, token=2).preempted_slots == []  # 10 + 10 after this step
    assert run_step(sched, token=3).preempted_slots == []  # 11 + 11 tokens now
    b_slot = b.slot
    assert b_slot is not None

    plan = sched.schedule()  # the next step would hold 22 > 20
    assert plan.preempted_slots == [b_slot]
    assert b.status is SeqStatus.WAITING and b.slot is None
    assert b.num_computed == 0
    assert b.tokens == [*range(100, 108), 1, 2, 3]  # prompt and generated tokens kept
    assert list(sched.waiting) == [b, c]  # back at the front
    assert sched.running == [a]
    assert [c.seq for c in plan.chunks] == [a]
    sched.update(plan, {a: 4})

    # Not enough room for b yet, and c must not overtake it.
    plan = run_step(sched, token=5)
    assert sched.running == [a]
    assert list(sched.waiting) == [b, c]

    sched.finish(a, FinishReason.STOP)
    plan = sched.schedule()
    assert sched.running[0] is b
    chunk = chunk_of(plan, b)
    assert (chunk.start, chunk.end) == (0, 11)  # prompt plus generated, recomputed
    assert chunk.completes
    sched.update(plan, {s.seq: 6 for s in plan.chunks if s.completes})
    assert b.tokens == [*range(100, 108), 1, 2, 3, 6]
    assert b.num_generated == 4


def test_preemption_of_several_keeps_their_order() -> None:
    sched = make_scheduler(max_running=3, kv_capacity=30, max_step_tokens=32, prefill_chunk=32)
    a, b, c, d = make_seq(9), make_seq(9), make_seq(9), make_seq(1)
    for s in (a, b, c, d):
        sched.add(s)
    run_step(sched)  # 10 tokens each: 30, the whole pool
    assert sched.running == [a, b, c]
    # Pretend a grew by 12 tokens: 42 > 30 needs two victims, newest first.
    a.tokens.extend([7] * 12)
    b_slot, c_slot = b.slot, c.slot
    plan = sched.schedule()
    assert plan.preempted_slots == [c_slot, b_slot]
    assert b_slot is not None and c_slot is not None
    assert sched.running == [a]
    assert list(sched.waiting) == [b, c, d]  # oldest first, ahead of those never run


def test_a_lone_sequence_is_never_preempted() -> None:
    sched = make_scheduler(max_running=2, kv_capacity=10)
    seq = make_seq(9)
    sched.add(seq)
    for _ in range(5):
        assert run_step(sched).preempted_slots == []
    assert sched.running == [seq]


# -- random workloads --------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[SchedulerConfig, list[tuple[int, int, int]], set[int]]:
    max_running = draw(st.integers(1, 4))
    max_step_tokens = draw(st.integers(max_running, 24))
    prefill_chunk = draw(st.integers(1, 24))
    kv_capacity = draw(st.integers(8, 60))
    # (arrival step, prompt length, max_tokens); one sequence alone always fits.
    requests = draw(
        st.lists(
            st.tuples(st.integers(0, 10), st.integers(1, kv_capacity - 1), st.integers(1, 20)),
            min_size=1,
            max_size=8,
        )
    )
    requests = [(t, p, min(m, kv_capacity - p)) for t, p, m in sorted(requests, key=lambda r: r[0])]
    aborts = draw(st.sets(st.integers(0, len(requests) - 1), max_size=2))
    prefix_cache = draw(st.booleans())
    cfg = SchedulerConfig(max_running, kv_capacity, max_step_tokens, prefill_chunk, prefix_cache)
    return cfg, requests, aborts


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_random_workloads_keep_every_invariant(
    case: tuple[SchedulerConfig, list[tuple[int, int, int]], set[int]],
) -> None:
    cfg, requests, aborts = case
    sched = Scheduler(cfg)
    seqs = [make_seq(p, max_tokens=m, request_id=f"r{i}") for i, (_, p, m) in enumerate(requests)]
    first_admitted: list[Sequence] = []
    step = 0
    while step <= 10 or sched.has_work():
        assert step < 5000, "the scheduler stopped making progress"
        for i, (t, _, _) in enumerate(requests):
            if t == step:
                sched.add(seqs[i])
            if t + 3 == step and i in aborts:
                sched.abort(seqs[i].request_id)

        plan = sched.schedule()
        running = list(sched.running)
        assert len(running) <= cfg.max_running
        slots = [s.slot for s in running]
        assert len(set(slots)) == len(slots)
        assert all(slot is not None and 0 <= slot < cfg.max_running for slot in slots)
        assert not set(plan.preempted_slots) & set(slots)
        for s in running:
            if s not in first_admitted:
                first_admitted.append(s)

        assert plan.num_tokens <= cfg.max_step_tokens
        assert len({id(c.seq) for c in plan.chunks}) == len(plan.chunks)
        decoding = [s for s in running if s.num_computed > 0 and s.num_pending == 1]
        prefill_tokens = 0
        for c in plan.chunks:
            assert c.seq.status is SeqStatus.RUNNING
            assert c.start == c.seq.num_computed
            assert c.start < c.end <= len(c.seq.tokens)
            if c.seq not in decoding:
                prefill_tokens += c.end - c.start
        for s in decoding:
            assert chunk_of(plan, s).end - chunk_of(plan, s).start == 1
        assert prefill_tokens <= cfg.prefill_chunk
        if len(running) > 1:
            assert sum(len(s.tokens) for s in running) <= cfg.kv_capacity

        # Each sequence's n-th generated token is 1000 * index + n: a recompute
        # after preemption must keep them all, in order.
        sampled = {
            c.seq: 1000 * seqs.index(c.seq) + c.seq.num_generated
            for c in plan.chunks
            if c.completes
        }
        sched.update(plan, sampled)
        assert sched.kv_used() <= cfg.kv_capacity
        for seq in sampled:
            if seq.num_generated >= seq.request.params.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
        step += 1

    assert not sched.waiting and not sched.running
    # Sequences start in arrival order (all requests arrive in order of index).
    assert [int(s.request_id[1:]) for s in first_admitted] == sorted(
        int(s.request_id[1:]) for s in first_admitted
    )
    for i, seq in enumerate(seqs):
        assert seq.status is SeqStatus.FINISHED
        prompt = list(range(100, 100 + seq.num_prompt))
        assert seq.tokens[: seq.num_prompt] == prompt
        assert seq.tokens[seq.num_prompt :] == [1000 * i + n for n in range(seq.num_generated)]
        if seq.finish_reason is FinishReason.LENGTH:
            assert seq.num_generated == seq.request.params.max_tokens
        else:
            assert seq.finish_reason is FinishReason.ABORT


# -- prefix cache ------------------------------------------------------------------


def _run_to_finish(sched: Scheduler, seq: Sequence, outputs: int = 1) -> None:
    """Admit and prefill ``seq`` (unless it is queued already), sample
    ``outputs`` tokens, then finish it."""
    if seq.status is SeqStatus.WAITING and seq not in sched.waiting:
        sched.add(seq)
    for _ in range(1000):
        plan = sched.schedule()
        sampled = {c.seq: 7 for c in plan.chunks if c.completes}
        sched.update(plan, sampled)
        if seq.num_generated >= outputs:
            break
    sched.finish(seq, FinishReason.STOP)


def _prompted(tokens: list[int], request_id: str, scope: str = "") -> Sequence:
    return Sequence.from_request(
        GenRequest(
            request_id, Prompt.of_tokens(tokens), SamplingParams(max_tokens=8), cache_scope=scope
        )
    )


def test_finished_sequence_leaves_its_prefix_for_the_next_prompt() -> None:
    sched = make_scheduler(max_running=2, prefix_cache=True)
    system = list(range(500, 540))
    _run_to_finish(sched, _prompted([*system, 1, 2], "a"))
    sched.take_kv_ops()
    second = _prompted([*system, 3, 4, 5], "b")
    sched.add(second)
    plan = sched.schedule()
    # Only the new tail is computed; the slot's KV is cut where the prompts part.
    assert second.num_cached == len(system)
    assert chunk_of(plan, second).start == len(system)
    assert sched.take_kv_ops() == [(second.slot, len(system))]


def test_the_slot_with_the_longest_shared_prefix_is_chosen() -> None:
    sched = make_scheduler(max_running=3, prefix_cache=True, prefix_cache_tokens=100)
    a = _prompted([1, 2, 3, 4, 5, 6], "a")
    b = _prompted([1, 2, 9, 9], "b")
    _run_to_finish(sched, a)
    _run_to_finish(sched, b)
    c = _prompted([1, 2, 3, 4, 8], "c")
    sched.add(c)
    sched.schedule()
    assert c.slot == a.slot
    assert c.num_cached == 4


def test_identical_prompt_still_computes_its_last_token() -> None:
    sched = make_scheduler(max_running=1, prefix_cache=True)
    _run_to_finish(sched, _prompted([1, 2, 3], "a"))
    again = _prompted([1, 2, 3], "b")
    sched.add(again)
    plan = sched.schedule()
    chunk = chunk_of(plan, again)
    assert (chunk.start, chunk.end) == (2, 3) and chunk.completes


def test_cached_prefixes_are_evicted_before_anyone_is_preempted() -> None:
    sched = make_scheduler(max_running=3, kv_capacity=30, prefix_cache=True)
    old = _prompted(list(range(1, 11)), "old")
    _run_to_finish(sched, old)
    sched.take_kv_ops()
    assert sched.kv_cached() == 10
    big = _prompted(list(range(100, 125)), "big")
    sched.add(big)
    plan = sched.schedule()
    assert big in sched.running and not plan.preempted_slots
    assert (old.slot, 0) in sched.take_kv_ops()
    assert sched.kv_cached() == 0


def test_without_prefix_cache_a_finished_slot_is_cleared() -> None:
    sched = make_scheduler(max_running=1, prefix_cache=False)
    seq = _prompted([1, 2, 3], "a")
    _run_to_finish(sched, seq)
    assert sched.take_kv_ops()[-1] == (seq.slot, 0)
    assert sched.kv_cached() == 0


def _prompt_arriving_while_one_decodes(
    chunk_decoding: int, prefill_limit: Callable[[int, int], int] | None = None
) -> tuple[StepPlan, StepPlan, Sequence, Sequence]:
    """A 300-token prompt prefilled until it decodes and streaming, then a second one arriving:
    the plan of the very first step, the plan of the step the second joins, and
    the two sequences."""
    sched = Scheduler(
        SchedulerConfig(
            max_running=2,
            kv_capacity=10_000,
            max_step_tokens=512,
            prefill_chunk=100,
            prefill_chunk_decoding=chunk_decoding,
        )
    )
    first = make_seq(300, request_id="first")
    sched.add(first)
    opening = sched.schedule(prefill_limit)
    sched.update(opening, {})
    while first.num_generated == 0:
        plan = sched.schedule(prefill_limit)
        sched.update(plan, {c.seq: 5 for c in plan.chunks if c.completes})
    # One step of streaming before the second arrives (one arriving during
    # the step that gave the first its token would be part of a burst).
    sched.update(sched.schedule(prefill_limit), {first: 6})
    second = make_seq(300, request_id="second")
    sched.add(second)
    return opening, sched.schedule(prefill_limit), first, second


def test_prefill_chunk_is_smaller_while_others_decode() -> None:
    opening, plan, first, second = _prompt_arriving_while_one_decodes(10)
    assert chunk_of(opening, first).end == 100  # nobody decodes: the full chunk
    assert chunk_of(plan, first).end - chunk_of(plan, first).start == 1
    assert chunk_of(plan, second).end == 10  # first is decoding: the small chunk


def test_without_a_cache_budget_an_unrelated_prompt_replaces_the_oldest_cache() -> None:
    # Cached KV costs attention time at every step: with no budget for extra
    # prefixes, a prompt that matches nothing reuses a cached slot rather
    # than an empty one, so the pool holds only what active slots left.
    sched = make_scheduler(max_running=3, prefix_cache=True, prefix_cache_tokens=0)
    a = _prompted([1, 2, 3, 4], "a")
    _run_to_finish(sched, a)
    b = _prompted([7, 8, 9], "b")
    sched.add(b)
    sched.schedule()
    assert b.slot == a.slot and b.num_cached == 0
    assert sched.kv_cached() == 0


def test_a_cache_budget_keeps_several_prefixes() -> None:
    sched = make_scheduler(max_running=3, prefix_cache=True, prefix_cache_tokens=100)
    a = _prompted([1, 2, 3, 4], "a")
    _run_to_finish(sched, a)
    b = _prompted([7, 8, 9], "b")
    sched.add(b)
    sched.schedule()
    assert b.slot != a.slot
    assert sched.kv_cached() == 4  # a's prompt (its sampled token never reached the KV)


def test_prefill_limit_caps_prompt_tokens_only_while_others_decode() -> None:
    asked: list[tuple[int, int]] = []

    def limit(decoding: int, prefilling: int) -> int:
        asked.append((decoding, prefilling))
        return 7

    opening, plan, first, second = _prompt_arriving_while_one_decodes(50, limit)
    assert chunk_of(opening, first).end == 100 and opening.num_decode == 0  # nobody decodes
    assert plan.num_decode == 1
    assert chunk_of(plan, second).end == 7
    assert asked[-1] == (1, 1)  # one stream decodes, one prompt waits
    # Never beyond --prefill-chunk-decoding, whatever the limit says.
    _, plan, _, second = _prompt_arriving_while_one_decodes(50, lambda decoding, prefilling: 500)
    assert chunk_of(plan, second).end == 50


def recording_limit() -> tuple[list[tuple[int, int]], Callable[[int, int], int]]:
    """A prefill limit of 7 tokens that records what it was asked."""
    asked: list[tuple[int, int]] = []

    def limit(decoding: int, prefilling: int) -> int:
        asked.append((decoding, prefilling))
        return 7

    return asked, limit


def assert_a_later_prompt_is_paced(
    sched: Scheduler,
    limit: Callable[[int, int], int],
    asked: list[tuple[int, int]],
    burst_last: Sequence,
) -> None:
    """A prompt arriving a step after two streams started is paced against
    them, once ``burst_last``, the burst's last prompt, has its first token."""
    late = make_seq(300, request_id="late")
    sched.add(late)
    while burst_last.num_generated == 0:
        plan = sched.schedule(limit)
        sched.update(plan, {c.seq: 7 for c in plan.chunks if c.completes})
    assert asked == []
    plan = sched.schedule(limit)
    assert asked[-1] == (2, 1)  # two streams decode, one prompt waits
    assert sizes(plan)["late"] == 7


def test_a_burst_computes_its_prompts_at_full_chunks_after_the_first_decodes() -> None:
    # Prompts that arrived together: the first to finish its prompt decodes,
    # but its pace does not cap the others' prompt chunks, which then get
    # their first tokens as soon as computing every prompt allows.
    asked, limit = recording_limit()
    sched = chunking_scheduler()
    short, long = make_seq(60, request_id="short"), make_seq(300, request_id="long")
    sched.add(short)
    sched.add(long)
    opening = sched.schedule(limit)
    assert sizes(opening) == {"short": 60, "long": 40}
    sched.update(opening, {short: 5})
    plan = sched.schedule(limit)
    assert plan.num_decode == 1
    assert sizes(plan) == {"short": 1, "long": 50}  # --prefill-chunk-decoding, not 7
    assert asked == []
    sched.update(plan, {short: 6})
    assert_a_later_prompt_is_paced(sched, limit, asked, long)


def test_a_burst_whose_first_request_started_a_step_early_is_still_a_burst() -> None:
    # The engine takes up the first request of a burst alone; the rest arrive
    # while that step runs and are queued after it gave the first its token.
    # They arrived before that token, so they are not paced against it.
    asked, limit = recording_limit()
    sched = chunking_scheduler()
    first = make_seq(60, request_id="first")
    sched.add(first)
    opening = sched.schedule(limit)
    rest = make_seq(300, request_id="rest")  # arrived while the opening step ran
    sched.update(opening, {first: 5})
    sched.add(rest)
    plan = sched.schedule(limit)
    assert plan.num_decode == 1
    assert sizes(plan) == {"first": 1, "rest": 50}  # --prefill-chunk-decoding, not 7
    assert asked == []
    sched.update(plan, {first: 6})
    assert_a_later_prompt_is_paced(sched, limit, asked, rest)


def test_finished_sequences_leave_only_the_newest_cache_beyond_the_budget() -> None:
    # Sequences that ran side by side all leave caches when they finish; the
    # cached KV slows every later decode step, so beyond prefix_cache_tokens
    # only the newest stays.
    for budget, kept in ((0, 1), (10_000, 3)):
        sched = make_scheduler(max_running=4, prefix_cache=True, prefix_cache_tokens=budget)
        seqs = [make_seq(10) for _ in range(3)]
        for seq in seqs:
            sched.add(seq)
        run_step(sched)
        run_step(sched)
        for seq in seqs:
            sched.finish(seq, FinishReason.STOP)
        cached = sched.prefix_cache.cached_slots()
        assert len(cached) == kept, budget
        assert sched.kv_cached() == 11 * kept  # prompt plus the one token fed back
        newest = sched.prefix_cache.slot(seqs[-1].slot)
        assert newest.cached == seqs[-1].tokens[:11]
        dropped = {slot for slot, keep in sched.take_kv_ops() if keep == 0}
        assert dropped == {s.slot for s in seqs[: 3 - kept]}


def test_a_newcomer_served_from_cache_does_not_count_as_a_decoding_stream() -> None:
    # Its one pending prompt token rides with the decode tokens, but no stream
    # is decoding yet: the other newcomer's prompt gets the full chunk.
    sched = chunking_scheduler()
    system = list(range(500, 540))
    _run_to_finish(sched, _prompted(system, "a"))
    cached = _prompted(system, "b")
    fresh = _prompted(list(range(1000, 1200)), "c")
    sched.add(cached)
    sched.add(fresh)
    plan = sched.schedule(lambda decoding, prefilling: 7)
    assert plan.num_decode == 0
    assert chunk_of(plan, cached).end - chunk_of(plan, cached).start == 1
    assert chunk_of(plan, fresh).end == 100  # --prefill-chunk, not 7 nor 50


# -- the second tier: prefixes saved to host memory ---------------------------


def _saving_scheduler(saved_tokens: int = 10_000, **kwargs: int) -> Scheduler:
    return make_scheduler(
        max_running=kwargs.get("max_running", 2),
        kv_capacity=kwargs.get("kv_capacity", 10_000),
        prefix_cache=True,
        saved_prefix_tokens=saved_tokens,
    )


def test_an_evicted_cache_is_saved_before_it_is_dropped() -> None:
    sched = _saving_scheduler()
    a = _prompted(list(range(1, 41)), "a")
    _run_to_finish(sched, a)
    sched.take_kv_ops()
    b = _prompted(list(range(100, 130)), "b")  # matches nothing: replaces a's cache
    sched.add(b)
    sched.schedule()
    assert b.slot == a.slot
    ops = sched.take_kv_ops()
    assert [type(op) for op in ops] == [SaveKV, DropKV]
    assert ops[0].slot == a.slot and ops[1] == DropKV(a.slot, 0)
    assert sched.saved.tokens == 40  # a's prompt (its sampled token never reached the KV)


def test_a_prompt_matching_a_saved_prefix_loads_it_instead_of_computing() -> None:
    sched = _saving_scheduler()
    shared = list(range(1, 41))
    _run_to_finish(sched, _prompted([*shared, 7, 7], "a"))
    _run_to_finish(sched, _prompted(list(range(100, 130)), "b"))  # a's cache goes to host
    sched.take_kv_ops()
    c = _prompted([*shared, 5, 6], "c")
    sched.add(c)
    plan = sched.schedule()
    ops = sched.take_kv_ops()
    load = next(op for op in ops if isinstance(op, LoadKV))
    assert load.slot == c.slot
    # a's prompt goes on past c's: the copy is cut where the prompts part.
    assert ops[ops.index(load) + 1] == DropKV(c.slot, len(shared))
    assert c.num_cached == len(shared)
    assert chunk_of(plan, c).start == len(shared)


def test_only_the_prompt_part_of_a_cache_is_saved() -> None:
    sched = _saving_scheduler()
    a = _prompted(list(range(1, 41)), "a")
    _run_to_finish(sched, a, outputs=5)  # 4 generated tokens reached the KV
    _run_to_finish(sched, _prompted(list(range(100, 130)), "b"))
    ops = sched.take_kv_ops()
    save = ops.index(next(op for op in ops if isinstance(op, SaveKV)))
    assert ops[save - 1 : save + 2] == [
        DropKV(a.slot, 40),
        SaveKV(a.slot, ops[save].entry),
        DropKV(a.slot, 0),
    ]
    assert sched.saved.tokens == 40


def test_a_slot_cache_as_good_as_the_saved_one_needs_no_copy() -> None:
    sched = _saving_scheduler()
    shared = list(range(1, 41))
    _run_to_finish(sched, _prompted(shared, "a"))
    sched.take_kv_ops()
    b = _prompted([*shared, 9], "b")
    sched.add(b)
    sched.schedule()
    assert not any(isinstance(op, (LoadKV, SaveKV)) for op in sched.take_kv_ops())
    assert b.num_cached == len(shared)


def test_short_caches_are_not_worth_saving() -> None:
    sched = _saving_scheduler()
    _run_to_finish(sched, _prompted(list(range(1, MIN_SAVED_TOKENS - 1)), "a"))
    _run_to_finish(sched, _prompted(list(range(100, 130)), "b"))
    assert not any(isinstance(op, SaveKV) for op in sched.take_kv_ops())
    assert sched.saved.tokens == 0


def test_a_full_store_forgets_its_least_recently_used_prefix() -> None:
    sched = _saving_scheduler(saved_tokens=50)
    prompts = [list(range(base, base + 30)) for base in (1000, 2000, 3000)]
    for i, prompt in enumerate(prompts):
        _run_to_finish(sched, _prompted(prompt, f"p{i}"))
    ops = sched.take_kv_ops()
    saves = [op for op in ops if isinstance(op, SaveKV)]
    forgets = [op for op in ops if isinstance(op, ForgetKV)]
    assert len(saves) == 2  # the first two were replaced in turn; the newest stays in KV
    assert forgets == [ForgetKV(saves[0].entry)]
    assert sched.saved.tokens <= 50


def test_a_failed_load_makes_the_sequence_compute_its_prompt() -> None:
    sched = _saving_scheduler()
    shared = list(range(1, 41))
    _run_to_finish(sched, _prompted(shared, "a"))
    _run_to_finish(sched, _prompted(list(range(100, 130)), "b"))
    c = _prompted([*shared, 5], "c")
    sched.add(c)
    sched.schedule()
    load = next(op for op in sched.take_kv_ops() if isinstance(op, LoadKV))
    sched.load_failed(load.slot, load.entry)
    assert c.num_computed == 0 and c.num_cached == 0
    assert sched.saved.longest_match(shared) == (None, 0)
    plan = sched.schedule()
    assert chunk_of(plan, c).start == 0


# -- cache scopes: a prefix is reused only by the scope that computed it ---------


def test_a_cached_prefix_is_reused_only_within_its_scope() -> None:
    sched = make_scheduler(max_running=3, prefix_cache=True, prefix_cache_tokens=1000)
    system = list(range(500, 540))
    a = _prompted([*system, 1, 2], "a", scope="key:1")
    _run_to_finish(sched, a)
    # Another key sending the same prompt computes all of it: no cached count,
    # no shorter time to first token, nothing learnt about key:1's prompt.
    b = _prompted([*system, 1, 2], "b", scope="key:2")
    sched.add(b)
    plan = sched.schedule()
    assert b.num_cached == 0 and chunk_of(plan, b).start == 0
    assert b.slot != a.slot  # within the cache budget an empty slot is taken
    _run_to_finish(sched, b)
    again = _prompted([*system, 3], "a2", scope="key:1")
    sched.add(again)
    sched.schedule()
    assert again.slot == a.slot and again.num_cached == len(system)


def test_another_scopes_cache_is_taken_over_but_never_reused() -> None:
    # No cache budget: a prompt that matches nothing of its own takes over the
    # least recently freed cache, even one with the very same tokens.
    sched = make_scheduler(max_running=2, prefix_cache=True)
    prompt = list(range(1, 31))
    a = _prompted(prompt, "a", scope="key:1")
    _run_to_finish(sched, a)
    sched.take_kv_ops()
    b = _prompted(prompt, "b", scope="key:2")
    sched.add(b)
    plan = sched.schedule()
    assert b.slot == a.slot
    assert b.num_cached == 0 and chunk_of(plan, b).start == 0
    assert sched.take_kv_ops() == [DropKV(a.slot, 0)]  # all of key:1's KV goes first
    _run_to_finish(sched, b)
    # The slot now caches key:2's prompt, for key:2 only.
    c = _prompted([*prompt, 9], "c", scope="key:1")
    sched.add(c)
    sched.schedule()
    assert c.num_cached == 0


def test_saved_prefixes_are_loaded_only_within_their_scope() -> None:
    sched = _saving_scheduler()
    shared = list(range(1, 41))
    _run_to_finish(sched, _prompted([*shared, 7, 7], "a", scope="key:1"))
    _run_to_finish(sched, _prompted(list(range(100, 130)), "b", scope="key:1"))  # a to host
    assert sched.saved.tokens == len(shared) + 2
    sched.take_kv_ops()
    other = _prompted([*shared, 5, 6], "other", scope="key:2")
    sched.add(other)
    plan = sched.schedule()
    assert not any(isinstance(op, LoadKV) for op in sched.take_kv_ops())
    assert other.num_cached == 0 and chunk_of(plan, other).start == 0
    mine = _prompted([*shared, 5, 6], "mine", scope="key:1")
    sched.add(mine)
    sched.schedule()
    assert any(isinstance(op, LoadKV) for op in sched.take_kv_ops())
    assert mine.num_cached == len(shared)


@st.composite
def scoped_workloads(draw: st.DrawFn) -> tuple[SchedulerConfig, list[tuple[int, str, list[int]]]]:
    max_running = draw(st.integers(1, 3))
    cfg = SchedulerConfig(
        max_running,
        kv_capacity=draw(st.integers(100, 400)),
        max_step_tokens=draw(st.integers(max_running, 48)),
        prefill_chunk=draw(st.integers(1, 48)),
        prefix_cache=True,
        prefix_cache_tokens=draw(st.sampled_from([0, 60, 1000])),
        saved_prefix_tokens=draw(st.sampled_from([0, 50, 1000])),
    )
    # Prompts built from a few shared openings, so that caches match often.
    openings = [list(range(1000 * i, 1000 * i + 30)) for i in range(1, 4)]
    requests = draw(
        st.lists(
            st.tuples(
                st.integers(0, 30),
                st.sampled_from(["key:1", "key:2", "anonymous"]),
                st.sampled_from(openings),
                st.lists(st.integers(1, 5), max_size=6),
            ),
            min_size=1,
            max_size=10,
        )
    )
    return cfg, [(t, scope, [*opening, *tail]) for t, scope, opening, tail in sorted(requests)]


@settings(max_examples=200, deadline=None)
@given(scoped_workloads())
def test_random_workloads_never_reuse_another_scopes_tokens(
    case: tuple[SchedulerConfig, list[tuple[int, str, list[int]]]],
) -> None:
    cfg, requests = case
    sched = Scheduler(cfg)
    seqs = [_prompted(tokens, f"r{i}", scope) for i, (_, scope, tokens) in enumerate(requests)]
    admitted: list[Sequence] = []
    step = 0
    while step <= 30 or sched.has_work():
        assert step < 5000, "the scheduler stopped making progress"
        for seq, (t, _, _) in zip(seqs, requests, strict=True):
            if t == step:
                sched.add(seq)
        waiting = set(sched.waiting)
        plan = sched.schedule()
        for seq in sched.running:
            if seq in waiting:  # admitted (or readmitted) in this step
                # Whatever KV it starts with, a sequence of its own scope computed.
                own = [
                    common_prefix_length(other.tokens, seq.tokens)
                    for other in admitted
                    if other is not seq and other.request.cache_scope == seq.request.cache_scope
                ]
                assert seq.num_computed <= max(own, default=0), (seq.request_id, own)
                if seq not in admitted:
                    admitted.append(seq)
        sampled = {c.seq: 7 for c in plan.chunks if c.completes}
        sched.update(plan, sampled)
        for seq in sampled:
            if seq.num_generated >= 3:
                sched.finish(seq, FinishReason.LENGTH)
        step += 1
    assert all(seq.status is SeqStatus.FINISHED for seq in seqs)
