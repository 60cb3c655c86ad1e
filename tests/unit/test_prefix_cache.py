"""The prefix cache's invariants (``prefix_cache.py``), on the class alone.

The examples pin each rule; the random workload at the end applies every
``KvOp`` to a shadow KV that remembers under which scope each token was
computed, and checks after every action that the cache's index describes
that KV, and that no sequence ever starts from another scope's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from spigot.engine.llamacpp.prefix_cache import (
    MIN_SAVED_TOKENS,
    DropKV,
    ForgetKV,
    KvOp,
    LoadKV,
    PrefixCache,
    SaveKV,
)

SYSTEM = list(range(500, 540))  # 40 tokens, more than MIN_SAVED_TOKENS


def run(
    cache: PrefixCache, tokens: list[int], scope: str = "", generated: int = 0
) -> tuple[int, int]:
    """Admit a prompt, compute it (and ``generated`` tokens), release it:
    (its slot, the tokens it started with)."""
    match = cache.match(tokens, scope)
    cache.allocate(match)
    computed = tokens + [7] * generated
    cache.release(match.slot, computed, len(tokens), scope)
    return match.slot, match.reuse


# -- 1. scope ----------------------------------------------------------------------


def test_a_prompt_matches_only_caches_of_its_own_scope() -> None:
    cache = PrefixCache(3, budget_tokens=1000)
    run(cache, [*SYSTEM, 1], "key:1")
    for other in ("key:2", ""):
        match = cache.match([*SYSTEM, 2], other)
        assert match.reuse == 0 and match.saved is None, other
    assert cache.match([*SYSTEM, 2], "key:1").reuse == len(SYSTEM)


def test_requests_of_the_shared_scope_match_each_other() -> None:
    # --prefix-cache-scope shared: the engine gives every request the scope "".
    cache = PrefixCache(2, budget_tokens=1000)
    run(cache, [*SYSTEM, 1], "")
    assert cache.match([*SYSTEM, 2], "").reuse == len(SYSTEM)


def test_another_scopes_cache_is_dropped_whole_when_taken_over() -> None:
    cache = PrefixCache(1)
    slot, _ = run(cache, [*SYSTEM, 1], "key:1")
    cache.take_kv_ops()
    match = cache.match([*SYSTEM, 1], "key:2")
    assert (match.slot, match.reuse, match.displaced) == (slot, 0, len(SYSTEM) + 1)
    cache.allocate(match)
    assert cache.take_kv_ops() == [DropKV(slot, 0)]


def test_saved_prefixes_match_only_within_their_scope() -> None:
    cache = PrefixCache(1, saved_tokens=1000)
    run(cache, [*SYSTEM, 1], "key:1")
    run(cache, list(range(100, 130)), "key:1")  # SYSTEM goes to host memory
    assert len(cache.saved) == 1
    assert cache.match([*SYSTEM, 2], "key:2").saved is None
    mine = cache.match([*SYSTEM, 2], "key:1")
    assert mine.saved is not None and mine.reuse == len(SYSTEM)


# -- 2. a prompt starts from its own prefix, and computes at least a token -------


def test_an_identical_prompt_still_computes_its_last_token() -> None:
    cache = PrefixCache(1)
    run(cache, [*SYSTEM, 1])
    cache.take_kv_ops()
    match = cache.match([*SYSTEM, 1], "")
    assert match.reuse == len(SYSTEM)  # not len(SYSTEM) + 1
    cache.allocate(match)
    assert cache.take_kv_ops() == [DropKV(match.slot, len(SYSTEM))]


def test_a_match_goes_stale_when_its_slot_changes() -> None:
    cache = PrefixCache(2, budget_tokens=1000)
    run(cache, [*SYSTEM, 1])
    match = cache.match([*SYSTEM, 2], "")
    cache.evict_all()
    with pytest.raises(RuntimeError, match="changed"):
        cache.allocate(match)


# -- 3. slots ------------------------------------------------------------------------


def test_a_slot_in_use_caches_nothing_and_is_not_free() -> None:
    cache = PrefixCache(2, budget_tokens=1000)
    slot, _ = run(cache, [*SYSTEM, 1])
    match = cache.match([*SYSTEM, 2], "")
    assert match.slot == slot
    cache.allocate(match)
    assert cache.num_free == 1 and cache.slot(slot).cached == []
    assert cache.cached_tokens() == 0


def test_disabled_every_freed_slot_is_dropped() -> None:
    cache = PrefixCache(2, enabled=False, budget_tokens=1000, saved_tokens=1000)
    slot, _ = run(cache, [*SYSTEM, 1])
    assert cache.take_kv_ops() == [DropKV(slot, 0)]
    assert cache.cached_tokens() == 0 and cache.saved.capacity_tokens == 0
    assert cache.match([*SYSTEM, 1], "").reuse == 0


# -- 4. eviction ---------------------------------------------------------------------


def test_eviction_goes_least_recently_freed_first_and_spares() -> None:
    cache = PrefixCache(3, budget_tokens=1000)
    first, _ = run(cache, [1, 2, 3])
    second, _ = run(cache, [4, 5, 6, 7])
    third, _ = run(cache, [8, 9])
    cache.take_kv_ops()
    assert len({first, second, third}) == 3
    assert cache.evict_lru(1, spare=first) == 4  # first is spared: second goes
    assert cache.take_kv_ops() == [DropKV(second, 0)]
    assert cache.evict_lru(0) == 0
    assert cache.evict_lru(5) == 5  # first, then third
    assert cache.take_kv_ops() == [DropKV(first, 0), DropKV(third, 0)]


def test_beyond_the_budget_only_the_newest_cache_stays() -> None:
    for budget, kept in ((0, 1), (8, 2), (1000, 3)):
        cache = PrefixCache(3, budget_tokens=budget)
        slots = [run(cache, [base, base + 1, base + 2, base + 3])[0] for base in (10, 20, 30)]
        assert [s.id for s in cache.cached_slots()] == slots[3 - kept :], budget
        assert cache.slot(slots[-1]).cached == [30, 31, 32, 33]


def test_a_prompt_matching_nothing_replaces_the_oldest_cache_beyond_the_budget() -> None:
    cache = PrefixCache(3, budget_tokens=0)
    slot, _ = run(cache, [1, 2, 3, 4])
    assert cache.match([7, 8, 9], "").slot == slot
    roomy = PrefixCache(3, budget_tokens=100)
    slot, _ = run(roomy, [1, 2, 3, 4])
    assert roomy.match([7, 8, 9], "").slot != slot


# -- 5. the second tier --------------------------------------------------------------


def test_only_the_prompt_part_is_saved_before_the_cache_is_dropped() -> None:
    cache = PrefixCache(1, saved_tokens=1000)
    slot, _ = run(cache, SYSTEM, generated=5)
    cache.take_kv_ops()
    cache.allocate(cache.match(list(range(100, 130)), ""))
    (entry,) = cache.saved.entries()
    assert entry.tokens == SYSTEM
    assert cache.take_kv_ops() == [
        DropKV(slot, len(SYSTEM)),
        SaveKV(slot, entry.id),
        DropKV(slot, 0),
    ]


def test_a_cache_too_short_to_be_worth_saving_is_dropped() -> None:
    cache = PrefixCache(1, saved_tokens=1000)
    slot, _ = run(cache, list(range(1, MIN_SAVED_TOKENS)))  # one short
    cache.take_kv_ops()
    cache.allocate(cache.match(list(range(100, 130)), ""))
    assert cache.take_kv_ops() == [DropKV(slot, 0)]


def test_a_saved_prefix_is_loaded_into_an_emptied_slot_and_cut() -> None:
    cache = PrefixCache(1, saved_tokens=1000)
    run(cache, [*SYSTEM, 1, 1])
    other, _ = run(cache, list(range(100, 130)))  # SYSTEM + [1, 1] to host memory
    cache.take_kv_ops()
    match = cache.match([*SYSTEM, 2], "")
    assert match.saved is not None and match.load_tokens == len(SYSTEM) + 2
    cache.allocate(match)
    ops = cache.take_kv_ops()
    load = ops.index(LoadKV(other, match.saved.id))
    assert DropKV(other, 0) in ops[:load]  # the slot's own cache went first
    assert ops[load + 1 :] == [DropKV(other, len(SYSTEM))]


def test_a_full_tier_forgets_its_least_recently_used_entry() -> None:
    cache = PrefixCache(1, saved_tokens=50)
    for base in (1000, 2000, 3000):
        run(cache, list(range(base, base + 30)))
    ops = cache.take_kv_ops()
    saves = [op for op in ops if isinstance(op, SaveKV)]
    assert [op for op in ops if isinstance(op, ForgetKV)] == [ForgetKV(saves[0].entry)]
    assert cache.saved.tokens == 30


def test_forgetting_the_pool_keeps_the_saved_prefixes() -> None:
    cache = PrefixCache(2, budget_tokens=0, saved_tokens=50)
    for base in (1000, 2000, 3000):
        run(cache, list(range(base, base + 30)))
    cache.forget_pool()
    assert cache.cached_tokens() == 0
    assert all(isinstance(op, ForgetKV) for op in cache.take_kv_ops())
    assert len(cache.saved) == 1


# -- every invariant, on random workloads ---------------------------------------------

Kv = list[tuple[int, str]]  # a token, and the scope it was computed under


@dataclass
class ShadowKV:
    """The KV pool and host copies as the engine would leave them after the ops."""

    slots: dict[int, Kv] = field(default_factory=dict)
    saved: dict[int, Kv] = field(default_factory=dict)

    def apply(self, op: KvOp) -> None:
        if isinstance(op, DropKV):
            del self.slots.setdefault(op.slot, [])[op.keep :]
        elif isinstance(op, SaveKV):
            assert op.entry not in self.saved
            self.saved[op.entry] = list(self.slots[op.slot])
        elif isinstance(op, LoadKV):
            assert self.slots.get(op.slot, []) == [], "a copy is loaded into an emptied slot"
            self.slots[op.slot] = list(self.saved[op.entry])
        else:
            del self.saved[op.entry]


@dataclass
class Running:
    tokens: list[int]  # what it computed
    num_prompt: int
    scope: str


SCOPES = ["", "key:1", "key:2"]
OPENINGS = [list(range(1000 * i, 1000 * i + 40)) for i in range(1, 3)]


class Action(NamedTuple):
    kind: str
    scope: str = ""
    opening: int = 0  # admit: which opening the prompt starts with,
    length: int = 1  # how much of it,
    tail: tuple[int, ...] = ()  # and what follows
    generated: int = 0  # admit: output tokens that reach the KV
    # admit: tokens evicted between match and allocate; finish and preempt:
    # which running sequence; evict: how many tokens.
    n: int = 0
    fail: bool = False  # admit: a saved prefix fails to load


actions = st.builds(
    Action,
    # Mostly admissions and finishes, so that caches build up between flushes.
    kind=st.sampled_from(
        ["admit"] * 4 + ["finish"] * 4 + ["preempt", "evict", "evict_all", "clear"]
    ),
    scope=st.sampled_from(SCOPES),
    opening=st.integers(0, len(OPENINGS) - 1),
    length=st.sampled_from([1, 20, 40]),
    tail=st.lists(st.integers(1, 3), max_size=4).map(tuple),
    generated=st.integers(0, 6),
    n=st.integers(0, 80),
    fail=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 4),
    st.sampled_from([True, True, True, False]),
    st.sampled_from([0, 30, 1000]),
    st.sampled_from([0, 40, 1000, 1000]),
    st.lists(actions, min_size=10, max_size=80),
)
def test_random_workloads_keep_every_invariant(
    num_slots: int,
    enabled: bool,
    budget: int,
    saved_tokens: int,
    workload: list[Action],
) -> None:
    cache = PrefixCache(num_slots, enabled=enabled, budget_tokens=budget, saved_tokens=saved_tokens)
    kv = ShadowKV()
    running: dict[int, Running] = {}
    prompts: list[tuple[list[int], str]] = []  # every prompt released, and its scope

    def apply_ops(fail_loads: bool = False) -> None:
        for op in cache.take_kv_ops():
            if isinstance(op, LoadKV) and (fail_loads or op.entry not in kv.saved):
                # The engine's answer to a copy that does not fit (or was
                # forgotten by an eviction in the same admission): the
                # sequence computes its prompt.
                kv.slots[op.slot] = []
                cache.load_failed(op.entry)
                kv.saved.pop(op.entry, None)
                running[op.slot].tokens = []
                event("a load failed" if fail_loads else "a forgotten copy was loaded")
            else:
                kv.apply(op)

    def release(slot: int) -> None:
        seq = running.pop(slot)
        cache.release(slot, seq.tokens, seq.num_prompt, seq.scope)
        prompts.append((seq.tokens[: seq.num_prompt], seq.scope))

    for action in workload:
        kind = action.kind
        if kind == "admit" and cache.num_free:
            scope = action.scope
            tokens = [*OPENINGS[action.opening][: action.length], *action.tail]
            match = cache.match(tokens, scope)
            spared = list(cache.slot(match.slot).cached)
            cache.evict_lru(action.n, spare=match.slot)
            assert cache.slot(match.slot).cached == spared
            cache.allocate(match)
            running[match.slot] = Running(tokens[: match.reuse], len(tokens), scope)
            apply_ops(fail_loads=action.fail)
            seq = running[match.slot]
            # 1 and 2: it starts from its own prompt's prefix, computed under its scope.
            assert kv.slots.get(match.slot, []) == [(t, scope) for t in seq.tokens]
            assert match.reuse < len(tokens)
            # The engine computes the rest of the prompt and some output.
            done = [*tokens, *[9] * action.generated]
            kv.slots[match.slot] = [(t, scope) for t in done]
            seq.tokens = done
        elif kind in ("finish", "preempt") and running:
            slot = sorted(running)[action.n % len(running)]
            if kind == "finish":
                release(slot)
                apply_ops()
                # 4: the newest cache stays, the rest within the budget.
                if enabled:
                    mine = len(cache.slot(slot).cached)
                    assert mine == len(kv.slots[slot]) > 0
                    assert cache.cached_tokens() <= max(budget, mine)
            else:
                running.pop(slot)
                cache.discard(slot)
                apply_ops()
        elif kind == "evict":
            before = {s.id: (s.freed_at, len(s.cached)) for s in cache.cached_slots()}
            freed = cache.evict_lru(action.n)
            after = {s.id for s in cache.cached_slots()}
            gone = set(before) - after
            assert freed == sum(before[s][1] for s in gone)
            assert freed >= action.n or not after  # enough, or nothing left
            # 4: least recently freed first.
            if gone and after:
                assert max(before[s][0] for s in gone) < min(before[s][0] for s in after)
            apply_ops()
        elif kind == "evict_all":
            cache.evict_all()
            apply_ops()
            assert cache.cached_tokens() == 0
        elif kind == "clear":
            # The engine failed: every sequence ends, then the pool is cleared.
            for slot in list(running):
                release(slot)
            apply_ops()
            kv.slots.clear()
            cache.forget_pool()
            apply_ops()

        # 3: slots in use cache nothing; free slots' KV is what they cache.
        assert cache.num_free + len(running) == num_slots
        for i in range(num_slots):
            state = cache.slot(i)
            if i in running:
                assert state.cached == []
            else:
                assert kv.slots.get(i, []) == [(t, state.scope) for t in state.cached]
        assert cache.cached_tokens() == sum(len(s.cached) for s in cache.cached_slots())
        if not enabled:
            assert cache.cached_tokens() == 0 and len(cache.saved) == 0
        # 5: the index is the host copies; each a released prompt's prefix, of its scope.
        entries = cache.saved.entries()
        assert {e.id: [(t, e.scope) for t in e.tokens] for e in entries} == kv.saved
        assert cache.saved.tokens == sum(len(e.tokens) for e in entries) <= saved_tokens
        for e in entries:
            assert len(e.tokens) >= MIN_SAVED_TOKENS
            assert any(p[: len(e.tokens)] == e.tokens and s == e.scope for p, s in prompts)
