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
   budget further by time: ``engine/step_costs.py``);
4. if the KV pool would overflow, preempts the newest running sequences: their
   KV is dropped and they wait again, to be recomputed from their tokens
   (prompt plus what they generated), so no accepted request is lost.

Prefix cache, in two tiers. A finished sequence leaves its KV in its slot. A
new sequence takes the free slot whose cached tokens share the longest prefix
with its prompt and computes only the rest (a shared system prompt, the
earlier turns of a chat). Cached slots count against the KV pool and are
evicted, least recently freed first, when room is needed, and whenever a
sequence finishes beyond ``prefix_cache_tokens`` (the newest cache always
stays). An evicted cache is first saved to host memory (``SavedPrefixes``,
within ``saved_prefix_tokens``); a prompt that matches a saved prefix better
than any slot has it copied back into its slot instead of computing it.

Both tiers are partitioned by cache scope (``GenRequest.cache_scope``: one API
key, unless the engine is told to share): a prompt reuses only prefixes
computed under its own scope. Otherwise ``cached_tokens`` and the time to
first token would tell one tenant whether another just sent the same prefix,
enough to recover another key's system prompt token by token. A slot caching
another scope's prefix is never matched, but is evicted or taken over like
any other cache when room is needed.

The scheduler only decides: KV edits and copies are queued as ``KvOp``s for
the engine to apply before the step's decode. ``update`` then records what a
step produced. No llama.cpp in here: tests
drive it with hand-made tokens.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from spigot.engine.saved_prefixes import SavedPrefix, SavedPrefixes, common_prefix_length
from spigot.engine.types import FinishReason, GenRequest

# A cache shorter than this is not worth copying to host memory and back.
MIN_SAVED_TOKENS = 16


class DropKV(NamedTuple):
    """Drop the slot's KV from position ``keep`` on (0: all of it)."""

    slot: int
    keep: int = 0


class SaveKV(NamedTuple):
    """Copy the slot's KV to host memory, as saved prefix ``entry``."""

    slot: int
    entry: int


class LoadKV(NamedTuple):
    """Copy saved prefix ``entry`` into the (empty) slot."""

    slot: int
    entry: int


class ForgetKV(NamedTuple):
    """Free saved prefix ``entry``'s host memory."""

    entry: int


KvOp = DropKV | SaveKV | LoadKV | ForgetKV


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


@dataclass(eq=False, slots=True)
class Slot:
    """A llama.cpp sequence id. While free it may keep the KV of its last
    sequence (``cached``), for a later prompt that starts the same way."""

    id: int
    cached: list[int] = field(default_factory=list)
    cached_prompt: int = 0  # how many of the cached tokens were its sequence's prompt
    scope: str = ""  # the cache scope the cached tokens were computed under
    freed_at: int = 0  # step counter when it became free, for LRU eviction


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._slots = [Slot(i) for i in range(config.max_running)]
        self._free: list[Slot] = list(reversed(self._slots))
        self._clock = 0
        self._kv_ops: list[KvOp] = []
        self.saved = SavedPrefixes(config.saved_prefix_tokens if config.prefix_cache else 0)

    def take_kv_ops(self) -> list[KvOp]:
        """KV edits and copies to apply before the next decode, in order."""
        ops, self._kv_ops = self._kv_ops, []
        return ops

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
        return sum(len(slot.cached) for slot in self._free)

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
            slot = self._slots[seq.slot]
            if self.config.prefix_cache:
                # The slot keeps the sequence's KV (prompt and output) for reuse.
                slot.cached = seq.tokens[: seq.num_computed]
                slot.cached_prompt = seq.num_prompt
                slot.scope = seq.request.cache_scope
            else:
                self._kv_ops.append(DropKV(slot.id))
            self._release(slot)
            self._trim_caches(keep=slot)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _trim_caches(self, keep: Slot) -> None:
        # Every decode step attends over the KV pool's used range, cached
        # prefixes included: caches left by many finished sequences slow all
        # later streams (python -m spigot.bench.step_cost measures it). Beyond
        # ``prefix_cache_tokens``, only the newest cache is kept.
        limit = max(self.config.prefix_cache_tokens, len(keep.cached))
        self._evict_oldest(self.kv_cached() - limit, spare=keep)

    def _evict_oldest(self, excess: int, spare: Slot | None = None) -> int:
        """Evict cached prefixes, least recently freed first (never ``spare``'s),
        until at least ``excess`` tokens are freed; returns the tokens freed."""
        freed = 0
        for slot in sorted(self._free, key=lambda s: s.freed_at):
            if freed >= excess:
                break
            if slot is not spare and slot.cached:
                freed += len(slot.cached)
                self._evict(slot)
        return freed

    def _evict(self, slot: Slot, keep: int = 0) -> None:
        """Drop a free slot's cache from ``keep`` on, saving its prompt part to
        host memory first. Prompts are what gets sent again (system prompts,
        retries, the earlier turns of a chat); a sequence's output would
        double what a saved prefix takes for less reuse."""
        prompt = min(len(slot.cached), slot.cached_prompt)
        if self.saved.capacity_tokens and prompt - keep >= MIN_SAVED_TOKENS:
            entry, dropped = self.saved.add(slot.cached[:prompt], slot.scope)
            self._kv_ops.extend(ForgetKV(e.id) for e in dropped)
            if entry is not None:
                if prompt < len(slot.cached):
                    self._kv_ops.append(DropKV(slot.id, prompt))
                self._kv_ops.append(SaveKV(slot.id, entry.id))
        self._kv_ops.append(DropKV(slot.id, keep))
        del slot.cached[keep:]

    def evict_caches(self) -> bool:
        """Queue the removal of every cached prefix; False if there was none."""
        evicted = False
        for slot in self._free:
            if slot.cached:
                self._evict(slot)
                evicted = True
        return evicted

    def forget_cache(self) -> None:
        """Forget every cached prefix in the KV pool (the engine cleared it after
        a failure). Saved prefixes are copies in host memory and stay valid."""
        for slot in self._free:
            slot.cached = []
        self._kv_ops = [op for op in self._kv_ops if isinstance(op, ForgetKV)]

    def load_failed(self, slot_id: int, entry: int) -> None:
        """The engine could not copy a saved prefix into ``slot_id``: its
        sequence computes its prompt instead, and the entry is forgotten."""
        for seq in self.running:
            if seq.slot == slot_id:
                seq.num_computed = 0
                seq.num_cached = 0
        self.saved.remove_id(entry)

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

    def _release(self, slot: Slot) -> None:
        slot.freed_at = self._clock
        self._free.append(slot)

    def _best_slot(self, tokens: list[int], scope: str) -> tuple[Slot, int, SavedPrefix | None]:
        """The free slot to use, how many of ``tokens`` it will hold, and the
        saved prefix to copy into it first (None: use what the slot caches).

        Only caches of ``scope`` are matched. The slot sharing the longest
        prefix wins, unless a saved prefix shares a longer one. Without a
        useful match, an empty slot is taken while the
        cached prefixes stay within ``prefix_cache_tokens``; beyond that the
        least recently freed cache is replaced. Cached KV is not free: every
        decode step attends over the whole used pool, so caches kept for
        nobody slow everyone down.
        """
        best, best_len = None, 0
        for slot in self._free:
            if slot.scope != scope:
                continue  # never reused, but may be evicted as the fallback below
            n = common_prefix_length(slot.cached, tokens)
            if n > best_len:
                best, best_len = slot, n
        empty = next((slot for slot in self._free if not slot.cached), None)
        cached = [slot for slot in self._free if slot.cached]
        within_budget = self.kv_cached() + len(tokens) <= self.config.prefix_cache_tokens
        if empty is not None and (within_budget or not cached):
            fallback = empty
        else:
            fallback = min(cached, key=lambda s: s.freed_at)
        # At least one prompt token must be computed, for the logits to sample from.
        limit = len(tokens) - 1
        if self.saved.capacity_tokens:
            saved, saved_len = self.saved.longest_match(tokens, scope)
            if saved is not None and min(saved_len, limit) >= best_len + MIN_SAVED_TOKENS:
                return fallback, min(saved_len, limit), saved
        # A match that would throw most of a cache away is not worth it while
        # an empty slot may be used instead.
        if best is None or (2 * best_len < len(best.cached) and fallback is empty):
            best, best_len = fallback, 0
        return best, min(best_len, limit), None

    def _admit(self, plan: StepPlan) -> None:
        # Room for every running sequence's tokens plus the one each will add,
        # plus what free slots keep cached (which can be evicted).
        used = sum(len(s.tokens) + 1 for s in self.running) + self.kv_cached()
        while self.waiting and self._free:
            seq = self.waiting[0]
            slot, reuse, saved = self._best_slot(seq.tokens, seq.request.cache_scope)
            # A saved prefix is copied in whole, then cut to what is reused.
            needed = max(len(seq.tokens) + 1, len(saved.tokens) if saved else 0)
            used_after = used - len(slot.cached) + needed
            used_after -= self._evict_oldest(used_after - self.config.kv_capacity, spare=slot)
            if used_after > self.config.kv_capacity and self.running:
                break
            self.waiting.popleft()
            self._free.remove(slot)
            if saved is not None:
                if slot.cached:
                    self._evict(slot)
                self._kv_ops.append(LoadKV(slot.id, saved.id))
                self.saved.touch(saved)
                if reuse < len(saved.tokens):
                    self._kv_ops.append(DropKV(slot.id, reuse))
            elif reuse < len(slot.cached):
                self._evict(slot, keep=reuse)
            slot.cached = []
            seq.slot = slot.id
            seq.status = SeqStatus.RUNNING
            seq.num_computed = reuse
            if seq.num_generated == 0:
                seq.num_cached = reuse
            self.running.append(seq)
            used = used_after - needed + len(seq.tokens) + 1

    def _preempt_if_full(self, plan: StepPlan) -> None:
        # Each running sequence will hold all of its tokens after the step.
        needed = sum(len(s.tokens) for s in self.running)
        # Cached prefixes go first, least recently freed first.
        self._evict_oldest(needed + self.kv_cached() - self.config.kv_capacity)
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
        slot = self._slots[seq.slot]
        slot.cached = []
        self._kv_ops.append(DropKV(slot.id))
        self._release(slot)
        seq.slot = None
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)
