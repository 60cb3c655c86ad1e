"""Which prompt prefixes have their KV saved in host memory: the second tier of the prefix cache.

The KV pool keeps few cached prefixes, because every cached cell slows every
decode step (``prefix_cache.py``). A prefix evicted from the pool is first
copied out to host memory (``llama_state_seq_get_data``), where it costs
nothing per step; a later prompt that starts the same way copies it back in
instead of computing it again: milliseconds against seconds of prefill on a
CPU (``python -m benchmarks.step_cost`` times both).

Entries are kept per cache scope (``GenRequest.cache_scope``, one API key by
default): a prompt only ever matches prefixes saved under its own scope, so
a tenant cannot learn from ``cached_tokens`` or its time to first token what
another tenant sent. All scopes share one budget, least recently used first.

This module is the index only, in tokens and pure Python: ``PrefixCache``
decides with it and queues the copies, the engine owns the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count


@dataclass(eq=False, slots=True)
class SavedPrefix:
    id: int
    tokens: list[int]
    used_at: int  # a counter value, for least-recently-used eviction
    scope: str = ""  # the cache scope it was computed under; matched only within it


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SavedPrefixes:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._entries: dict[int, SavedPrefix] = {}  # every scope's, by id
        self._by_scope: dict[str, dict[int, SavedPrefix]] = {}
        self._ids = count(1)
        self._clock = count(1)
        self.tokens = 0  # held by all entries together

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[SavedPrefix]:
        """Every scope's entries, to read (tests, monitoring)."""
        return list(self._entries.values())

    def longest_match(self, tokens: list[int], scope: str = "") -> tuple[SavedPrefix | None, int]:
        """The entry of ``scope`` sharing the longest prefix with ``tokens``, and its length."""
        best, best_len = None, 0
        for entry in self._by_scope.get(scope, {}).values():
            n = common_prefix_length(entry.tokens, tokens)
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def touch(self, entry: SavedPrefix) -> None:
        entry.used_at = next(self._clock)

    def add(
        self, tokens: list[int], scope: str = ""
    ) -> tuple[SavedPrefix | None, list[SavedPrefix]]:
        """Index ``tokens`` as saved under ``scope``: (the new entry, or None
        when an entry of that scope already holds them all; the entries it
        replaces or evicts, whose bytes the engine must free). Another scope's
        entry with the same tokens stays: each is matched only in its own."""
        if len(tokens) > self.capacity_tokens:
            return None, []
        dropped: list[SavedPrefix] = []
        for entry in list(self._by_scope.get(scope, {}).values()):
            n = common_prefix_length(entry.tokens, tokens)
            if n == len(tokens):
                self.touch(entry)  # already saved, as this or a longer prefix
                return None, []
            if n == len(entry.tokens):
                dropped.append(self._pop(entry.id))  # the new one covers it
        room = self.capacity_tokens - len(tokens)
        for entry in sorted(self._entries.values(), key=lambda e: e.used_at):
            if self.tokens <= room:
                break
            dropped.append(self._pop(entry.id))
        new = SavedPrefix(next(self._ids), list(tokens), next(self._clock), scope)
        self._entries[new.id] = new
        self._by_scope.setdefault(scope, {})[new.id] = new
        self.tokens += len(new.tokens)
        return new, dropped

    def remove_id(self, entry_id: int) -> None:
        if entry_id in self._entries:
            self._pop(entry_id)

    def _pop(self, entry_id: int) -> SavedPrefix:
        entry = self._entries.pop(entry_id)
        in_scope = self._by_scope[entry.scope]
        del in_scope[entry_id]
        if not in_scope:
            del self._by_scope[entry.scope]  # scopes come and go with keys
        self.tokens -= len(entry.tokens)
        return entry
