"""The prefix cache: which KV a new prompt starts from, what stays cached, what is evicted.

A slot is a llama.cpp sequence id. While a sequence runs in a slot, the KV
there is the sequence's (the scheduler's business). When the sequence ends,
the slot keeps its KV and remembers its tokens: a *cache*. A new prompt takes
the free slot whose cache shares the longest prefix with it and computes only
the rest (a shared system prompt, the earlier turns of a chat).

Cached KV is not free: every decode step attends over the pool's whole used
range, so caches kept for nobody slow every stream. So beyond
``budget_tokens`` only the newest cache stays, and a prompt that matches
nothing takes over the least recently freed cache rather than an empty slot.
A cache leaving the pool is first saved to host memory (the second tier,
``SavedPrefixes``: only its prompt part, only if at least
``MIN_SAVED_TOKENS`` long); a prompt that matches a saved prefix by that much
more than any slot has the copy loaded into its slot instead.

The division of work follows vLLM's ``KVCacheManager`` (nano-vllm's
``BlockManager`` in small): the scheduler owns the requests, their queues and
the pool's capacity, and decides who is admitted or preempted; this class owns
the slots and the cached tokens, and answers "where would this prompt start"
(``match``, which changes nothing), "take it" (``allocate``), "this sequence
is done" (``release``, ``discard``) and "free this many tokens" (``evict_lru``).
Where vLLM salts a prompt's first block hash with ``cache_salt``, a cache
here carries the scope it was computed under. It decides only: every KV edit
or copy it implies is queued as a ``KvOp``, in order, for the engine to apply
before the next decode, and its index already describes the KV as it will be
once they are. No llama.cpp in here.

Invariants (``tests/unit/test_prefix_cache.py`` checks each, and a random
workload against a shadow KV that applies the ops):

1. Scope. A prompt starts only from KV computed under its own cache scope
   (``GenRequest.cache_scope``): ``match`` looks only at slots and saved
   prefixes whose scope equals the prompt's. (With ``--prefix-cache-scope
   shared`` the engine gives every request the scope ``""``, so all match.)
   Another scope's cache may be evicted or taken over, its KV dropped first,
   but is never reused: otherwise ``cached_tokens`` and the time to first
   token would tell one tenant what another sent.
2. What a prompt starts from is its own prefix. Once ``allocate``'s ops are
   applied, the slot holds the KV of exactly ``tokens[:reuse]`` (or nothing,
   if the engine could not load the copy: ``load_failed``), and
   ``reuse < len(tokens)``: at least one token is computed, for the logits
   to sample from.
3. Slots. A slot is either in use or free, never both. A slot in use caches
   nothing here. A free slot's KV is exactly its ``cached`` tokens, computed
   under its ``scope``; ``cached_tokens()`` is their sum. Disabled, no slot
   keeps anything: a freed slot's KV is dropped.
4. Eviction. Caches go least recently freed first, never the spared one
   (``evict_lru``). Whenever a sequence is released, caches beyond
   ``max(budget_tokens, its own cache)`` are evicted: the newest cache stays.
5. Second tier. Only a cache's prompt part is saved, and only when at least
   ``MIN_SAVED_TOKENS`` of it would otherwise be lost; its ``SaveKV`` comes
   before the ``DropKV`` that loses it. Every entry the index replaces or
   evicts gets a ``ForgetKV``; the saved tokens stay within the index's
   capacity. A ``LoadKV`` goes only into a slot whose KV was dropped, and is
   then cut to what the prompt shares with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import NamedTuple

from spigot.engine.llamacpp.saved_prefixes import SavedPrefix, SavedPrefixes, common_prefix_length

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


@dataclass(eq=False, slots=True)
class Slot:
    """A llama.cpp sequence id. While free it may keep the KV of its last
    sequence (``cached``), for a later prompt that starts the same way."""

    id: int
    cached: list[int] = field(default_factory=list)
    cached_prompt: int = 0  # how many of the cached tokens were its sequence's prompt
    scope: str = ""  # the cache scope the cached tokens were computed under
    freed_at: int = 0  # when it became free (a release counter), for LRU eviction


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """Where a prompt would start (``PrefixCache.match``); nothing changes until ``allocate``."""

    slot: int  # the free slot it would take
    reuse: int  # prompt tokens whose KV it would start with
    saved: SavedPrefix | None  # copied into the slot first (None: the slot's own cache)
    displaced: int  # tokens the slot caches now: kept, cut or evicted on allocation

    @property
    def load_tokens(self) -> int:
        """Tokens the saved copy brings into the pool before it is cut to ``reuse``."""
        return len(self.saved.tokens) if self.saved is not None else 0


class PrefixCache:
    def __init__(
        self,
        num_slots: int,
        *,
        enabled: bool = True,
        budget_tokens: int = 0,
        saved_tokens: int = 0,
    ) -> None:
        """``num_slots`` llama.cpp sequence ids; ``enabled``: finished sequences
        leave their KV for reuse; ``budget_tokens``: what caches may hold beyond
        the newest one; ``saved_tokens``: the host-memory tier's capacity (the
        engine may set ``saved.capacity_tokens`` later, once it has measured)."""
        self.enabled = enabled
        self.budget_tokens = budget_tokens
        self.saved = SavedPrefixes(saved_tokens if enabled else 0)
        self._slots = [Slot(i) for i in range(num_slots)]
        self._free: list[Slot] = list(reversed(self._slots))
        self._releases = count(1)
        self._ops: list[KvOp] = []

    def take_kv_ops(self) -> list[KvOp]:
        """KV edits and copies to apply before the next decode, in order."""
        ops, self._ops = self._ops, []
        return ops

    # -- reading -----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def cached_tokens(self) -> int:
        """Tokens the free slots' caches hold in the KV pool."""
        return sum(len(slot.cached) for slot in self._free)

    def slot(self, slot_id: int) -> Slot:
        """A slot, to read (tests, monitoring); changed only through this class."""
        return self._slots[slot_id]

    def cached_slots(self) -> list[Slot]:
        """The free slots that keep a cache, to read."""
        return [slot for slot in self._free if slot.cached]

    def match(self, tokens: list[int], scope: str) -> PrefixMatch:
        """The free slot a prompt would take, how many of its tokens it would
        start with, and the saved prefix to copy in first. Changes nothing.

        Only caches of ``scope`` are matched. The slot sharing the longest
        prefix wins, unless a saved prefix shares ``MIN_SAVED_TOKENS`` more.
        Without a useful match, an empty slot is taken while the caches stay
        within ``budget_tokens``; beyond that the least recently freed cache
        is replaced. A match that would throw most of a cache away is not
        worth it while an empty slot may be used instead.
        """
        if not self._free:
            raise RuntimeError("no free slot to match against")
        best, best_len = None, 0
        for slot in self._free:
            if slot.scope != scope:
                continue  # never reused, but may be evicted as the fallback below
            n = common_prefix_length(slot.cached, tokens)
            if n > best_len:
                best, best_len = slot, n
        empty = next((slot for slot in self._free if not slot.cached), None)
        cached = [slot for slot in self._free if slot.cached]
        within_budget = self.cached_tokens() + len(tokens) <= self.budget_tokens
        if empty is not None and (within_budget or not cached):
            fallback = empty
        else:
            fallback = min(cached, key=lambda s: s.freed_at)
        # At least one prompt token must be computed, for the logits to sample from.
        limit = len(tokens) - 1
        if self.saved.capacity_tokens:
            saved, saved_len = self.saved.longest_match(tokens, scope)
            if saved is not None and min(saved_len, limit) >= best_len + MIN_SAVED_TOKENS:
                return PrefixMatch(fallback.id, min(saved_len, limit), saved, len(fallback.cached))
        if best is None or (2 * best_len < len(best.cached) and fallback is empty):
            best, best_len = fallback, 0
        return PrefixMatch(best.id, min(best_len, limit), None, len(best.cached))

    # -- changing ----------------------------------------------------------------

    def allocate(self, match: PrefixMatch) -> None:
        """Take the matched slot for a sequence: queue the edits that leave it
        holding the KV of the prompt's first ``match.reuse`` tokens.

        Between ``match`` and this, only evictions that spare the slot may run.
        """
        slot = self._slots[match.slot]
        if slot not in self._free or len(slot.cached) != match.displaced:
            raise RuntimeError("the slot changed since it was matched")
        self._free.remove(slot)
        if match.saved is not None:
            if slot.cached:
                self._evict(slot)
            self._ops.append(LoadKV(slot.id, match.saved.id))
            self.saved.touch(match.saved)
            if match.reuse < len(match.saved.tokens):
                self._ops.append(DropKV(slot.id, match.reuse))
        elif match.reuse < len(slot.cached):
            self._evict(slot, keep=match.reuse)
        slot.cached = []

    def release(self, slot_id: int, tokens: list[int], num_prompt: int, scope: str) -> None:
        """A sequence finished in the slot, whose KV holds ``tokens`` (its first
        ``num_prompt`` the prompt), computed under ``scope``: keep them as a
        cache (dropped when disabled), then trim the caches to the budget."""
        slot = self._slots[slot_id]
        if self.enabled:
            slot.cached = list(tokens)
            slot.cached_prompt = num_prompt
            slot.scope = scope
        else:
            self._ops.append(DropKV(slot.id))
        self._release(slot)
        # Every decode step attends over the KV pool's used range, cached
        # prefixes included: caches left by many finished sequences slow all
        # later streams (python -m benchmarks.step_cost measures it). Beyond
        # ``budget_tokens``, only the newest cache is kept.
        limit = max(self.budget_tokens, len(slot.cached))
        self.evict_lru(self.cached_tokens() - limit, spare=slot_id)

    def discard(self, slot_id: int) -> None:
        """Free the slot of a preempted sequence, dropping its KV: nothing is cached."""
        slot = self._slots[slot_id]
        slot.cached = []
        self._ops.append(DropKV(slot.id))
        self._release(slot)

    def evict_lru(self, excess: int, spare: int | None = None) -> int:
        """Evict caches, least recently freed first (never slot ``spare``'s),
        until at least ``excess`` tokens are freed; returns the tokens freed."""
        freed = 0
        for slot in sorted(self._free, key=lambda s: s.freed_at):
            if freed >= excess:
                break
            if slot.id != spare and slot.cached:
                freed += len(slot.cached)
                self._evict(slot)
        return freed

    def evict_all(self) -> bool:
        """Queue the removal of every cache; False if there was none."""
        evicted = False
        for slot in self._free:
            if slot.cached:
                self._evict(slot)
                evicted = True
        return evicted

    def forget_pool(self) -> None:
        """Forget every cache in the KV pool (the engine cleared it after a
        failure). Saved prefixes are copies in host memory and stay valid."""
        for slot in self._free:
            slot.cached = []
        self._ops = [op for op in self._ops if isinstance(op, ForgetKV)]

    def load_failed(self, entry: int) -> None:
        """A saved prefix could not be loaded: forget it (the engine frees its bytes)."""
        self.saved.remove_id(entry)

    def _release(self, slot: Slot) -> None:
        slot.freed_at = next(self._releases)
        self._free.append(slot)

    def _evict(self, slot: Slot, keep: int = 0) -> None:
        """Drop a slot's cache from ``keep`` on, saving its prompt part to
        host memory first. Prompts are what gets sent again (system prompts,
        retries, the earlier turns of a chat); a sequence's output would
        double what a saved prefix takes for less reuse."""
        prompt = min(len(slot.cached), slot.cached_prompt)
        if self.saved.capacity_tokens and prompt - keep >= MIN_SAVED_TOKENS:
            entry, dropped = self.saved.add(slot.cached[:prompt], slot.scope)
            self._ops.extend(ForgetKV(e.id) for e in dropped)
            if entry is not None:
                if prompt < len(slot.cached):
                    self._ops.append(DropKV(slot.id, prompt))
                self._ops.append(SaveKV(slot.id, entry.id))
        self._ops.append(DropKV(slot.id, keep))
        del slot.cached[keep:]
