"""The index of prefixes saved to host memory: matching, replacing, evicting."""

from __future__ import annotations

from spigot.engine.llamacpp.saved_prefixes import SavedPrefixes


def test_the_longest_shared_prefix_wins() -> None:
    saved = SavedPrefixes(1000)
    short, _ = saved.add([1, 2, 3, 9])
    long, _ = saved.add([1, 2, 3, 4, 5])
    assert saved.longest_match([1, 2, 3, 4, 7]) == (long, 4)
    assert saved.longest_match([1, 2, 3, 9, 9]) == (short, 4)
    assert saved.longest_match([8]) == (None, 0)


def test_a_longer_save_replaces_the_prefixes_it_covers() -> None:
    saved = SavedPrefixes(1000)
    first, _ = saved.add([1, 2, 3])
    second, dropped = saved.add([1, 2, 3, 4, 5])
    assert dropped == [first]
    assert len(saved) == 1 and saved.tokens == 5
    # What is already held, as itself or inside a longer entry, is not saved again.
    assert saved.add([1, 2, 3, 4]) == (None, [])
    assert saved.longest_match([1, 2, 3, 4, 5]) == (second, 5)


def test_the_least_recently_used_go_when_full() -> None:
    saved = SavedPrefixes(10)
    a, _ = saved.add([1, 1, 1, 1])
    b, _ = saved.add([2, 2, 2, 2])
    assert a is not None and b is not None
    saved.touch(a)  # a was used since: b is older now
    c, dropped = saved.add([3, 3, 3, 3])
    assert dropped == [b]
    assert {e.id for e in (a, c) if e is not None} == {e.id for e in saved._entries.values()}
    assert saved.tokens == 8
    # Something larger than the whole store is never saved.
    assert saved.add(list(range(11))) == (None, [])


def test_remove_id_forgets_an_entry() -> None:
    saved = SavedPrefixes(100)
    entry, _ = saved.add([5, 6, 7])
    assert entry is not None
    saved.remove_id(entry.id)
    saved.remove_id(entry.id)  # twice is harmless
    assert saved.longest_match([5, 6, 7]) == (None, 0) and saved.tokens == 0


# -- cache scopes: one tenant never matches another's prefixes ----------------


def test_entries_match_only_within_their_scope() -> None:
    saved = SavedPrefixes(1000)
    mine, _ = saved.add([1, 2, 3, 4, 5], "key:1")
    assert saved.longest_match([1, 2, 3, 4, 5], "key:1") == (mine, 5)
    assert saved.longest_match([1, 2, 3, 4, 5], "key:2") == (None, 0)
    assert saved.longest_match([1, 2, 3, 4, 5]) == (None, 0)  # "" is a scope too


def test_the_same_tokens_are_saved_once_per_scope() -> None:
    saved = SavedPrefixes(1000)
    a, _ = saved.add([1, 2, 3], "key:1")
    # Another scope's save neither counts as already held nor replaces a's.
    b, dropped = saved.add([1, 2, 3, 4], "key:2")
    assert b is not None and dropped == []
    assert saved.longest_match([1, 2, 3, 4], "key:1") == (a, 3)
    assert saved.longest_match([1, 2, 3, 4], "key:2") == (b, 4)
    assert len(saved) == 2 and saved.tokens == 7


def test_scopes_share_one_budget_least_recently_used_first() -> None:
    saved = SavedPrefixes(8)
    a, _ = saved.add([1, 1, 1, 1], "key:1")
    b, _ = saved.add([2, 2, 2, 2], "key:2")
    c, dropped = saved.add([3, 3, 3, 3], "key:3")
    assert dropped == [a] and saved.tokens == 8
    assert saved.longest_match([1, 1, 1, 1], "key:1") == (None, 0)
    assert b is not None and c is not None
    saved.remove_id(b.id)
    saved.remove_id(c.id)
    assert len(saved) == 0 and saved.tokens == 0
    assert not saved._by_scope  # a scope with no entries left is not kept around
