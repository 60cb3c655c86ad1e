"""Prompt chunks sized by time: the estimates, and the engine using them on a timed fake model."""

from __future__ import annotations

from collections.abc import Callable

from spigot.engine.llamacpp.core import FALLBACK_PREFILL_TOKENS, EngineCore
from spigot.engine.llamacpp.scheduler import Scheduler, SchedulerConfig, Sequence, StepPlan
from spigot.engine.llamacpp.step_costs import StepCosts
from spigot.engine.types import GenRequest, Prompt, SamplingParams
from tests.unit.fake_model import FakeModel, token_of


def test_a_decode_step_is_timed_first_then_the_fallback_until_prompt_tokens_are() -> None:
    costs = StepCosts()
    assert costs.prompt_budget(2.5, 0.0, fallback=32) == 0  # a decode-only step, to time
    costs.record(decode_tokens=8, prompt_tokens=0, seconds=0.05)
    assert costs.prompt_budget(2.5, 0.0, fallback=32, decoding=8) == 32
    costs.record(decode_tokens=8, prompt_tokens=10, seconds=0.15)
    assert costs.prompt_budget(2.5, 0.0, fallback=32, decoding=8) == 7


def test_a_decode_only_step_is_due_again_after_a_run_of_mixed_steps() -> None:
    costs = StepCosts(remeasure_after=3)
    costs.record(decode_tokens=8, prompt_tokens=0, seconds=0.05)
    for _ in range(3):
        assert costs.prompt_budget(2.5, 0.0, fallback=32, decoding=8) > 0
        costs.record(decode_tokens=8, prompt_tokens=10, seconds=0.15)
    assert costs.prompt_budget(2.5, 0.0, fallback=32, decoding=8) == 0
    costs.record(decode_tokens=8, prompt_tokens=0, seconds=0.06)  # slower now: deeper
    assert costs.decode_step_s(8) > 0.05
    assert costs.prompt_budget(2.5, 0.0, fallback=32, decoding=8) > 0


def test_budget_is_the_slowdown_over_a_decode_step_in_prompt_tokens() -> None:
    costs = StepCosts()
    costs.record(decode_tokens=8, prompt_tokens=0, seconds=0.050)
    costs.record(decode_tokens=8, prompt_tokens=20, seconds=0.050 + 20 * 0.005)
    assert costs.decode_step_s(8) == 0.050
    assert abs(costs.prompt_token_s - 0.005) < 1e-12
    # 2.5x a 50 ms step leaves 75 ms for prompt tokens of 5 ms each.
    assert costs.prompt_budget(2.5, 0.0, fallback=1, decoding=8) == 15
    assert costs.prompt_budget(4.0, 0.0, fallback=1, decoding=8) == 30
    # A floor of prompt work wins when a decode step is quick.
    assert costs.prompt_budget(2.5, 0.2, fallback=1, decoding=8) == 40


def test_more_sequences_prefilling_than_decoding_tip_the_budget_towards_prompts() -> None:
    costs = StepCosts()
    costs.record(decode_tokens=1, prompt_tokens=0, seconds=0.010)
    costs.record(decode_tokens=1, prompt_tokens=10, seconds=0.010 + 10 * 0.002)
    # One stream decodes: 1.5 x 10 ms = 15 ms of prompt work, 7 tokens.
    assert costs.prompt_budget(2.5, 0.0, 1, decoding=1, prefilling=1) == 7
    # Seven bursts in behind it: seven times that.
    assert costs.prompt_budget(2.5, 0.0, 1, decoding=1, prefilling=7) == 52
    # No prompt waiting beyond the one: never less than the plain budget.
    assert costs.prompt_budget(2.5, 0.0, 1, decoding=1, prefilling=0) == 7


def test_decode_steps_are_kept_per_stream_count_and_read_off_a_line_between() -> None:
    costs = StepCosts(smoothing=1.0)
    costs.record(decode_tokens=4, prompt_tokens=0, seconds=0.020)
    assert costs.decode_step_s(4) == 0.020
    assert abs(costs.decode_step_s(2) - 0.010) < 1e-12  # one count seen: in proportion
    costs.record(decode_tokens=1, prompt_tokens=0, seconds=0.008)
    costs.record(decode_tokens=8, prompt_tokens=0, seconds=0.036)
    # The line through (1, 8 ms), (4, 20 ms), (8, 36 ms): 4 ms + 4 ms per stream.
    assert abs(costs.decode_step_s(32) - 0.132) < 1e-9
    assert abs(costs.decode_step_s(2) - 0.012) < 1e-9
    # A mixed step of 32 streams is charged their step, not one stream's.
    costs.record(decode_tokens=32, prompt_tokens=10, seconds=0.132 + 10 * 0.003)
    assert abs(costs.prompt_token_s - 0.003) < 1e-9


def test_only_mixed_steps_price_prompt_tokens_and_estimates_follow_change() -> None:
    costs = StepCosts(smoothing=0.5)
    costs.record(decode_tokens=0, prompt_tokens=100, seconds=0.3)
    assert costs.prompt_token_s is None and costs.decode_step_s(2) is None
    costs.record(decode_tokens=2, prompt_tokens=10, seconds=0.05)  # no decode step seen yet
    assert costs.prompt_token_s is None
    costs.record(decode_tokens=2, prompt_tokens=0, seconds=0.02)
    costs.record(decode_tokens=2, prompt_tokens=10, seconds=0.05)
    assert abs(costs.prompt_token_s - 0.003) < 1e-12
    # Deeper prompts cost more per token; the estimate moves towards it.
    costs.record(decode_tokens=2, prompt_tokens=10, seconds=0.11)
    assert abs(costs.prompt_token_s - 0.006) < 1e-12


def test_a_mixed_step_faster_than_a_decode_step_never_makes_prompt_tokens_free() -> None:
    costs = StepCosts()
    costs.record(decode_tokens=8, prompt_tokens=0, seconds=0.05)
    costs.record(decode_tokens=8, prompt_tokens=4, seconds=0.04)  # noise
    assert costs.prompt_token_s is not None and costs.prompt_token_s > 0
    assert costs.prompt_budget(2.5, 0.0, fallback=1, decoding=8) >= 1


def _engine(model: FakeModel, slowdown: float) -> tuple[EngineCore, list[StepPlan]]:
    scheduler = Scheduler(
        SchedulerConfig(
            max_running=4,
            kv_capacity=1000,
            max_step_tokens=64,
            prefill_chunk=64,
            prefill_chunk_decoding=64,
        )
    )
    plans: list[StepPlan] = []
    schedule = scheduler.schedule

    def recording_schedule(prefill_limit: Callable[[int, int], int] | None = None) -> StepPlan:
        plan = schedule(prefill_limit)
        plans.append(plan)
        return plan

    scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    core = EngineCore(model, scheduler, lambda outputs: None, slowdown, clock=model.clock)
    return core, plans


def _request(request_id: str, prompt_len: int) -> GenRequest:
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    return GenRequest(request_id, Prompt.of_tokens((token_of("a"),) * prompt_len), params, 0)


def _prompt_chunks(plans: list[StepPlan], request_id: str) -> list[int]:
    return [
        c.end - c.start
        for plan in plans
        for c in plan.chunks
        if c.seq.request_id == request_id and c.start < c.seq.num_prompt
    ]


def _run(core: EngineCore, steps: int) -> None:
    for _ in range(steps):
        core._step()


def test_engine_sizes_prompt_chunks_to_the_time_budget() -> None:
    # 40 ms per step plus 10 ms per token: a one-stream decode step is 50 ms,
    # so 2.5x leaves 75 ms for prompt tokens: 7 of them.
    model = FakeModel(step_seconds=lambda tokens: 0.04 + 0.01 * tokens)
    core, plans = _engine(model, slowdown=2.5)
    core.scheduler.add(Sequence.from_request(_request("a", 3)))
    _run(core, 5)  # a's prompt, then decode-only steps
    core.scheduler.add(Sequence.from_request(_request("b", 60)))
    _run(core, 6)
    chunks = _prompt_chunks(plans, "b")
    # Untimed at first: the fallback; then the budget.
    assert chunks[0] == FALLBACK_PREFILL_TOKENS
    assert chunks[1:] == [7, 7, 7, 7][: len(chunks) - 1] and len(chunks) >= 4
    # Mixed steps take 2.5x a decode-only step, give or take one token.
    mixed = [0.04 + 0.01 * (1 + n) for n in chunks[1:]]
    assert all(abs(t / 0.05 - 2.5) <= 0.2 for t in mixed)


def test_engine_prefills_whole_chunks_when_nobody_decodes_or_budget_is_off() -> None:
    model = FakeModel(step_seconds=lambda tokens: 0.04 + 0.01 * tokens)
    core, plans = _engine(model, slowdown=2.5)
    core.scheduler.add(Sequence.from_request(_request("a", 100)))
    _run(core, 2)
    assert _prompt_chunks(plans, "a") == [64, 36]

    model = FakeModel(step_seconds=lambda tokens: 0.04 + 0.01 * tokens)
    core, plans = _engine(model, slowdown=0)
    core.scheduler.add(Sequence.from_request(_request("a", 3)))
    _run(core, 5)
    core.scheduler.add(Sequence.from_request(_request("b", 100)))
    _run(core, 2)
    assert _prompt_chunks(plans, "b") == [63, 37]  # one token of the 64 decodes a
