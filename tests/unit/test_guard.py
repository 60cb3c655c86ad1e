"""spigot.guard: streaming guardrails over text that has not finished arriving.

The guarantees are checked as properties over random texts (non-ASCII included)
split into deltas at arbitrary points, against one-shot ``check`` and against
oracles written here independently of the guard (a brute-force search over
text folded with ``unicodedata``). Then phrase, regex, detector and plug-in
semantics, policy validation, and the OpenAI chunk wrappers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import unicodedata
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from spigot.guard import (
    Policy,
    PolicyError,
    Released,
    Trip,
    aguard_stream,
    guard_stream,
)
from spigot.guard.detectors import DETECTORS

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# --------------------------------------------------------------------------- helpers


def load(*rules: dict[str, Any]) -> Policy:
    return Policy.from_dict({"rule": list(rules)})


def phrase(rule_id: str, phrases: list[str], action: str = "block", **kw: Any) -> dict[str, Any]:
    return {"id": rule_id, "kind": "phrase", "phrases": phrases, "action": action, **kw}


def pattern(
    rule_id: str, regex: str, max_len: int, action: str = "redact", **kw: Any
) -> dict[str, Any]:
    return {
        "id": rule_id,
        "kind": "regex",
        "pattern": regex,
        "max_len": max_len,
        "action": action,
        **kw,
    }


def detector(name: str, action: str = "redact", **kw: Any) -> dict[str, Any]:
    return {"id": f"det-{name}", "kind": "detector", "detector": name, "action": action, **kw}


def split_at(text: str, cuts: Iterable[int]) -> list[str]:
    """``text`` cut at the given offsets (sorted; a repeated offset gives an empty delta)."""
    points = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(points)]


def every_composition(text: str) -> Iterator[list[str]]:
    """Every way of cutting ``text`` into non-empty deltas (2 ** (len - 1) of them)."""
    n = len(text)
    assert n <= 13, "too many compositions"
    for mask in range(1 << max(n - 1, 0)):
        yield split_at(text, [i + 1 for i in range(n - 1) if mask >> i & 1])


def cuts_up_to_two(text: str) -> Iterator[list[str]]:
    """Whole, every single cut, every pair of cuts, and one character at a time."""
    n = len(text)
    yield [text]
    for i in range(n + 1):
        yield split_at(text, [i])
    for i, j in itertools.combinations(range(1, n), 2):
        yield split_at(text, [i, j])
    yield list(text)


def single_cuts(text: str) -> Iterator[list[str]]:
    """Every single cut, and one character at a time."""
    for i in range(len(text) + 1):
        yield split_at(text, [i])
    yield list(text)


@dataclass
class Run:
    steps: list[Released] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def prefixes(self) -> list[str]:
        """What had been released after each step."""
        return list(itertools.accumulate((s.text for s in self.steps), initial=""))[1:]

    @property
    def blocked(self) -> Trip | None:
        return next((s.blocked for s in self.steps if s.blocked is not None), None)

    @property
    def trips(self) -> list[Trip]:
        return [t for s in self.steps for t in s.trips]

    @property
    def helds(self) -> list[int]:
        return [s.held for s in self.steps]


def run(policy: Policy, deltas: Iterable[str]) -> Run:
    guard = policy.output.guard()
    out = Run()
    for delta in deltas:
        out.steps.append(guard.feed(delta))
    out.steps.append(guard.finish())
    return out


def one_shot(policy: Policy, text: str) -> Released:
    return policy.output.guard().check(text)


def assert_like_one_shot(policy: Policy, text: str, deltas: list[str]) -> Run:
    """Split invariance, and every released prefix is a prefix of the final text."""
    assert "".join(deltas) == text
    whole = one_shot(policy, text)
    streamed = run(policy, deltas)
    assert streamed.text == whole.text, deltas
    assert streamed.blocked == whole.blocked, deltas
    assert streamed.trips == whole.trips, deltas
    for prefix in streamed.prefixes:
        assert whole.text.startswith(prefix), deltas
    return streamed


# --------------------------------------------------------------------------- the oracle


def oracle_fold_char(ch: str, case_sensitive: bool = False) -> str:
    """NFKD, case folding (unless case-sensitive), combining marks dropped."""
    folded = unicodedata.normalize("NFKD", ch)
    if not case_sensitive:
        folded = unicodedata.normalize("NFKD", folded.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c))


def oracle_fold(text: str, case_sensitive: bool = False) -> tuple[str, list[int]]:
    """Fold ``text`` with unicodedata directly; return it with each folded char's origin.

    Every run of whitespace is one space. Written from the contract, independently
    of spigot.guard.normalize.
    """
    out: list[str] = []
    origin: list[int] = []
    previous_space = False
    for i, ch in enumerate(text):
        if ch.isspace():
            if not previous_space:
                out.append(" ")
                origin.append(i)
            previous_space = True
            continue
        folded = oracle_fold_char(ch, case_sensitive)
        if folded:
            previous_space = False
        out.extend(folded)
        origin.extend([i] * len(folded))
    return "".join(out), origin


def oracle_phrase(p: str, case_sensitive: bool = False) -> str:
    return oracle_fold(p.strip(), case_sensitive)[0]


def oracle_matches(text: str, phrases: Iterable[str]) -> list[tuple[int, int]]:
    """Every (start, end) in ``text`` where a phrase matches (brute force, overlaps too)."""
    folded, origin = oracle_fold(text)
    spans = []
    for p in {oracle_phrase(p) for p in phrases}:
        i = folded.find(p)
        while i >= 0:
            end = origin[i + len(p) - 1] + 1
            # Combining marks after a match belong to it.
            while end < len(text) and not text[end].isspace() and not oracle_fold_char(text[end]):
                end += 1
            spans.append((origin[i], end))
            i = folded.find(p, i + 1)
    return sorted(spans)


def oracle_first(text: str, phrases: Iterable[str]) -> int | None:
    return min((s for s, _ in oracle_matches(text, phrases)), default=None)


# --------------------------------------------------------------------------- strategies

WHITESPACE = [" ", "  ", "\t", "\n", "\u00a0", " \n\t", "\u3000"]
ATOMS = [
    *"abcdeExyzSs",
    "é",
    "e\u0301",
    "\u0301",
    "É",
    "ß",
    "SS",
    "ẞ",
    "中",
    "文",
    "字",
    "😀",
    "🎉",
    "Ａ",
    "ｂ",
    "ﬁ",
    "İ",
    *"0123456789",
    *"-.,@_!",
    *WHITESPACE,
]


def variant_of(draw: st.DrawFn, p: str) -> str:
    """A random spelling of a phrase that must still match it (case-insensitive rule)."""
    out: list[str] = []
    in_space = False
    for ch in p:
        if ch.isspace():
            if not in_space:
                out.append(draw(st.sampled_from(WHITESPACE)))
            in_space = True
            continue
        in_space = False
        choices = [ch, ch.upper(), ch.lower(), unicodedata.normalize("NFD", ch)]
        if "a" <= ch.lower() <= "z":
            choices.append(chr(ord(ch) + 0xFEE0))  # full width
        if ch == "ß":
            choices += ["SS", "ss", "ẞ"]
        out.append(draw(st.sampled_from(choices)))
    return "".join(out)


@st.composite
def texts(
    draw: st.DrawFn,
    atoms: list[str] = ATOMS,
    plant: Iterable[str] = (),
    max_atoms: int = 24,
    arbitrary: bool = True,
) -> str:
    """Random text from ``atoms`` (and any Unicode), with phrases planted in it."""
    alphabet = st.sampled_from(atoms)
    if arbitrary:
        alphabet = st.one_of(
            alphabet, st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
        )
    parts = draw(st.lists(alphabet, max_size=max_atoms))
    for p in draw(st.lists(st.sampled_from(list(plant)), max_size=3)) if plant else []:
        parts.insert(draw(st.integers(0, len(parts))), variant_of(draw, p))
    return "".join(parts)


@st.composite
def split(draw: st.DrawFn, text_strategy: st.SearchStrategy[str]) -> tuple[str, list[str]]:
    """A text and a random way of cutting it into deltas (empty deltas included)."""
    text = draw(text_strategy)
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 2))
    return text, split_at(text, cuts)


# --------------------------------------------------------------------------- a plug-in


class WordFinder:
    """A plug-in for the tests: every occurrence of a word (overlapping ones too)."""

    def __init__(self, word: str, max_len: int | None, fail_on: str | None, bad_span: bool):
        self.word = word
        if max_len is not None:
            self.max_len = max_len
        self.fail_on = fail_on
        self.bad_span = bad_span
        self.calls: list[str] = []

    def find(self, text: str) -> Iterator[tuple[int, int]]:
        self.calls.append(text)
        if self.fail_on is not None and self.fail_on in text:
            raise ValueError(f"cannot stand {self.fail_on!r}")
        if self.bad_span:
            yield (0, len(text) + 5)
        at = text.find(self.word)
        while at >= 0:
            yield (at, at + len(self.word))
            at = text.find(self.word, at + 1)


def make_finder(
    word: str = "zork",
    max_len: int | None = 4,
    fail_on: str | None = None,
    bad_span: bool = False,
) -> WordFinder:
    return WordFinder(word, max_len, fail_on, bad_span)


def broken_factory(**options: Any) -> WordFinder:
    raise RuntimeError("factory exploded")


def findless_factory() -> object:
    return object()


PLUGIN = "tests.unit.test_guard:make_finder"

# --------------------------------------------------------------------------- 1. guarantees

MIXED = load(
    phrase("codename", ["purple elephant", "中文字"], "block"),
    phrase("names", ["straße", "café", "ﬁsh"], "redact"),
    phrase("overlap", ["abc", "bcd"], "redact", mask="<ov>"),
    phrase("note", ["cd", "é"], "flag"),
    phrase("word", ["cat"], "redact", whole_word=True),
    phrase("exact", ["ＡB"], "redact", case_sensitive=True),
    pattern("digits", "[0-9]{3,10}", 10),
    pattern("xy", "x[a-c]{1,6}y", 8, "block"),
    pattern("key", "key-[a-f]{4}", 8, ignore_case=True),
    {"id": "zork", "kind": "plugin", "plugin": PLUGIN, "action": "redact"},
    detector("email"),
)
MIXED_PLANTS = [
    "purple elephant",
    "中文字",
    "straße",
    "café",
    "ﬁsh",
    "abc",
    "bcd",
    "cd",
    "cat",
    "ＡB",
    "12345",
    "xaby",
    "KEY-beef",
    "zork",
    "jo@ex.com",
]
MIXED_ATOMS = [
    *ATOMS,
    "pur",
    "ple",
    "ele",
    "phant",
    "stra",
    "caf",
    "cat",
    "fish",
    "key-",
    "zor",
    "k",
    "jo@",
    "ex.",
    "com",
    "B",
]
MIXED_TEXTS = texts(MIXED_ATOMS, MIXED_PLANTS)


@SETTINGS
@given(split(MIXED_TEXTS))
def test_split_invariance_mixed_policy(case: tuple[str, list[str]]) -> None:
    text, deltas = case
    assert_like_one_shot(MIXED, text, deltas)


@pytest.mark.parametrize(
    "text",
    [
        "abcd cat.",
        "Straße cat",
        "x12345y ",
        "jo@ex.com.",
        "ﬁsh ＡB",
        "bcd中文字",
        "e\u0301 caf\u00e9",
    ],
)
def test_split_invariance_every_composition(text: str) -> None:
    for deltas in every_composition(text):
        assert_like_one_shot(MIXED, text, deltas)


@pytest.mark.parametrize(
    "text",
    [
        "Write to jo@ex.com about the purple  elephant in Straße 5.",
        "café abcd xaacy KEY-dead zork cat_cat ＡB 12345678901 e\u0301",
        "😀 ﬁsh 中文 字 cat, x\u00a0cat\ncat",
    ],
)
def test_split_invariance_every_cut_and_pair(text: str) -> None:
    for deltas in cuts_up_to_two(text):
        assert_like_one_shot(MIXED, text, deltas)


BLOCK_PHRASES = ["purple elephant", "straße", "café", "中文字", "ﬁsh", "e\u0301t\u00e9", "abc"]
BLOCKING = load(phrase("codename", BLOCK_PHRASES[:3], "block"), phrase("more", BLOCK_PHRASES[3:]))
BLOCK_ATOMS = [*ATOMS, "pur", "ple", "ele", "phant", "stra", "caf", "ab", "bc", "ét", "fi", "中文"]


@SETTINGS
@given(split(texts(BLOCK_ATOMS, BLOCK_PHRASES)))
def test_block_releases_exactly_the_text_before_the_first_match(
    case: tuple[str, list[str]],
) -> None:
    text, deltas = case
    first = oracle_first(text, BLOCK_PHRASES)
    expected = text if first is None else text[:first]
    streamed = run(BLOCKING, deltas)
    # Nothing of the blocked span or after it is ever released, at any step.
    for prefix in streamed.prefixes:
        assert expected.startswith(prefix)
    assert streamed.text == expected
    assert (streamed.blocked is None) == (first is None)
    if first is not None:
        assert streamed.blocked.start == first
        assert streamed.blocked.action == "block"


@SETTINGS
@given(st.data())
def test_planted_phrases_are_found_by_the_oracle_and_the_guard(data: st.DataObject) -> None:
    """The planting itself is sound: every variant of a phrase is blocked."""
    p = data.draw(st.sampled_from(BLOCK_PHRASES))
    spelled = variant_of(data.draw, p)
    text = "x " + spelled + " y"
    assert oracle_first(text, [p]) == 2
    assert one_shot(load(phrase("p", [p])), text).blocked.start == 2


REDACT_PHRASES = ["purple elephant", "straße", "café", "中文字", "ﬁsh", "abc", "bcd", "cde"]
REDACTING = load(
    phrase("a", REDACT_PHRASES[:4], "redact", mask="▮"),
    phrase("b", REDACT_PHRASES[4:], "redact", mask="▮"),
)


@SETTINGS
@given(split(texts([*BLOCK_ATOMS, "cd", "de"], REDACT_PHRASES)))
def test_redacted_phrases_never_appear_in_any_released_prefix(
    case: tuple[str, list[str]],
) -> None:
    text, deltas = case
    streamed = run(REDACTING, deltas)
    assert streamed.blocked is None
    for prefix in streamed.prefixes:  # the concatenation: catches a match cut across deltas
        assert oracle_matches(prefix, REDACT_PHRASES) == []
    spans = oracle_matches(text, REDACT_PHRASES)
    # Outside the matches, the text is untouched.
    covered = set().union(*(range(s, e) for s, e in spans))
    kept = "".join(ch for i, ch in enumerate(text) if i not in covered)
    assert streamed.text.replace("▮", "") == kept
    assert (streamed.text == text) == (spans == [])


SECRETS = {
    "email": "jane.doe@example.com",
    "payment_card": "4111 1111 1111 1111",
    "us_ssn": "123-45-6789",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "phone": "+1 (415) 555-2671",
    "ipv4": "192.168.10.254",
    "secret": "AKIAIOSFODNN7EXAMPLE",
}
SECRET_POLICY = load(*(detector(name) for name in SECRETS))
FILLER = ["a", "Z", "é", "中", "😀", "ß", " ", "  ", "\n", ",", "!", "Ｑ", "e\u0301"]


@SETTINGS
@given(st.data())
def test_redacted_secrets_never_appear_in_any_released_prefix(data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(sorted(SECRETS)), min_size=1, max_size=3))
    parts = data.draw(st.lists(st.sampled_from(FILLER), max_size=12))
    for name in names:
        parts.insert(data.draw(st.integers(0, len(parts))), f" {SECRETS[name]} ")
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    streamed = run(SECRET_POLICY, split_at(text, cuts))
    expected = text
    for name in names:
        expected = expected.replace(SECRETS[name], f"[REDACTED:{name}]")
    assert streamed.text == expected
    for prefix in streamed.prefixes:
        for name in names:
            assert SECRETS[name] not in prefix
    assert sorted(t.rule_id for t in streamed.trips) == sorted(f"det-{n}" for n in names)


@SETTINGS
@given(split(texts(BLOCK_ATOMS, max_atoms=40)))
def test_text_that_trips_nothing_comes_out_unchanged(case: tuple[str, list[str]]) -> None:
    text, deltas = case
    assume(oracle_first(text, BLOCK_PHRASES + REDACT_PHRASES) is None)
    for policy in (BLOCKING, REDACTING):
        streamed = run(policy, deltas)
        assert streamed.text == text
        assert streamed.trips == []
        assert streamed.blocked is None
        assert streamed.helds[-1] == 0


@SETTINGS
@given(split(texts(["a", "b", "é", "中", "😀", "ß", "Ｑ", " ", "\n", ".", "e\u0301", "ǅ"], [])))
def test_pass_through_with_every_detector(case: tuple[str, list[str]]) -> None:
    text, deltas = case
    policy = load(*(detector(name) for name in DETECTORS))
    assert run(policy, deltas).text == text


@SETTINGS
@given(split(MIXED_TEXTS))
def test_released_prefixes_only_grow_towards_the_one_shot_text(
    case: tuple[str, list[str]],
) -> None:
    text, deltas = case
    whole = one_shot(MIXED, text).text
    guard = MIXED.output.guard()
    released = ""
    for delta in [*deltas, None]:
        step = guard.feed(delta) if delta is not None else guard.finish()
        assert whole.startswith(released + step.text)
        released += step.text
        if step.blocked is not None:
            assert guard.feed("more text") == Released(blocked=step.blocked)
            assert guard.finish() == Released(blocked=step.blocked)
            break
    assert released == whole


def _bound(phrases: list[str], max_lens: Iterable[int]) -> int:
    return max([*(len(oracle_phrase(p)) for p in phrases), *(n + 1 for n in max_lens)])


HOLD_POLICIES = [
    (REDACTING, _bound(REDACT_PHRASES, [])),
    (BLOCKING, _bound(BLOCK_PHRASES, [])),
    (load(phrase("w", ["cat", "purple elephant"], "redact", whole_word=True)), 15),
    (load(pattern("digits", "[0-9]{3,10}", 10)), 11),
    (load(pattern("la", "[0-9]{2}-[a-z]{1,3}(?=[!,])", 6)), 7),
    (load(pattern("alt", "a[bc]{0,5}d|e[0-9]{1,3}", 7)), 8),
    (load(detector("email"), detector("payment_card")), DETECTORS["email"].max_len + 1),
    (load({"id": "z", "kind": "plugin", "plugin": PLUGIN, "action": "redact"}), 4),
    (MIXED, _bound(["purple elephant"], [10, 8, 8, DETECTORS["email"].max_len])),
]


@SETTINGS
@given(st.sampled_from(range(len(HOLD_POLICIES))), st.data())
def test_held_is_bounded_by_the_longest_match(index: int, data: st.DataObject) -> None:
    policy, bound = HOLD_POLICIES[index]
    text = data.draw(texts([*MIXED_ATOMS, "12-ab", "12-ab!", "abbbcd", "e12"], MIXED_PLANTS))
    # A run of whitespace folds to one space: a phrase can span any number of them.
    text = re.sub(r"\s+", " ", text)
    deltas = split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=len(text))))
    guard = policy.output.guard()
    for delta in deltas:
        step = guard.feed(delta)
        assert step.held == guard.held
        assert step.held <= bound, (text, deltas)
        if step.blocked is not None:
            assert step.held == 0
            break
    assert guard.finish().held == 0


def test_held_counts_what_was_seen_and_not_released() -> None:
    guard = load(phrase("p", ["purple elephant"])).output.guard()
    assert guard.feed("a purple ele") == Released("a ", [], None, 10)
    assert guard.feed("gant") == Released("purple elegant", [], None, 0)
    assert guard.finish() == Released("", [], None, 0)
    # After finish the guard stays finished.
    assert guard.feed("purple elephant") == Released()


# --------------------------------------------------------------------------- 2. phrases


def blocked_at(policy: Policy, text: str) -> int | None:
    trip = one_shot(policy, text).blocked
    return None if trip is None else trip.start


def assert_blocks_at_every_split(policy: Policy, text: str, start: int | None) -> None:
    for deltas in single_cuts(text):
        streamed = run(policy, deltas)
        assert (streamed.blocked and streamed.blocked.start) == start, deltas
        assert streamed.text == (text if start is None else text[:start]), deltas


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("a purple elephant", 2),
        ("a PURPLE Elephant", 2),
        ("a PuRpLe ElEpHaNt!", 2),
        ("a purple\telephant", 2),
        ("a purple \n\t elephant", 2),
        ("a purple\u00a0elephant", 2),
        ("a purple\u3000\u2003elephant", 2),
        ("a ｐｕｒｐｌｅ ｅｌｅｐｈａｎｔ", 2),
        ("a purpleelephant", None),
        ("a purple-elephant", None),
        ("a purple elephan", None),
    ],
)
def test_phrase_case_and_whitespace(text: str, start: int | None) -> None:
    assert_blocks_at_every_split(load(phrase("p", ["purple elephant"])), text, start)


def test_phrase_whitespace_in_the_phrase_itself_is_any_run() -> None:
    policy = load(phrase("p", ["  purple \t\n elephant  "]))
    assert_blocks_at_every_split(policy, "the purple elephant", 4)
    assert_blocks_at_every_split(policy, "the purple\n\nelephant", 4)


def test_phrase_case_sensitive() -> None:
    policy = load(phrase("p", ["Purple Elephant"], case_sensitive=True))
    assert_blocks_at_every_split(policy, "a Purple  Elephant", 2)
    assert_blocks_at_every_split(policy, "a purple elephant", None)
    assert_blocks_at_every_split(policy, "a PURPLE ELEPHANT", None)
    # Compatibility forms still fold when case matters.
    assert_blocks_at_every_split(policy, "a Ｐurple Ｅlephant", 2)


@pytest.mark.parametrize(
    ("phrase_text", "text", "start"),
    [
        ("café", "un cafe\u0301", 3),  # precomposed phrase, decomposed text
        ("cafe\u0301", "un café", 3),  # decomposed phrase, precomposed text
        ("CAFÉ", "un cafe\u0301!", 3),
        ("café", "un CAFE\u0301", 3),
        ("straße", "die STRASSE", 4),
        ("strasse", "die Straße", 4),
        ("STRASSE", "die straẞe", 4),
        ("ﬁsh", "a fish", 2),
        ("fish", "a ﬁsh", 2),
        ("ABC", "x ａｂｃ", 2),
        ("ＡＢＣ", "x abc", 2),
        ("\u2126", "x \u03a9", 2),  # OHM SIGN and GREEK CAPITAL OMEGA
        ("😀 中文", "x 😀\n中文", 2),
        ("mhz", "5 ㎒", 2),  # SQUARE MHZ: NFKD uncovers capitals
        ("complex", "ℂomplex", 0),  # DOUBLE-STRUCK CAPITAL C has no case mapping of its own
        # Combining marks are dropped: an accent does not defeat a phrase.
        ("café", "un cafe", 3),
        ("naïve", "naive", 0),
        ("purple", "a púrple", 2),
        ("purple", "a p\u0301urple\u0308", 2),
        ("café", "un cafe\u0301\u0327!", 3),
        ("cafe", "un CAFÉ", 3),
    ],
)
def test_phrase_unicode_equivalence(phrase_text: str, text: str, start: int | None) -> None:
    assert_blocks_at_every_split(load(phrase("p", [phrase_text])), text, start)


def test_phrase_canonical_order_of_combining_marks() -> None:
    """Canonically equivalent spellings match, whatever the order of their marks.

    "ệ" (U+1EC7) and "ê" + U+0323 (as Vietnamese keyboards type it) are the same
    text, but folding one character at a time cannot reorder their marks into
    NFKD's canonical order.
    """
    assert unicodedata.normalize("NFKD", "tiê\u0323t") == unicodedata.normalize("NFKD", "tiệt")
    policy = load(phrase("v", ["tiệt"]))
    assert blocked_at(policy, "tiệt") == 0
    assert blocked_at(policy, "tiê\u0323t") == 0
    assert blocked_at(policy, "tie\u0302\u0323t") == 0


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("cat", 0),
        ("cat sat", 0),
        ("the cat", 4),
        ("the cat.", 4),
        ("(cat)", 1),
        ("«cat»", 1),
        ("cat😀", 0),
        ("a\tCAT\n", 2),
        ("-cat-", 1),
        ("concatenate", None),
        ("cats", None),
        ("bobcat", None),
        ("_cat", None),
        ("cat_", None),
        ("cat5", None),
        ("écat", None),
        ("cató", None),
        ("中cat", None),
        ("ｃａｔ", 0),
        ("cats and a cat", 11),
    ],
)
def test_phrase_whole_word(text: str, start: int | None) -> None:
    assert_blocks_at_every_split(load(phrase("w", ["cat"], whole_word=True)), text, start)


@pytest.mark.parametrize("text", ["e\u0301cat", "cate\u0301", "Ae\u0301cat", "cafe\u0301cat"])
def test_phrase_whole_word_with_decomposed_neighbours(text: str) -> None:
    """A decomposed letter next to a match is a letter: "e" + U+0301 is "é".

    "écat" (precomposed) is one word and never matches the whole word "cat";
    its NFD spelling "e" + U+0301 + "cat" is the same text and must not either.
    The word test looks at the character just before the match, U+0301, which
    is not alphanumeric on its own.
    """
    policy = load(phrase("w", ["cat"], whole_word=True))
    assert blocked_at(policy, unicodedata.normalize("NFC", text)) is None
    assert blocked_at(policy, text) is None


def oracle_whole_words(text: str, phrases: Iterable[str]) -> list[tuple[int, int]]:
    """Whole-word matches: whole characters, and no word character on either side."""
    folded, origin = oracle_fold(text)
    spans = []
    for p in {oracle_phrase(p) for p in phrases}:
        i = folded.find(p)
        while i >= 0:
            j = i + len(p) - 1
            start, end = origin[i], origin[j] + 1
            whole_chars = (i == 0 or origin[i - 1] != start) and (
                j + 1 == len(folded) or origin[j + 1] != origin[j]
            )
            before = start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_")
            after = end < len(text) and (text[end].isalnum() or text[end] == "_")
            if whole_chars and not before and not after:
                spans.append((start, end))
            i = folded.find(p, i + 1)
    return sorted(spans)


WORD_PHRASES = ["cat", "straße", "big cat", "ﬁsh", "中文", "c++", "mas", "s"]


@SETTINGS
@given(st.data())
def test_whole_word_matches_like_the_oracle(data: st.DataObject) -> None:
    """Precomposed text (a decomposed neighbour: test_phrase_whole_word_with_decomposed_...)."""
    atoms = [*WORD_PHRASES, "bob", "ca", "t", "ß", "SS", "a", "é", "_", "5", "中", "+", " ", "."]
    text = unicodedata.normalize("NFC", data.draw(texts(atoms, WORD_PHRASES, arbitrary=False)))
    assume(not any(unicodedata.combining(c) for c in text))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    policy = load(phrase("w", WORD_PHRASES, "flag", whole_word=True))
    streamed = run(policy, split_at(text, cuts))
    assert streamed.text == text
    assert sorted((t.start, t.end) for t in streamed.trips) == oracle_whole_words(
        text, WORD_PHRASES
    )


def test_phrase_whole_word_multiword_and_punctuation() -> None:
    policy = load(phrase("w", ["big cat", "c++"], whole_word=True))
    assert_blocks_at_every_split(policy, "a big  cat!", 2)
    assert_blocks_at_every_split(policy, "a big cats", None)
    assert_blocks_at_every_split(policy, "a bbig cat", None)
    assert_blocks_at_every_split(policy, "I like c++.", 7)
    assert_blocks_at_every_split(policy, "I like abc++", None)


def test_phrase_whole_word_does_not_match_part_of_a_folded_character() -> None:
    """ "Maß" folds to "mass": the whole word is "mass", never "mas".

    A match that ends (or starts) inside one character's folding is not a word.
    """
    policy = load(phrase("w", ["mas"], whole_word=True))
    assert blocked_at(load(phrase("w", ["mass"], whole_word=True)), "das Maß") == 4
    assert blocked_at(policy, "das mass") is None
    assert blocked_at(policy, "das Maß") is None
    assert blocked_at(policy, "das Maß ist voll") is None


def test_many_phrases_in_one_rule() -> None:
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyzéßø中文"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(4, 9))) for _ in range(500)})
    policy = load(phrase("dict", words, "redact", mask="#", whole_word=True))
    chosen = rng.sample(words, 40)
    text = " ".join(w.upper() if i % 3 == 0 else w for i, w in enumerate(chosen))
    expected = " ".join("#" for _ in chosen)
    for deltas in ([text], list(text), split_at(text, range(0, len(text), 7))):
        assert run(policy, deltas).text == expected
    assert run(policy, ["zzzz " * 50]).text == "zzzz " * 50


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(alphabet="abcé ßx中", min_size=1, max_size=5).filter(lambda w: w.strip()),
        min_size=1,
        max_size=500,
    ),
    st.data(),
)
def test_many_phrases_flag_every_occurrence(words: list[str], data: st.DataObject) -> None:
    """Aho-Corasick against brute force: every (overlapping) occurrence is a trip."""
    words = list({oracle_phrase(w): w for w in words}.values())
    policy = load(phrase("many", words, "flag"))
    text, deltas = data.draw(
        split(texts(["a", "b", "c", "é", "e\u0301", "ß", "s", "x", " ", "中"]))
    )
    streamed = run(policy, deltas)
    assert streamed.text == text
    assert sorted((t.start, t.end) for t in streamed.trips) == oracle_matches(text, words)


def test_hundred_rules_at_once() -> None:
    rules = []
    for i in range(100):
        action = ("redact", "flag", "redact", "block")[i % 4] if i != 99 else "block"
        rules.append(phrase(f"r{i:03d}", [f"tok{i:03d}q", f"alt{i:03d}ß"], action, mask=f"<{i}>"))
    policy = load(*rules)
    words = ["tok000q", "ALT002SS", "tok001q", "tok006q", "plain", "alt097ß", "tok003q", "x"]
    text = " ".join(words)
    expected = "<0> <2> tok001q <6> plain alt097ß "  # r001 and r097 only flag
    for deltas in cuts_up_to_two(text[:30]):
        assert_like_one_shot(policy, text[:30], deltas)
    streamed = run(policy, split_at(text, range(0, len(text), 3)))
    assert streamed.text == expected
    assert [t.rule_id for t in streamed.trips] == ["r000", "r002", "r001", "r006", "r097", "r003"]
    start = text.index("tok003q")
    assert streamed.blocked == Trip("r003", "block", start, start + 7)


def test_overlapping_phrases_in_one_rule_redact_their_union() -> None:
    policy = load(phrase("o", ["abc", "bcd", "cdef", "b"], "redact", mask="#"))
    for deltas in every_composition("xabcdefy"):
        streamed = run(policy, deltas)
        # Each match that reaches past the masks so far adds its own mask.
        assert streamed.text == "x###y"
        assert [(t.start, t.end) for t in streamed.trips] == [(1, 4), (2, 5), (2, 3), (3, 7)]


def test_a_phrase_inside_a_longer_one() -> None:
    policy = load(phrase("short", ["ele"], "redact", mask="#"), phrase("long", ["elephant"]))
    assert_like_one_shot(policy, "an elephant", ["an el", "ephant"])
    assert one_shot(policy, "an elephant").text == "an "
    assert one_shot(policy, "an elegant").text == "an #gant"
    for deltas in every_composition("an elegant."):
        assert run(policy, deltas).text == "an #gant."


def test_block_overlapping_a_redaction_wins_from_its_start() -> None:
    # The block starts first: nothing of either span is released.
    policy = load(phrase("r", ["phant"], "redact", mask="#"), phrase("b", ["elephant"]))
    for deltas in every_composition("an elephant!"):
        streamed = run(policy, deltas)
        assert streamed.text == "an "
        assert streamed.blocked == Trip("b", "block", 3, 11)
    # Both start together: block wins, the shorter or the longer.
    for redact, block in (("elep", "elephant"), ("elephant", "ele")):
        policy = load(phrase("r", [redact], "redact", mask="#"), phrase("b", [block]))
        for deltas in every_composition("an elephant!"):
            streamed = run(policy, deltas)
            assert streamed.text == "an "
            assert streamed.blocked == Trip("b", "block", 3, 3 + len(block))
    # Also when the two come from different kinds of rule.
    policy = load(pattern("r", "[a-z]{3}phant", 8), phrase("b", ["ele"], case_sensitive=True))
    for deltas in every_composition("an elephant!"):
        assert run(policy, deltas).text == "an "
    # The redaction starts first: its mask replaces it, then the stream ends.
    policy = load(phrase("r", ["an ele"], "redact", mask="#"), phrase("b", ["elephant"]))
    for deltas in every_composition("an elephant!"):
        streamed = run(policy, deltas)
        assert streamed.text == "#"
        assert streamed.blocked == Trip("b", "block", 3, 11)


def test_two_overlapping_redactions() -> None:
    policy = load(
        phrase("one", ["secret code"], "redact", mask="<1>"),
        phrase("two", ["code name"], "redact", mask="<2>"),
    )
    for deltas in cuts_up_to_two("a secret code name."):
        streamed = run(policy, deltas)
        assert streamed.text == "a <1><2>."
        assert [t.rule_id for t in streamed.trips] == ["one", "two"]
    # One inside the other: one mask.
    policy = load(
        phrase("outer", ["secret code name"], "redact", mask="<o>"),
        phrase("inner", ["code"], "redact", mask="<i>"),
    )
    for deltas in cuts_up_to_two("a secret code name."):
        assert run(policy, deltas).text == "a <o>."


def test_flag_only_records() -> None:
    policy = load(phrase("f", ["purple"], "flag"), phrase("r", ["ple"], "redact", mask="#"))
    for deltas in every_composition("purple rain"):
        streamed = run(policy, deltas)
        assert streamed.text == "pur# rain"
        assert streamed.trips == [Trip("f", "flag", 0, 6), Trip("r", "redact", 3, 6)]


def test_default_masks() -> None:
    policy = load(
        phrase("codeword", ["plover"], "redact"),
        detector("email"),
        pattern("num", "[0-9]{5}", 5, mask=""),
    )
    assert one_shot(policy, "plover a@b.io 12345!").text == "[REDACTED:codeword] [REDACTED:email] !"


# --------------------------------------------------------------------------- 3. regex rules


def test_regex_greedy_growth_digit_by_digit() -> None:
    policy = load(pattern("digits", "[0-9]{3,10}", 10))
    text = "call 5551234567 now"
    for deltas in single_cuts(text):
        streamed = run(policy, deltas)
        assert streamed.text == "call [REDACTED:digits] now", deltas
        assert streamed.trips == [Trip("digits", "redact", 5, 15)]
    # Eleven digits: the first ten, then one that is too short to match.
    assert run(policy, list("a 12345678901 b")).text == "a [REDACTED:digits]1 b"


def test_regex_max_len_bounds_what_is_held() -> None:
    policy = load(pattern("quoted", '"[a-z]{1,8}"', 10))
    guard = policy.output.guard()
    helds = [guard.feed(ch).held for ch in '"abcdefghijklmnop']
    assert max(helds) <= 11
    # A partial match that can no longer fit is given up and released.
    assert helds[-1] == 0
    # Also when the pattern itself has no bound: max_len is the bound.
    guard = load(pattern("q", '"[^"]*"', 10)).output.guard()
    assert max(guard.feed(ch).held for ch in '"' + "x" * 50) <= 10


def test_regex_lookbehind_sees_text_before_a_confirmed_match() -> None:
    """After a match is confirmed the window is trimmed, but a lookbehind still sees back."""
    policy = load(pattern("three", "(?<![0-9])[0-9]{3}", 3))
    text = "id 1234567 and 12 345"
    expected = "id [REDACTED:three]4567 and 12 [REDACTED:three]"
    assert one_shot(policy, text).text == expected
    for deltas in cuts_up_to_two(text):
        assert run(policy, deltas).text == expected, deltas


def test_regex_scanner_keeps_a_bounded_window() -> None:
    """A regex rule needs at most max_len + CONTEXT characters of the stream.

    White-box (``TextGuard._window``): if the scanner's position did not move past
    text that holds only a partial match (with ``partial=True`` there nearly
    always is one, if only the empty one at the end of the text), the window would
    never be trimmed and every delta would search again from the last match:
    memory linear and CPU quadratic in the length of the stream.
    """
    policy = load(detector("email"), pattern("digits", "[0-9]{3,10}", 10))
    guard = policy.output.guard()
    for _ in range(4000):
        assert guard.feed("word ").text
    assert len(guard._window.buf) <= DETECTORS["email"].max_len + 64 + 5


def test_regex_max_len_bounds_what_is_held_for_an_unbounded_pattern() -> None:
    """max_len bounds the hold even when the pattern itself could match longer.

    A complete match that reaches the end of the text could still grow; it must
    not be held beyond max_len (+1 for a lookahead) all the same.
    """
    policy = load(pattern("num", "[0-9]+", 5))
    guard = policy.output.guard()
    helds = [guard.feed("7").held for _ in range(100)]
    assert max(helds) <= 6


def test_regex_ignore_case() -> None:
    sensitive = load(pattern("k", "key-[a-f]{4}", 8))
    insensitive = load(pattern("k", "key-[a-f]{4}", 8, ignore_case=True))
    for deltas in single_cuts("a KEY-BEEF."):
        assert run(sensitive, deltas).text == "a KEY-BEEF."
        assert run(insensitive, deltas).text == "a [REDACTED:k]."
    assert one_shot(sensitive, "a key-beef.").text == "a [REDACTED:k]."


def test_regex_one_character_negative_lookahead() -> None:
    policy = load(pattern("four", "(?<![0-9])[0-9]{4}(?![0-9])", 4))
    for text, expected in [
        ("pin 1234.", "pin [REDACTED:four]."),
        ("pin 1234", "pin [REDACTED:four]"),
        ("pin 12345.", "pin 12345."),
        ("pin 1234 5678", "pin [REDACTED:four] [REDACTED:four]"),
    ]:
        for deltas in cuts_up_to_two(text):
            assert run(policy, deltas).text == expected, deltas


def test_regex_one_character_positive_lookahead() -> None:
    """A match of exactly max_len characters whose lookahead is not yet known.

    After "1234" the match is partial (the lookahead needs one more character)
    while seen - start == max_len: it must not be given up as "too long", or
    "1234" leaks when "X" arrives in the next delta.
    """
    policy = load(pattern("la", "[0-9]{4}(?=[A-Z])", 4))
    assert one_shot(policy, "1234X").text == "[REDACTED:la]X"
    assert run(policy, ["1234", "X"]).text == "[REDACTED:la]X"
    for deltas in single_cuts("id 1234X 99"):
        assert run(policy, deltas).text == "id [REDACTED:la]X 99", deltas


def test_regex_later_complete_match_does_not_release_an_earlier_partial_one() -> None:
    """``regex``'s partial search prefers a complete match anywhere to an earlier partial one.

    After "abcd", ``search(partial=True)`` for ``abcdef|cd`` returns the complete
    "cd" at 2, not the partial "abcd" at 0; holding only from 2 would release "ab",
    the start of the span that is blocked once "ef" arrives.
    """
    policy = load(pattern("alt", "abcdef|cd", 6, "block"))
    assert one_shot(policy, "abcdef").text == ""
    streamed = run(policy, ["abcd", "ef"])
    assert streamed.blocked == Trip("alt", "block", 0, 6)
    assert streamed.text == ""


def test_regex_complete_match_that_could_still_grow_is_held() -> None:
    """``regex`` returns the complete "555" for ``[0-9]{3}(?:-[0-9]{4})?`` over "555-".

    It ends before the text does, yet "-1234" may still make the match longer:
    confirming it at once gives two masks and "-" and "4" released, where the
    whole text at once gives one mask.
    """
    policy = load(pattern("opt", "[0-9]{3}(?:-[0-9]{4})?", 8))
    assert one_shot(policy, "555-1234").text == "[REDACTED:opt]"
    assert run(policy, ["555-", "1234"]).text == "[REDACTED:opt]"


def test_regex_lookbehind_and_start_anchor_across_deltas() -> None:
    policy = load(pattern("lb", "(?<=token: )[a-z]{6}", 6), pattern("start", "^hello", 5))
    text = "hello, token: abcdef and hello, xtoken: abcdef"
    for deltas in cuts_up_to_two(text[:20]):
        assert_like_one_shot(policy, text[:20], deltas)
    expected = "[REDACTED:start], token: [REDACTED:lb] and hello, xtoken: [REDACTED:lb]"
    for deltas in single_cuts(text):
        assert run(policy, deltas).text == expected
    # A start anchor matches only at the start of the stream, however it is cut.
    long = "x" * 200 + "hello"
    for deltas in (list(long), split_at(long, [150, 200]), [long]):
        assert run(policy, deltas).text == long


REGEX_CASES = [
    ("[0-9]{3,10}", 10),
    ("x[a-c]{1,6}y", 8),
    ("(?<![a-z])[a-z]{2}[0-9](?![0-9])", 3),
    ("a[bc]{0,5}d|e[0-9]{1,3}", 7),
    ("abcdef|cd", 6),
    ("[0-9]{3}(?:-[0-9]{4})?", 8),
    ("[0-9]{4}(?=[A-Z])", 4),
    ("(?<![0-9])[0-9]{3}", 3),
    ("[0-9]{1,5}(?:\\.[0-9]{1,5})?", 11),
]


@SETTINGS
@given(
    st.sampled_from(REGEX_CASES),
    split(
        texts(
            [*"abcdefxyz120 -.X", "é", "中", "abcd", "ef", "555-", "1234", "3.14"],
            ["abcdef", "555-1234", "1234X", "1234567.5"],
        )
    ),
)
def test_regex_split_invariance(case: tuple[str, int], text_split: tuple[str, list[str]]) -> None:
    regex, max_len = case
    text, deltas = text_split
    policy = load(pattern("r", regex, max_len), pattern("b", "zzz", 3, "block"))
    streamed = assert_like_one_shot(policy, text, deltas)
    expected = re.sub(regex, "[REDACTED:r]", text.split("zzz")[0])
    if "zzz" not in text:
        assert streamed.text == expected


# --------------------------------------------------------------------------- 4. detectors

DETECTOR_SAMPLES = [
    ("email", "jane.doe+news@mail.example.co.uk"),
    ("email", "a_b@x-y.io"),
    ("phone", "+1 (415) 555-2671"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "(555) 123-4567"),
    ("phone", "555-123-4567"),
    ("payment_card", "4111 1111 1111 1111"),
    ("payment_card", "5500-0000-0000-0004"),
    ("payment_card", "378282246310005"),
    ("iban", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "DE89370400440532013000"),
    ("us_ssn", "123-45-6789"),
    ("ipv4", "192.168.1.20"),
    ("ipv4", "8.8.8.8"),
    ("secret", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "ghp_" + "a1B2" * 9),
    ("secret", "sk-proj-" + "Ab3_" * 8),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----"),
    ("secret", "xoxb-1234567890-abcdefghij"),
    ("secret", "sk_live_" + "0aZ" * 9),
    ("secret", "AIza" + "B" * 35),
]


@pytest.mark.parametrize(("name", "value"), DETECTOR_SAMPLES)
def test_detector_at_every_split(name: str, value: str) -> None:
    policy = load(detector(name))
    text = f"Über: {value} ok"
    expected = f"Über: [REDACTED:{name}] ok"
    assert re.fullmatch(DETECTORS[name].pattern, value)
    assert len(value) <= DETECTORS[name].max_len
    for deltas in single_cuts(text):
        streamed = run(policy, deltas)
        assert streamed.text == expected, deltas
        assert [t.rule_id for t in streamed.trips] == [f"det-{name}"]
        for prefix in streamed.prefixes:
            assert value not in prefix
    # And blocking just before it, at every split.
    policy = load(detector(name, "block"))
    for deltas in single_cuts(text):
        assert run(policy, deltas).text == "Über: "


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("payment_card", "card 4111 1111 1111 1112 ok"),  # Luhn fails
        ("payment_card", "id 41111111111111111111111 ok"),  # too long
        ("iban", "iban GB82 WEST 1234 5698 7654 33 ok"),  # mod 97 fails
        ("us_ssn", "ssn 000-12-3456 ok"),
        ("us_ssn", "ssn 123-45-67890 ok"),
        ("ipv4", "v 1.2.3.4.5 ok"),
        ("ipv4", "v 256.1.1.1 ok"),
        ("email", "mail me at jane@ ok"),
        ("secret", "AKIAIOSFODNN7EXAMPLEX"),
        ("phone", "n 555-123-45678 ok"),
    ],
)
def test_detector_non_matches_pass_at_every_split(name: str, text: str) -> None:
    policy = load(detector(name))
    for deltas in single_cuts(text):
        assert run(policy, deltas).text == text, deltas


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_max_len_is_a_true_bound(name: str) -> None:
    """A long run of what a detector reads is never held beyond its max_len + 1."""
    policy = load(detector(name))
    bound = DETECTORS[name].max_len + 1
    for fill in ("1", "a", "1 ", "1-", "a.", "A", "-"):
        guard = policy.output.guard()
        for ch in fill * 300:
            assert guard.feed(ch).held <= bound


DETECTOR_ATOMS = [
    *"0123456789",
    "4111",
    "1111",
    " ",
    "-",
    ".",
    "@",
    "+",
    "(",
    ")",
    "a",
    "Z",
    "ex",
    ".com",
    "GB82",
    "WEST",
    "AKIA",
    "é",
    "\n",
]


@SETTINGS
@given(split(texts(DETECTOR_ATOMS, [v for _, v in DETECTOR_SAMPLES], arbitrary=False)))
def test_detectors_split_invariance(case: tuple[str, list[str]]) -> None:
    text, deltas = case
    policy = load(*(detector(name) for name in DETECTORS))
    assert_like_one_shot(policy, text, deltas)


def test_phone_number_with_a_trailing_group_after_a_pause() -> None:
    """The phone detector must not confirm "+49 30 1234 5678" before " 90" is known.

    The whole text matches "+49 30 1234 5678 90" (13 digits, within E.164's 15), so
    a split after the space must not change the result and release the last digits.
    """
    policy = load(detector("phone"))
    text = "call +49 30 1234 5678 90 now"
    assert one_shot(policy, text).text == "call [REDACTED:phone] now"
    assert run(policy, ["call +49 30 1234 5678 ", "90 now"]).text == "call [REDACTED:phone] now"


# --------------------------------------------------------------------------- 5. plug-ins


def plugin_rule(**kw: Any) -> dict[str, Any]:
    return {"id": "plug", "kind": "plugin", "plugin": PLUGIN, "action": "redact", **kw}


def test_plugin_with_options_at_every_split() -> None:
    policy = load(plugin_rule(options={"word": "plover", "max_len": 6}))
    finder = policy.output._plugins[0][0]
    assert isinstance(finder, WordFinder)
    assert finder.word == "plover"
    text = "a plover, a PLOVER, xyzzy ploverplover"
    expected = "a [REDACTED:plug], a PLOVER, xyzzy [REDACTED:plug][REDACTED:plug]"
    for deltas in cuts_up_to_two(text):
        streamed = run(policy, deltas)
        assert streamed.text == expected
        assert [(t.start, t.end) for t in streamed.trips] == [(2, 8), (26, 32), (32, 38)]
        assert max(streamed.helds) <= 6


def test_plugin_max_len_from_the_rule() -> None:
    policy = load(plugin_rule(options={"word": "xyzzy", "max_len": None}, max_len=5))
    for deltas in single_cuts("say xyzzy!"):
        assert run(policy, deltas).text == "say [REDACTED:plug]!"
    with pytest.raises(PolicyError, match=r"'plug'.*max_len"):
        load(plugin_rule(options={"word": "xyzzy", "max_len": None}))


def test_plugin_block_and_applies_to_input() -> None:
    policy = load(plugin_rule(action="block", applies_to=["input"]))
    assert not policy.output
    trip = Trip("plug", "block", 2, 6)
    assert policy.input.guard().check("a zork b") == Released("a ", [trip], trip)
    assert policy.output.guard().check("a zork b") == Released("a zork b")


def test_plugin_that_raises_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    """A plug-in that raises blocks the stream from what is not yet released, and logs."""
    policy = load(plugin_rule(options={"fail_on": "!"}))
    guard = policy.output.guard()
    assert guard.feed("no bang here").text == "no bang h"
    with caplog.at_level(logging.ERROR, logger="spigot.guard"):
        step = guard.feed(" now!!!!")
    trip = Trip("plug", "block", 9, 20)
    assert step == Released("", [trip], trip, 0)
    assert guard.blocked == trip
    assert guard.held == 0
    assert "plug-in raised ValueError: cannot stand '!'" in caplog.text
    assert "plug" in caplog.text
    assert guard.feed("more") == Released(blocked=trip)
    assert guard.finish() == Released(blocked=trip)
    # Too short for the plug-in to look at before the end: finish blocks.
    guard = policy.output.guard()
    assert guard.feed("a!") == Released("", [], None, 2)
    trip = Trip("plug", "block", 0, 2)
    assert guard.finish() == Released("", [trip], trip, 0)
    # Through the chunk wrapper too.
    policy = load(plugin_rule(action="redact", options={"fail_on": "!"}))
    out = list(guard_stream(chat_reply(["Hello", " world", "!"]), policy))
    assert texts_by_choice(out) == {0: "Hello wo"}
    assert finishes(out) == [(0, "content_filter")]
    # A flag rule could only have recorded: it is dropped for the stream, text flows.
    policy = load(plugin_rule(action="flag", options={"fail_on": "!"}))
    out = list(guard_stream(chat_reply(["Hello", " world", "!"]), policy))
    assert texts_by_choice(out) == {0: "Hello world!"}
    assert finishes(out) == [(0, "stop")]


def test_plugin_span_outside_its_text_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    guard = load(plugin_rule(options={"bad_span": True})).output.guard()
    with caplog.at_level(logging.ERROR, logger="spigot.guard"):
        out = guard.check("some text")
    assert out.text == ""
    assert out.blocked == Trip("plug", "block", 0, 9)
    assert "outside its text" in caplog.text


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"plugin": "tests.unit.test_guard"}, "package.module:factory"),
        ({"plugin": "tests.unit.test_guard:no_such_factory"}, "cannot load the plug-in"),
        ({"plugin": "tests.unit.no_such_module:make_finder"}, "ModuleNotFoundError"),
        ({"plugin": "tests.unit.test_guard:broken_factory"}, "factory exploded"),
        ({"plugin": "tests.unit.test_guard:findless_factory"}, "no find"),
        ({"plugin": PLUGIN, "options": {"colour": "red"}}, "TypeError"),
        ({"plugin": PLUGIN, "entry_point": "x"}, "exactly one"),
        ({"plugin": None}, "exactly one"),
        ({"plugin": None, "entry_point": "spigot-no-such-plugin"}, "no entry point"),
        ({"plugin": PLUGIN, "max_len": 0}, "max_len"),
        ({"plugin": PLUGIN, "max_len": 4097}, "max_len"),
        ({"plugin": PLUGIN, "options": "word"}, "'options' must be a dict"),
        ({"plugin": PLUGIN, "options": {"max_len": None}}, "max_len"),
    ],
)
def test_bad_plugins_fail_at_load(rule: dict[str, Any], message: str) -> None:
    raw = {k: v for k, v in plugin_rule(**rule).items() if v is not None}
    with pytest.raises(PolicyError, match="rule 'plug'") as info:
        load(raw)
    assert message in str(info.value)


# --------------------------------------------------------------------------- 6. validation


def toml_rule(**values: str | None) -> str:
    """One [[rule]] table from TOML values written out (None: left out); id "r" by default."""
    values = {"id": '"r"', **values}
    return "\n".join(["[[rule]]", *(f"{k} = {v}" for k, v in values.items() if v is not None)])


REGEX = {"kind": '"regex"', "pattern": '"ab"', "max_len": "3", "action": '"block"'}
PHRASE = {"kind": '"phrase"', "phrases": '["x"]', "action": '"block"'}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**REGEX, "pattern": '"(ab"'}, "'pattern' is not a valid regular expression"),
        ({**REGEX, "pattern": '"[a-"'}, "'pattern' is not a valid regular expression"),
        ({**REGEX, "pattern": '"x*"'}, "'pattern' matches the empty string"),
        ({**REGEX, "pattern": '"a|"'}, "'pattern' matches the empty string"),
        ({**REGEX, "pattern": '"(?:)"'}, "'pattern' matches the empty string"),
        ({**REGEX, "max_len": None}, "'max_len' is missing"),
        ({**REGEX, "pattern": None}, "'pattern' is missing"),
        ({**REGEX, "max_len": "0"}, "'max_len' must be between 1 and 4096 (got 0)"),
        ({**REGEX, "max_len": "5000"}, "'max_len' must be between 1 and 4096"),
        ({**REGEX, "max_len": '"5"'}, "'max_len' must be a int"),
        ({**REGEX, "max_len": "true"}, "'max_len' must be a int"),
        ({**REGEX, "max_len": "3.0"}, "'max_len' must be a int"),
        ({**REGEX, "pattern": "5"}, "'pattern' must be a str"),
        ({**REGEX, "ignore_case": "1"}, "'ignore_case' must be a bool"),
        ({**REGEX, "phrases": '["x"]'}, "unknown key(s) for kind 'regex': phrases"),
        (
            {"kind": '"detector"', "detector": '"dna"', "action": '"block"'},
            "unknown detector 'dna'",
        ),
        ({"kind": '"detector"', "action": '"block"'}, "unknown detector None"),
        (
            {"kind": '"detector"', "detector": '"email"', "action": '"flag"', "pattern": '"x"'},
            "unknown key(s) for kind 'detector': pattern",
        ),
        ({**PHRASE, "kind": '"magic"'}, "'kind' must be one of phrase, regex, detector, plugin"),
        ({**PHRASE, "kind": None}, "'kind' must be one of"),
        ({**PHRASE, "kind": "3"}, "'kind' must be a str"),
        ({**PHRASE, "action": '"shout"'}, "'action' must be one of block, redact, flag"),
        ({**PHRASE, "action": None}, "'action' must be one of"),
        ({**PHRASE, "action": '["block"]'}, "'action' must be a str"),
        ({**PHRASE, "max_len": "3"}, "unknown key(s) for kind 'phrase': max_len"),
        ({**PHRASE, "colour": "1", "size": "2"}, "unknown key(s) for kind 'phrase': colour, size"),
        ({**PHRASE, "phrases": "[]"}, "'phrases' must be a non-empty list of strings"),
        ({**PHRASE, "phrases": None}, "'phrases' must be a non-empty list of strings"),
        ({**PHRASE, "phrases": '"x"'}, "'phrases' must be a list"),
        ({**PHRASE, "phrases": '["x", 2]'}, "'phrases' must be a non-empty list of strings"),
        ({**PHRASE, "phrases": '["x", ""]'}, "the phrase '' is empty"),
        ({**PHRASE, "phrases": '[" \\t\\n\\u00a0"]'}, "is empty once whitespace is trimmed"),
        ({**PHRASE, "case_sensitive": '"yes"'}, "'case_sensitive' must be a bool"),
        ({**PHRASE, "whole_word": "1"}, "'whole_word' must be a bool"),
        ({**PHRASE, "mask": "7"}, "'mask' must be a str"),
        ({**PHRASE, "applies_to": '"output"'}, "'applies_to' must be a list"),
        ({**PHRASE, "applies_to": "[]"}, "'applies_to' must list 'output' and/or 'input'"),
        ({**PHRASE, "applies_to": '["outgoing"]'}, "'applies_to' must list"),
        ({**PHRASE, "applies_to": '["input", 3]'}, "'applies_to' must list"),
    ],
)
def test_malformed_rule_names_the_rule(values: dict[str, str | None], message: str) -> None:
    toml = toml_rule(**values)
    with pytest.raises(PolicyError) as info:
        Policy.from_toml(toml, source="guard.toml")
    text = str(info.value)
    assert text.startswith("guard.toml: rule 'r': "), text
    assert message in text, text


OK_RULE = toml_rule(id='"ok"', **PHRASE)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (toml_rule(id=None, **PHRASE), "rule #1: 'id' is missing"),
        (OK_RULE + "\n" + toml_rule(id='""', **PHRASE), "rule #2: 'id' is missing"),
        (toml_rule(id='"  "', **PHRASE), "rule #1: 'id' is missing"),
        (toml_rule(id="12", **PHRASE), "rule #1: 'id' is missing"),
        (OK_RULE + "\n" + OK_RULE, "rule 'ok': the id is used twice"),
        ("rules = []", "unknown top-level key(s) rules"),
        ("version = 2\n" + OK_RULE, "unknown top-level key(s) version"),
        ("rule = 5", "'rule' must be an array of tables"),
        ("rule = [1, 2]", "'rule' must be an array of tables"),
        ("[[rule]\nid = 'a'", "not valid TOML"),
        ("this is not toml", "not valid TOML"),
        ('{"rule": []}', "not valid TOML"),
        (OK_RULE + "\nid = 'again'", "not valid TOML"),
    ],
)
def test_malformed_policy(toml: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_toml(toml, source="guard.toml")
    assert str(info.value).startswith("guard.toml: ")
    assert message in str(info.value), str(info.value)


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


def test_policy_from_file(tmp_path: Any) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(PolicyError, match=r"missing\.toml: cannot read the policy"):
        Policy.from_file(missing)
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.from_file(tmp_path)  # a directory
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nid = "x"\nkind = "phrase"\nphrases = []\naction = "block"\n')
    with pytest.raises(PolicyError, match=re.escape(f"{bad}: rule 'x'")):
        Policy.from_file(bad)
    good = tmp_path / "guard.toml"
    good.write_text(
        """
        [[rule]]
        id = "secret-project"
        kind = "phrase"
        phrases = ["purple elephant", "Straße"]
        action = "block"

        [[rule]]
        id = "pii"
        kind = "detector"
        detector = "email"
        action = "redact"
        applies_to = ["output", "input"]
        description = "no addresses"

        [[rule]]
        id = "ticket"
        kind = "regex"
        pattern = "TICKET-[0-9]{4}"
        max_len = 11
        action = "flag"
        applies_to = ["input"]

        [[rule]]
        id = "plover"
        kind = "plugin"
        plugin = "tests.unit.test_guard:make_finder"
        options = { word = "plover", max_len = 6 }
        action = "redact"
        mask = "***"
        """,
        encoding="utf-8",
    )
    policy = Policy.from_file(str(good))
    assert [r.id for r in policy.rules] == ["secret-project", "pii", "ticket", "plover"]
    assert [r.id for r in policy.output.rules] == ["secret-project", "pii", "plover"]
    assert [r.id for r in policy.input.rules] == ["pii", "ticket"]
    assert str(good) in repr(policy)
    out = policy.output.guard().check("mail a@b.io, plover, TICKET-1234, purple elephant")
    assert out.text == "mail [REDACTED:email], ***, TICKET-1234, "
    assert out.blocked.rule_id == "secret-project"
    inp = policy.input.guard().check("mail a@b.io, TICKET-1234 purple elephant")
    assert inp.text == "mail [REDACTED:email], TICKET-1234 purple elephant"
    assert [t.rule_id for t in inp.trips] == ["pii", "ticket"]


def test_empty_policy_passes_everything() -> None:
    policy = Policy.from_toml("")
    assert not policy.output and not policy.input
    assert run(policy, ["a purple ", "elephant"]).text == "a purple elephant"


# --------------------------------------------------------------------------- 7. chunks

BLOCK_AND_REDACT = load(
    phrase("codename", ["purple elephant"], "block"),
    detector("email"),
)


def chat(index: int = 0, content: str | None = None, finish: str | None = None, **delta: Any):
    if content is not None:
        delta["content"] = content
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
    if content:
        choice["logprobs"] = {
            "content": [{"token": content, "logprob": -0.5, "bytes": None, "top_logprobs": []}]
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }


def legacy(index: int = 0, text: str = "", finish: str | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if text:
        choice["logprobs"] = {"tokens": [text], "token_logprobs": [-0.5]}
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }


def usage(obj: str = "chat.completion.chunk") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": obj,
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def as_sdk(chunks: list[dict[str, Any]]) -> list[Any]:
    """The openai SDK's objects: chat chunks validated, legacy chunks as the SDK builds them.

    ``CompletionChoice.finish_reason`` is not Optional in the SDK's types, so a
    streamed legacy chunk (finish_reason null) fails ``model_validate``; the SDK
    itself builds stream chunks with ``construct_type``.
    """
    out = []
    for c in chunks:
        if c["object"] == "chat.completion.chunk":
            out.append(ChatCompletionChunk.model_validate(c))
        elif all(ch["finish_reason"] for ch in c["choices"]):
            out.append(Completion.model_validate(c))
        else:
            out.append(construct_type(type_=Completion, value=c))
    return out


def get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key)


def texts_by_choice(chunks: list[Any]) -> dict[int, str]:
    """The text of each choice, put together from its chunks (chat or legacy)."""
    out: dict[int, str] = {}
    for chunk in chunks:
        for choice in get(chunk, "choices"):
            delta = (
                choice.get("delta") if isinstance(choice, dict) else getattr(choice, "delta", None)
            )
            text = get(delta, "content") if delta is not None else get(choice, "text")
            index = get(choice, "index")
            out[index] = out.get(index, "") + (text or "")
    return out


def finishes(chunks: list[Any]) -> list[tuple[int, str]]:
    return [
        (get(c, "index"), get(c, "finish_reason"))
        for chunk in chunks
        for c in get(chunk, "choices")
        if get(c, "finish_reason") is not None
    ]


def chat_reply(pieces: list[str], finish: str = "stop", index: int = 0) -> list[dict[str, Any]]:
    return [
        chat(index, "", role="assistant"),
        *(chat(index, p) for p in pieces),
        chat(index, finish=finish),
    ]


REPLY = ["Mail ja", "ne@exam", "ple.com", " today", "."]


@pytest.mark.parametrize("sdk", [False, True], ids=["dict", "sdk"])
def test_chat_stream_redacts_and_flushes_in_the_finish_chunk(sdk: bool) -> None:
    upstream = [*chat_reply(["Mail ja", "ne@exam", "ple.co"]), usage()]
    if sdk:
        upstream = as_sdk(upstream)
    trips: list[tuple[int, Trip]] = []
    out = list(
        guard_stream(iter(upstream), BLOCK_AND_REDACT, on_trip=lambda i, t: trips.append((i, t)))
    )
    assert all(type(c) is type(upstream[0]) for c in out)
    # The role chunk passes, held text comes out in the finish chunk, usage passes.
    assert get(get(get(out[0], "choices")[0], "delta"), "role") == "assistant"
    assert texts_by_choice(out) == {0: "Mail [REDACTED:email]"}
    assert finishes(out) == [(0, "stop")]
    assert texts_by_choice(out[-2:-1]) == {0: "[REDACTED:email]"}
    assert len(out) == 4  # role, "Mail ", finish, usage: wholly held chunks are skipped
    assert out[-1] == upstream[-1]
    assert [t.rule_id for _, t in trips] == ["det-email"]
    # Logprobs are removed, and the upstream chunks are not modified.
    for chunk in out[:-1]:
        assert all(get(c, "logprobs") is None for c in get(chunk, "choices"))
    assert texts_by_choice(upstream[1:4]) == {0: "Mail jane@example.co"}
    assert get(get(upstream[1], "choices")[0], "logprobs") is not None


@pytest.mark.parametrize("sdk", [False, True], ids=["dict", "sdk"])
def test_legacy_completion_stream(sdk: bool) -> None:
    upstream = [
        legacy(0, "Mail ja"),
        legacy(0, "ne@example.com"),
        legacy(0, ", the purple "),
        legacy(0, "elephant"),
        legacy(0, " says hi"),
        legacy(0, "", "stop"),
        usage("text_completion"),
    ]
    if sdk:
        upstream = as_sdk(upstream)
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert all(type(c) is type(upstream[0]) for c in out)
    assert texts_by_choice(out) == {0: "Mail [REDACTED:email], the "}
    assert finishes(out) == [(0, "content_filter")]
    assert all(get(c, "logprobs") is None for chunk in out[:-1] for c in get(chunk, "choices"))
    assert out[-1] == upstream[-1]  # the usage chunk still arrives
    # Held text comes out in the chunk that carries finish_reason.
    upstream = [legacy(0, "Mail ja"), legacy(0, "ne@example.com"), legacy(0, "", "length")]
    if sdk:
        upstream = as_sdk(upstream)
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert [texts_by_choice([c]) for c in out] == [{0: "Mail "}, {0: "[REDACTED:email]"}]
    assert finishes(out) == [(0, "length")]
    assert all(type(c) is type(upstream[0]) for c in out)


@pytest.mark.parametrize("sdk", [False, True], ids=["dict", "sdk"])
def test_blocked_choice_ends_with_content_filter(sdk: bool) -> None:
    upstream = [
        *chat_reply(["I saw a purple el", "ephant and", " then", " more"])[:-1],
        chat(0, " end", "stop"),
        usage(),
    ]
    if sdk:
        upstream = as_sdk(upstream)
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert texts_by_choice(out) == {0: "I saw a "}
    assert finishes(out) == [(0, "content_filter")]
    # Nothing of the choice after the blocked chunk: only the usage chunk follows.
    assert get(out[-1], "choices") == []
    assert get(get(out[-2], "choices")[0], "finish_reason") == "content_filter"


@pytest.mark.parametrize("sdk", [False, True], ids=["dict", "sdk"])
def test_two_choices_interleaved_are_guarded_independently(sdk: bool) -> None:
    zero = chat_reply(["a purple ", "elephant", " walks"])
    one = chat_reply(["write to x", "@y.org", " or purple", " rain"], index=1)
    upstream = [c for pair in itertools.zip_longest(zero, one) for c in pair if c is not None]
    # Choice 0's "purple " and choice 1's continuation must not combine.
    upstream.insert(3, chat(1, "elephant"))
    upstream.append(usage())
    if sdk:
        upstream = as_sdk(upstream)
    trips: list[tuple[int, Trip]] = []
    out = list(guard_stream(upstream, BLOCK_AND_REDACT, on_trip=lambda i, t: trips.append((i, t))))
    assert texts_by_choice(out) == {0: "a ", 1: "elephantwrite to [REDACTED:email] or purple rain"}
    assert sorted(finishes(out)) == [(0, "content_filter"), (1, "stop")]
    assert sorted((i, t.rule_id) for i, t in trips) == [(0, "codename"), (1, "det-email")]
    assert all(type(c) is type(upstream[0]) for c in out)


@pytest.mark.parametrize("sdk", [False, True], ids=["dict", "sdk"])
def test_several_choices_in_one_chunk(sdk: bool) -> None:
    def both(zero: str | None, one: str | None, finish: str | None = None) -> dict[str, Any]:
        chunk = chat(0, zero, finish)
        chunk["choices"] += chat(1, one, finish)["choices"]
        return chunk

    upstream = [
        both("", ""),
        both("the purple", "the purple"),
        both(" elephant!", " rain"),
        both(" again", " falls"),
        both(None, None, "stop"),
    ]
    if sdk:
        upstream = as_sdk(upstream)
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert texts_by_choice(out) == {0: "the ", 1: "the purple rain falls"}
    assert sorted(finishes(out)) == [(0, "content_filter"), (1, "stop")]
    # Once choice 0 is blocked, later chunks carry choice 1 only.
    assert [len(get(c, "choices")) for c in out] == [2, 2, 2, 1, 1]
    assert all(type(c) is type(upstream[0]) for c in out)


def test_chunks_with_other_fields_pass() -> None:
    tool = chat(
        0, tool_calls=[{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{}"}}]
    )
    upstream = [
        chat(0, "", role="assistant"),
        tool,
        chat(0, "purple"),
        chat(0, finish="tool_calls"),
    ]
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert out[1] == tool
    assert texts_by_choice(out) == {0: "purple"}
    assert finishes(out) == [(0, "tool_calls")]


def test_stream_that_ends_without_finish_reason_is_flushed() -> None:
    upstream = [chat(0, "", role="assistant"), chat(0, "hello purple ele")]
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert texts_by_choice(out) == {0: "hello purple ele"}
    assert finishes(out) == []
    assert get(get(out[-1], "choices")[0], "delta") == {"content": "purple ele"}
    # Decided only at the end: a whole-word match blocks in the flushed chunk.
    policy = load(phrase("w", ["cat"], whole_word=True))
    out = list(guard_stream([chat(0, "", role="assistant"), chat(0, "a cat")], policy))
    assert texts_by_choice(out) == {0: "a "}
    assert finishes(out) == [(0, "content_filter")]


def test_stream_that_ends_without_finish_reason_keeps_wholly_held_text() -> None:
    """A choice whose only chunk was wholly held still gets its text at the end.

    No role chunk before it (legacy completions, or a proxy that drops it) and an
    upstream that ends without finish_reason: the flush has no yielded chunk of
    the choice to copy, and "purple" (which trips nothing) must not disappear.
    """
    out = list(guard_stream([chat(0, "purple")], BLOCK_AND_REDACT))
    assert texts_by_choice(out) == {0: "purple"}
    out = list(guard_stream([legacy(0, "purple")], BLOCK_AND_REDACT))
    assert texts_by_choice(out) == {0: "purple"}


class Upstream:
    """An iterator of chunks that records how far it was read and whether it was closed."""

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = chunks
        self.read = 0
        self.closed = False

    def __iter__(self) -> Upstream:
        return self

    def __next__(self) -> Any:
        if self.closed or self.read == len(self._chunks):
            raise StopIteration
        self.read += 1
        return self._chunks[self.read - 1]

    def close(self) -> None:
        self.closed = True


BLOCKED_REPLY = [*chat_reply(["a purple elephant!", " b", " c"]), usage()]


def test_close_on_block_closes_the_upstream() -> None:
    upstream = Upstream(as_sdk(BLOCKED_REPLY))
    out = list(guard_stream(upstream, BLOCK_AND_REDACT, close_on_block=True))
    assert upstream.closed
    assert upstream.read == 2
    assert finishes(out) == [(0, "content_filter")]
    assert texts_by_choice(out) == {0: "a "}
    # Without it, the upstream is read to its end (its usage chunk arrives) and not closed.
    upstream = Upstream(BLOCKED_REPLY)
    out = list(guard_stream(upstream, BLOCK_AND_REDACT))
    assert not upstream.closed
    assert upstream.read == len(BLOCKED_REPLY)
    assert out[-1] == BLOCKED_REPLY[-1]


def test_close_on_block_closes_a_generator() -> None:
    state = {"closed": False}

    def gen() -> Iterator[dict[str, Any]]:
        try:
            yield from BLOCKED_REPLY
        finally:
            state["closed"] = True

    out = list(guard_stream(gen(), BLOCK_AND_REDACT, close_on_block=True))
    assert state["closed"]
    assert len(out) == 2


def test_close_on_block_waits_for_choices_not_yet_seen() -> None:
    """With n=2, choice 0 blocked before choice 1's first chunk is not "every choice".

    The guard cannot know how many choices a stream has: ``choices`` tells it.
    """
    upstream = Upstream(
        [
            chat(0, "", role="assistant"),
            chat(0, "a purple elephant!"),
            chat(1, "", role="assistant"),
            chat(1, "fine"),
            chat(0, finish="stop"),
            chat(1, finish="stop"),
        ]
    )
    out = list(guard_stream(upstream, BLOCK_AND_REDACT, close_on_block=True, choices=2))
    assert texts_by_choice(out) == {0: "a ", 1: "fine"}
    assert finishes(out) == [(0, "content_filter"), (1, "stop")]


async def agen(chunks: list[Any], state: dict[str, Any]) -> AsyncIterator[Any]:
    try:
        for chunk in chunks:
            state["read"] = state.get("read", 0) + 1
            await asyncio.sleep(0)
            yield chunk
    finally:
        state["closed"] = True


@pytest.mark.parametrize("sdk", [False, True], ids=["dict", "sdk"])
async def test_aguard_stream(sdk: bool) -> None:
    upstream = [*chat_reply(REPLY), usage()]
    if sdk:
        upstream = as_sdk(upstream)
    state: dict[str, Any] = {}
    out = [c async for c in aguard_stream(agen(upstream, state), BLOCK_AND_REDACT)]
    assert texts_by_choice(out) == {0: "Mail [REDACTED:email] today."}
    assert finishes(out) == [(0, "stop")]
    assert out[-1] == upstream[-1]
    assert all(type(c) is type(upstream[0]) for c in out)
    assert state["read"] == len(upstream)


async def test_aguard_stream_close_on_block() -> None:
    upstream = as_sdk(BLOCKED_REPLY)
    state: dict[str, Any] = {}
    trips: list[tuple[int, Trip]] = []
    out = [
        c
        async for c in aguard_stream(
            agen(upstream, state),
            BLOCK_AND_REDACT,
            close_on_block=True,
            on_trip=lambda i, t: trips.append((i, t)),
        )
    ]
    assert state == {"read": 2, "closed": True}
    assert finishes(out) == [(0, "content_filter")]
    assert trips == [(0, Trip("codename", "block", 2, 17))]

    class Closable:
        """An async iterable with an async close(), like openai.AsyncStream."""

        def __init__(self) -> None:
            self.closed = False
            self._it = iter(BLOCKED_REPLY)

        def __aiter__(self) -> Closable:
            return self

        async def __anext__(self) -> Any:
            try:
                return next(self._it)
            except StopIteration:
                raise StopAsyncIteration from None

        async def close(self) -> None:
            self.closed = True

    closable = Closable()
    out = [c async for c in aguard_stream(closable, BLOCK_AND_REDACT, close_on_block=True)]
    assert closable.closed
    assert texts_by_choice(out) == {0: "a "}


@SETTINGS
@given(split(texts(MIXED_ATOMS, MIXED_PLANTS)))
def test_chunk_stream_matches_the_text_guard(case: tuple[str, list[str]]) -> None:
    text, deltas = case
    whole = one_shot(MIXED, text)
    upstream = chat_reply([d for d in deltas if d])
    out = list(guard_stream(as_sdk(upstream), MIXED))
    assert texts_by_choice(out).get(0, "") == whole.text
    assert finishes(out) == [(0, "content_filter" if whole.blocked else "stop")]
