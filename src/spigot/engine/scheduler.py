"""Continuous batching, as pure Python: which tokens of which sequences go into the next step.

Every step the scheduler:

1. admits waiting sequences while a slot (llama.cpp sequence id) is free and
   the KV pool has room for their tokens;
2. gives every running sequence that has a sampled token pending exactly one
   decode token, so running streams advance every step;
3. fills the rest of the step's prefill budget with prompt chunks, oldest
   sequence first, so a long prompt is spread over several steps instead of
   freezing the running streams;
4. if the KV pool would overflow, preempts the newest running sequences: their
   KV is dropped and they wait again, to be recomputed from their tokens
   (prompt plus what they generated), so no accepted request is lost.

``update`` then records what a step produced. No llama.cpp in here: tests
drive it with hand-made tokens.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from spigot.engine.types import FinishReason, GenRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request: GenRequest
    tokens: list[int]
    num_prompt: int
    num_computed: int = 0  # tokens whose KV is in the cache
    slot: int | None = None
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    runtime: Any = None  # the engine's per-sequence state (sampler, text assembler)

    @classmethod
    def from_request(cls, request: GenRequest) -> Sequence:
        return cls(request, list(request.prompt_token_ids), len(request.prompt_token_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of one sequence's tokens to feed in this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def completes(self) -> bool:
        """After this chunk, every token of the sequence is computed: sample next."""
        return self.end == len(self.seq.tokens)


@dataclass(slots=True)
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted_slots: list[int] = field(default_factory=list)  # their KV must be dropped

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int  # slots: llama.cpp sequence ids 0..max_running-1
    kv_capacity: int  # tokens in the shared KV pool
    max_step_tokens: int  # tokens one decode call may carry (n_batch)
    prefill_chunk: int  # most prompt tokens fed in one step, all sequences together

    def __post_init__(self) -> None:
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must cover one decode token per running sequence")


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots: list[int] = list(range(config.max_running - 1, -1, -1))

    # -- queue -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_used(self) -> int:
        return sum(s.num_computed for s in self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a sequence wherever it is; the caller frees its KV if it had a slot."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = FinishReason.ABORT
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            assert seq.slot is not None
            self._free_slots.append(seq.slot)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    # -- one step --------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._admit()
        self._preempt_if_full(plan)

        budget = self.config.max_step_tokens
        # Decode first: every sequence with a sampled token pending advances.
        for seq in self.running:
            if seq.num_pending == 1 and seq.num_computed > 0:
                plan.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + 1))
                budget -= 1
        prefill = min(budget, self.config.prefill_chunk)
        for seq in self.running:
            if prefill <= 0:
                break
            if seq.num_computed == 0 or seq.num_pending > 1:
                n = min(seq.num_pending, prefill)
                plan.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                prefill -= n
        return plan

    def update(self, plan: StepPlan, sampled: dict[Sequence, int]) -> None:
        """Record a decoded step: chunks are now in KV; completed ones got a token."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed = chunk.end
            token = sampled.get(seq)
            if token is not None:
                seq.tokens.append(token)

    def _admit(self) -> None:
        # Room for every running sequence's tokens plus the one each will add.
        used = sum(len(s.tokens) + 1 for s in self.running)
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            need = len(seq.tokens) + 1
            if used + need > self.config.kv_capacity and self.running:
                break
            self.waiting.popleft()
            seq.slot = self._free_slots.pop()
            seq.status = SeqStatus.RUNNING
            seq.num_computed = 0
            self.running.append(seq)
            used += need

    def _preempt_if_full(self, plan: StepPlan) -> None:
        # Each running sequence will hold all of its tokens after the step.
        while len(self.running) > 1 and sum(len(s.tokens) for s in self.running) > (
            self.config.kv_capacity
        ):
            victim = self.running[-1]
            assert victim.slot is not None
            plan.preempted_slots.append(victim.slot)
            self.preempt(victim)

    def preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's KV and queue it first for recompute."""
        if seq.status is not SeqStatus.RUNNING:
            return
        self.running.remove(seq)
        assert seq.slot is not None
        self._free_slots.append(seq.slot)
        seq.slot = None
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)
