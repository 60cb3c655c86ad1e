"""Continuous batching, as pure Python: which tokens of which sequences go into the next step.

Every step the scheduler:

1. admits waiting sequences while a slot (llama.cpp sequence id) is free and
   the KV pool has room for their tokens;
2. gives every running sequence that has a sampled token pending exactly one
   decode token, so running streams advance every step;
3. fills the rest of the step's prefill budget with prompt chunks, oldest
   sequence first, so a long prompt is spread over several steps instead of
   freezing the running streams (while streams that were already streaming
   when the oldest waiting prompt arrived decode, the engine may cap the
   budget further by time: ``step_costs.py``);
4. if the KV pool would overflow, preempts the newest running sequences: their
   KV is dropped and they wait again, to be recomputed from their tokens
   (prompt plus what they generated), so no accepted request is lost.

Prefix cache: a finished sequence leaves its KV in its slot, and a new
sequence starts from the cache (in the pool, or saved to host memory) that
shares the longest prefix with its prompt, within its own cache scope. Which
cache, what stays cached and what is evicted is ``PrefixCache``'s policy
(``prefix_cache.py``, with its invariants); the scheduler asks it where a
prompt would start, counts the pool's room, and evicts caches before it
preempts anyone.

The scheduler only decides: KV edits and copies are queued as ``KvOp``s for
the engine to apply before the step's decode. ``update`` then records what a
step produced. No llama.cpp in here: tests drive it with hand-made tokens.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spigot.engine.llamacpp.prefix_cache import KvOp, PrefixCache
from spigot.engine.llamacpp.saved_prefixes import SavedPrefixes
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
    num_cached: int = 0  # prompt tokens found already computed at admission
    slot: int | None = None
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    runtime: Any = None  # the engine's per-sequence state (sampler, text assembler)
    # The scheduler step in progress (or the last one run) when it was queued:
    # a request arriving while step k runs is queued with k, so it counts as
    # arriving together with whatever got its first token in step k.
    arrived_at: int = 0
    first_token_at: int | None = None  # the scheduler step its first token was sampled

    @classmethod
    def from_request(cls, request: GenRequest) -> Sequence:
        return cls(request, list(request.prompt.token_ids), len(request.prompt.token_ids))

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
    preempted_slots: list[int] = field(default_factory=list)
    num_decode: int = 0  # chunks that are the next token of a stream already generating

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int  # slots: llama.cpp sequence ids 0..max_running-1
    kv_capacity: int  # tokens in the shared KV pool
    max_step_tokens: int  # tokens one decode call may carry (n_batch)
    prefill_chunk: int  # most prompt tokens fed in one step, all sequences together
    prefix_cache: bool = True  # finished sequences leave their KV for reuse
    # Tokens that cached prefixes may hold beyond what a new prompt can reuse.
    prefix_cache_tokens: int = 0
    # Most prompt tokens per step while other sequences are decoding (None:
    # prefill_chunk). Smaller keeps their inter-token latency smooth: on a CPU
    # a few dozen prompt tokens cost as much as a whole decode step.
    prefill_chunk_decoding: int | None = None
    # Tokens of evicted caches kept in host memory for reuse (0: none).
    saved_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must cover one decode token per running sequence")


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._clock = 0
        self.prefix_cache = PrefixCache(
            config.max_running,
            enabled=config.prefix_cache,
            budget_tokens=config.prefix_cache_tokens,
            saved_tokens=config.saved_prefix_tokens,
        )

    @property
    def saved(self) -> SavedPrefixes:
        """The prefix cache's second tier: prefixes saved to host memory."""
        return self.prefix_cache.saved

    def take_kv_ops(self) -> list[KvOp]:
        """KV edits and copies to apply before the next decode, in order."""
        return self.prefix_cache.take_kv_ops()

    # -- queue -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.arrived_at = self._clock
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_used(self) -> int:
        """Tokens held in the KV pool: running sequences plus cached prefixes."""
        return sum(s.num_computed for s in self.running) + self.kv_cached()

    def kv_cached(self) -> int:
        return self.prefix_cache.cached_tokens()

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a sequence wherever it is; what it computed stays cached in its slot."""
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
            # The slot keeps the sequence's KV (prompt and output) for reuse,
            # unless the prefix cache is off.
            self.prefix_cache.release(
                seq.slot,
                seq.tokens[: seq.num_computed],
                seq.num_prompt,
                seq.request.cache_scope,
            )
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def evict_caches(self) -> bool:
        """Queue the removal of every cached prefix; False if there was none."""
        return self.prefix_cache.evict_all()

    def forget_cache(self) -> None:
        """Forget every cached prefix in the KV pool (the engine cleared it after
        a failure). Saved prefixes are copies in host memory and stay valid."""
        self.prefix_cache.forget_pool()

    def load_failed(self, slot_id: int, entry: int) -> None:
        """The engine could not copy a saved prefix into ``slot_id``: its
        sequence computes its prompt instead, and the entry is forgotten."""
        for seq in self.running:
            if seq.slot == slot_id:
                seq.num_computed = 0
                seq.num_cached = 0
        self.prefix_cache.load_failed(entry)

    # -- one step --------------------------------------------------------------
    def schedule(self, prefill_limit: Callable[[int, int], int] | None = None) -> StepPlan:
        """The next step. While sequences decode, ``prefill_limit(decoding,
        prefilling)`` caps its prompt tokens further (the engine's time budget)."""
        plan = StepPlan()
        self._clock += 1
        self._admit(plan)
        self._preempt_if_full(plan)

        budget = self.config.max_step_tokens
        # Decode first: every sequence with a sampled token pending advances.
        # (So does a newcomer whose prompt was all cached but its last token;
        # it is not a stream yet, whose pace prompt chunks must spare.)
        for seq in self.running:
            if seq.num_pending == 1 and seq.num_computed > 0:
                plan.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + 1))
                budget -= 1
                if seq.num_generated > 0:
                    plan.num_decode += 1
        chunk = self.config.prefill_chunk
        if plan.num_decode:
            if self.config.prefill_chunk_decoding is not None:
                chunk = self.config.prefill_chunk_decoding
            if prefill_limit is not None:
                prompts = [s for s in self.running if s.num_computed == 0 or s.num_pending > 1]
                if self._streams_to_pace(prompts):
                    chunk = min(chunk, prefill_limit(plan.num_decode, len(prompts)))
        prefill = min(budget, chunk)
        for seq in self.running:
            if prefill <= 0:
                break
            if seq.num_computed == 0 or seq.num_pending > 1:
                n = min(seq.num_pending, prefill)
                plan.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                prefill -= n
        return plan

    def _streams_to_pace(self, prompts: list[Sequence]) -> bool:
        """Whether a stream was already streaming when the oldest of these
        prompts arrived: only such streams have a pace that prompt chunks must
        spare. Streams that arrived with the prompts (a burst) got their first
        token early by luck of the order; pacing them would make the rest of
        the burst wait longer for its first token than computing every prompt
        first would. Arrival, not admission: the first request of a burst is
        often taken up alone, a step before the rest is queued."""
        if not prompts:
            return False
        oldest = min(s.arrived_at for s in prompts)
        return any(
            s.first_token_at is not None and s.first_token_at < oldest
            for s in self.running
            if s.num_generated > 0 and s.num_pending == 1
        )

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
                if seq.first_token_at is None:
                    seq.first_token_at = self._clock

    def _admit(self, plan: StepPlan) -> None:
        # Room for every running sequence's tokens plus the one each will add,
        # plus what free slots keep cached (which can be evicted).
        cache = self.prefix_cache
        used = sum(len(s.tokens) + 1 for s in self.running) + self.kv_cached()
        while self.waiting and cache.num_free:
            seq = self.waiting[0]
            match = cache.match(seq.tokens, seq.request.cache_scope)
            # A saved prefix is copied in whole, then cut to what is reused.
            needed = max(len(seq.tokens) + 1, match.load_tokens)
            used_after = used - match.displaced + needed
            used_after -= cache.evict_lru(used_after - self.config.kv_capacity, spare=match.slot)
            if used_after > self.config.kv_capacity and self.running:
                break
            self.waiting.popleft()
            cache.allocate(match)
            seq.slot = match.slot
            seq.status = SeqStatus.RUNNING
            seq.num_computed = match.reuse
            if seq.num_generated == 0:
                seq.num_cached = match.reuse
            self.running.append(seq)
            used = used_after - needed + len(seq.tokens) + 1

    def _preempt_if_full(self, plan: StepPlan) -> None:
        # Each running sequence will hold all of its tokens after the step.
        needed = sum(len(s.tokens) for s in self.running)
        # Cached prefixes go first, least recently freed first.
        self.prefix_cache.evict_lru(needed + self.kv_cached() - self.config.kv_capacity)
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
        self.prefix_cache.discard(seq.slot)
        seq.slot = None
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)
