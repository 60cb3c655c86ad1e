"""The index of prefixes saved to host memory: matching, replacing, evicting."""

from __future__ import annotations

from spigot.engine.saved_prefixes import SavedPrefixes


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
