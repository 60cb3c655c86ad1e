"""Utf8Assembler, StopMatcher and TextAssembler: what a stream may release, and when."""

from __future__ import annotations

import itertools
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spigot.engine.llamacpp.output import StopMatcher, StopResult, TextAssembler, Utf8Assembler

T = TypeVar("T", str, bytes)

SETTINGS = settings(max_examples=300, deadline=None)

# Whole characters of every UTF-8 length, without surrogates (not encodable) and
# without U+FFFD itself (so any U+FFFD in an output is the assembler's doing).
CHARS = st.one_of(
    st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"),
    st.sampled_from("aé中😀ñ日本語🎉𝄞ß€"),
)
TEXTS = st.text(alphabet=CHARS, max_size=40)


def split_at(data: T, cuts: list[int]) -> list[T]:
    """``data`` split at the given offsets (sorted, duplicates give empty pieces)."""
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@st.composite
def split_bytes(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    text = draw(TEXTS)
    data = text.encode()
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return text, split_at(data, cuts)


# -- Utf8Assembler -------------------------------------------------------------


def assemble(pieces: list[bytes]) -> tuple[list[str], str]:
    asm = Utf8Assembler()
    outs = [asm.push(p) for p in pieces]
    return outs, asm.flush()


def check_whole_characters(text: str, outs: list[str], tail: str) -> None:
    assert "".join(outs) + tail == text
    released = ""
    for out in outs:
        assert "\ufffd" not in out
        released += out
        # Every push ends on a character boundary of the original text.
        assert text.startswith(released)
    # Valid input: everything was released by the pushes, nothing is left over.
    assert tail == ""


@SETTINGS
@given(TEXTS)
def test_utf8_every_single_split_point(text: str) -> None:
    data = text.encode()
    for cut in range(len(data) + 1):
        outs, tail = assemble([data[:cut], data[cut:]])
        check_whole_characters(text, outs, tail)


@SETTINGS
@given(TEXTS)
def test_utf8_one_byte_at_a_time(text: str) -> None:
    data = text.encode()
    outs, tail = assemble([data[i : i + 1] for i in range(len(data))])
    check_whole_characters(text, outs, tail)


@SETTINGS
@given(split_bytes())
def test_utf8_arbitrary_splits(case: tuple[str, list[bytes]]) -> None:
    text, pieces = case
    outs, tail = assemble(pieces)
    check_whole_characters(text, outs, tail)


def test_utf8_holds_a_split_character_until_it_is_whole() -> None:
    asm = Utf8Assembler()
    emoji = "😀".encode()
    assert asm.push(b"a" + emoji[:1]) == "a"
    assert asm.push(emoji[1:3]) == ""
    assert asm.push(emoji[3:] + b"b") == "😀b"
    assert asm.flush() == ""


def test_utf8_invalid_bytes_become_replacement_characters() -> None:
    asm = Utf8Assembler()
    assert asm.push(b"a\xffb") == "a\ufffdb"


def test_utf8_incomplete_tail_is_replaced_at_flush() -> None:
    asm = Utf8Assembler()
    assert asm.push("é".encode()[:1]) == ""
    assert asm.flush() == "\ufffd"


# -- StopMatcher ---------------------------------------------------------------

STOP_ALPHABET = "ab c"
STOP_TEXTS = st.text(alphabet=STOP_ALPHABET, max_size=30)
STOPS = st.lists(st.text(alphabet=STOP_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=4)


@st.composite
def split_text(draw: st.DrawFn) -> list[str]:
    text = draw(STOP_TEXTS)
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=10))
    return split_at(text, cuts)


def earliest_stop(text: str, stops: list[str]) -> int:
    """Start of the earliest-starting stop string in ``text``, or -1."""
    found = [at for at in (text.find(s) for s in stops) if at != -1]
    return min(found, default=-1)


def streaming_reference(deltas: list[str], stops: list[str]) -> tuple[str, int | None]:
    """What a stream must produce: generation ends with the first delta after which the
    text holds a stop string, and the text is cut where the earliest stop string starts.

    Returns the final text and the index of the stopping delta (None: no stop)."""
    text = ""
    for i, delta in enumerate(deltas):
        text += delta
        cut = earliest_stop(text, stops)
        if cut != -1:
            return text[:cut], i
    return text, None


def run_matcher(deltas: list[str], stops: list[str]) -> tuple[list[StopResult], str]:
    """Push deltas until a stop; flush only when the stream ended without one."""
    matcher = StopMatcher(tuple(stops))
    results: list[StopResult] = []
    for delta in deltas:
        results.append(matcher.push(delta))
        if results[-1].stopped:
            return results, ""
    return results, matcher.flush()


def substring_free(stops: list[str]) -> list[str]:
    """Drop every stop string that contains another one."""
    unique = set(stops)
    return sorted(s for s in unique if not any(o != s and o in s for o in unique))


@settings(max_examples=500, deadline=None)
@given(split_text(), STOPS)
def test_stop_matcher_matches_reference(deltas: list[str], stops: list[str]) -> None:
    expected, stop_at = streaming_reference(deltas, stops)
    results, tail = run_matcher(deltas, stops)

    released = ""
    for result in results:
        released += result.text
        for stop in stops:
            assert stop not in released
        assert expected.startswith(released)
    assert released + tail == expected

    stopped_at = [i for i, r in enumerate(results) if r.stopped]
    if stop_at is None:
        assert stopped_at == []
    else:
        assert stopped_at == [stop_at]
        assert tail == ""


@settings(max_examples=500, deadline=None)
@given(split_text(), STOPS)
def test_stop_matcher_is_split_independent_for_substring_free_stops(
    deltas: list[str], raw_stops: list[str]
) -> None:
    # When no stop string contains another, where the text was split cannot matter:
    # the result is the whole text cut at the earliest stop string.
    stops = substring_free(raw_stops)
    text = "".join(deltas)
    cut = earliest_stop(text, stops)
    results, tail = run_matcher(deltas, stops)
    released = "".join(r.text for r in results) + tail
    assert released == (text if cut == -1 else text[:cut])
    assert any(r.stopped for r in results) == (cut != -1)


@SETTINGS
@given(STOP_TEXTS, STOPS)
def test_stop_matcher_whole_text_in_one_push(text: str, stops: list[str]) -> None:
    result = StopMatcher(tuple(stops)).push(text)
    cut = earliest_stop(text, stops)
    if cut == -1:
        assert not result.stopped
        assert text.startswith(result.text)
    else:
        assert result == StopResult(text[:cut], True)


def test_stop_split_across_three_deltas() -> None:
    matcher = StopMatcher(("</end>",))
    assert matcher.push("hello </") == StopResult("hello ", False)
    assert matcher.push("en") == StopResult("", False)
    assert matcher.push("d> ignored") == StopResult("", True)


def test_false_start_is_released_once_it_cannot_match() -> None:
    matcher = StopMatcher(("</end>",))
    assert matcher.push("a </e") == StopResult("a ", False)
    assert matcher.push("x") == StopResult("</ex", False)
    assert matcher.flush() == ""


def test_stop_that_is_a_prefix_of_another() -> None:
    # "ab" completes first: the stream stops there, before "abc" could.
    matcher = StopMatcher(("abc", "ab"))
    assert matcher.push("x a") == StopResult("x ", False)
    assert matcher.push("b") == StopResult("", True)


def test_longer_stop_found_in_the_same_delta_wins_by_position() -> None:
    matcher = StopMatcher(("b", "ab"))
    assert matcher.push("xab") == StopResult("x", True)


def test_overlapping_partial_match() -> None:
    # "a" is held (could start "ab"); the second "a" shows the first one could not.
    matcher = StopMatcher(("ab",))
    assert matcher.push("a") == StopResult("", False)
    assert matcher.push("a") == StopResult("a", False)
    assert matcher.push("b") == StopResult("", True)


def test_overlapping_partial_match_in_one_delta() -> None:
    assert StopMatcher(("ab",)).push("aab") == StopResult("a", True)


def test_self_overlapping_stop() -> None:
    matcher = StopMatcher(("aab",))
    assert matcher.push("aa") == StopResult("", False)
    assert matcher.push("a") == StopResult("a", False)
    assert matcher.push("b") == StopResult("", True)


def test_stop_inside_another_depends_on_when_it_completes() -> None:
    # "b" lies inside "aba": a stream stops as soon as any stop string is complete.
    one = StopMatcher(("aba", "b"))
    assert one.push("aba") == StopResult("", True)
    two = StopMatcher(("aba", "b"))
    assert two.push("a") == StopResult("", False)
    assert two.push("b") == StopResult("a", True)  # "aba" can no longer happen


def test_held_text_is_released_by_flush() -> None:
    matcher = StopMatcher(("stop",))
    assert matcher.push("a st") == StopResult("a ", False)
    assert matcher.flush() == "st"
    assert matcher.flush() == ""


@pytest.mark.parametrize("stops", [(), ("",)])
def test_no_stops_passes_text_through(stops: tuple[str, ...]) -> None:
    matcher = StopMatcher(stops)
    assert matcher.push("abc") == StopResult("abc", False)
    assert matcher.flush() == ""


# -- TextAssembler ---------------------------------------------------------------


def test_text_assembler_stop_with_multibyte_char_split_across_pieces() -> None:
    asm = TextAssembler(("é!",))
    data = "café! more".encode()
    e_at = data.index("é".encode())
    pieces = [data[: e_at + 1], data[e_at + 1 : e_at + 2], data[e_at + 2 :]]
    assert asm.push(pieces[0]) == StopResult("caf", False)
    assert asm.push(pieces[1]) == StopResult("", False)  # "é" whole, could start "é!"
    assert asm.push(pieces[2]) == StopResult("", True)


def test_text_assembler_releases_held_multibyte_prefix_when_stop_fails() -> None:
    asm = TextAssembler(("é!",))
    data = "éa".encode()
    assert asm.push(data[:1]) == StopResult("", False)
    assert asm.push(data[1:2]) == StopResult("", False)
    assert asm.push(data[2:]) == StopResult("éa", False)
    assert asm.finish() == StopResult("", False)


def test_text_assembler_finish_releases_held_text() -> None:
    asm = TextAssembler(("日本",))
    assert asm.push("x日".encode()) == StopResult("x", False)
    assert asm.finish() == StopResult("日", False)


def test_text_assembler_finish_replaces_an_incomplete_character() -> None:
    asm = TextAssembler(("zz",))
    assert asm.push(b"a" + "😀".encode()[:2]) == StopResult("a", False)
    assert asm.finish() == StopResult("\ufffd", False)


@st.composite
def bytes_pieces_with_stops(draw: st.DrawFn) -> tuple[str, list[bytes], list[str]]:
    alphabet = st.sampled_from("aé日😀 ")
    text = draw(st.text(alphabet=alphabet, max_size=20))
    stops = draw(st.lists(st.text(alphabet=alphabet, min_size=1, max_size=3), max_size=3))
    data = text.encode()
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    return text, split_at(data, cuts), stops


@SETTINGS
@given(bytes_pieces_with_stops())
def test_text_assembler_never_releases_partial_chars_or_stops(
    case: tuple[str, list[bytes], list[str]],
) -> None:
    text, pieces, stops = case
    asm = TextAssembler(tuple(stops))
    released = ""
    stopped = False
    for piece in pieces:
        result = asm.push(piece)
        assert "\ufffd" not in result.text
        released += result.text
        assert text.startswith(released)
        assert not any(s in released for s in stops)
        if result.stopped:
            stopped = True
            break
    if not stopped:
        final = asm.finish()
        assert not final.stopped
        released += final.text
        # The stream ended without a stop: it must not have contained one.
        assert released == text
        assert earliest_stop(text, stops) == -1
    else:
        assert earliest_stop(text, stops) != -1
