"""The built-in guard detectors: what they find, what they leave, and the rules the stream needs."""

from __future__ import annotations

import re

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from spigot.guard.detectors import DETECTORS, Detector, iban_valid, luhn_valid

# CPython's own regular expression parser measures a pattern's width and walks its
# lookaheads: an independent check of what the detectors claim (the patterns
# stay valid for ``re`` for this reason).
_parser = pytest.importorskip("re._parser")

COMPILED = {name: regex.compile(d.pattern, regex.VERSION0) for name, d in DETECTORS.items()}


def found(name: str, text: str) -> list[tuple[int, int]]:
    """Spans of the matches that count, as the guard would find them in the whole text."""
    d = DETECTORS[name]
    return [
        m.span()
        for m in COMPILED[name].finditer(text)
        if d.validate is None or d.validate(m.group())
    ]


def span_of(text: str, needle: str) -> tuple[int, int]:
    start = text.index(needle)
    return start, start + len(needle)


SLACK_TOKEN = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"

# (text, the exact part of it that is found): one match per text.
POSITIVE: dict[str, list[tuple[str, str]]] = {
    "email": [
        ("jane.doe@example.com", "jane.doe@example.com"),
        ("Write to jane.doe+news@mail.example.co.uk today", "jane.doe+news@mail.example.co.uk"),
        ("<ops-team_1@my-host.io>", "ops-team_1@my-host.io"),
        ("mailto:A.B@EXAMPLE.ORG, then", "A.B@EXAMPLE.ORG"),
        # The full stop after an address is taken with it (see the module docstring).
        ("Contact support@example.com.", "support@example.com."),
        ("(x@y.dev)", "x@y.dev"),
    ],
    "phone": [
        ("(555) 123-4567", "(555) 123-4567"),
        ("call 555-123-4567.", "555-123-4567"),
        ("or 555.123.4567, after 6pm", "555.123.4567"),
        ("Tel: +44 20 7946 0958", "+44 20 7946 0958"),
        ("+1 415 555 2671 is the office", "+1 415 555 2671"),
        ("+1 (415) 555-2671", "+1 (415) 555-2671"),
        ("+44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
        ("+14155552671", "+14155552671"),
        ("+33 1 23 45 67 89", "+33 1 23 45 67 89"),
        ("+49-30-1234567", "+49-30-1234567"),
        ("toll free 1-800-555-1234", "1-800-555-1234"),
        ("(555)123-4567", "(555)123-4567"),
    ],
    "payment_card": [
        ("4111 1111 1111 1111", "4111 1111 1111 1111"),
        ("card: 4242424242424242, exp 12/26", "4242424242424242"),
        ("4111-1111-1111-1111", "4111-1111-1111-1111"),
        ("amex 3782 822463 10005.", "3782 822463 10005"),
        ("378282246310005", "378282246310005"),
        ("5555555555554444", "5555555555554444"),
        ("diners 3056 930902 5904", "3056 930902 5904"),
        ("4222222222222 (13 digits)", "4222222222222"),
        ("6011111111111117", "6011111111111117"),
        # The printed groups end the number: a CVV after it is not swallowed.
        ("4111 1111 1111 1111 123", "4111 1111 1111 1111"),
    ],
    "iban": [
        ("GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
        ("IBAN: DE89370400440532013000.", "DE89370400440532013000"),
        ("DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00"),
        ("to FR14 2004 1010 0505 0001 3M02 606 by Friday", "FR14 2004 1010 0505 0001 3M02 606"),
        ("NO93 8601 1117 947", "NO93 8601 1117 947"),
        ("BE68 5390 0754 7034", "BE68 5390 0754 7034"),
        ("MT84 MALT 0110 0001 2345 MTLC AST0 01S", "MT84 MALT 0110 0001 2345 MTLC AST0 01S"),
        ("(CH9300762011623852957)", "CH9300762011623852957"),
    ],
    "us_ssn": [
        ("123-45-6789", "123-45-6789"),
        ("SSN: 078-05-1120.", "078-05-1120"),
        ("665-99-0001", "665-99-0001"),
        ("899-01-9999", "899-01-9999"),
    ],
    "ipv4": [
        ("10.0.0.1", "10.0.0.1"),
        ("server 192.168.1.254:8080", "192.168.1.254"),
        ("255.255.255.255", "255.255.255.255"),
        ("0.0.0.0/0", "0.0.0.0"),
        ("(8.8.8.8)", "8.8.8.8"),
        # A full stop may end a sentence or start a fifth number: it goes with the match.
        ("Ping 172.16.0.1.", "172.16.0.1."),
    ],
    "secret": [
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE", "-----BEGIN RSA PRIVATE KEY-----"),
        ("-----BEGIN PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "-----BEGIN OPENSSH PRIVATE KEY-----"),
        ("-----BEGIN EC PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----"),
        ("-----BEGIN DSA PRIVATE KEY-----", "-----BEGIN DSA PRIVATE KEY-----"),
        ("-----BEGIN ENCRYPTED PRIVATE KEY-----", "-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----", "-----BEGIN PGP PRIVATE KEY BLOCK-----"),
        ("aws_access_key_id=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("ASIAY34FZKBOKMUTVV7A ", "ASIAY34FZKBOKMUTVV7A"),
        ("token ghp_" + "a1B2" * 9, "ghp_" + "a1B2" * 9),
        ("gho_" + "Z" * 36 + ".", "gho_" + "Z" * 36),
        ("ghs_" + "0" * 36, "ghs_" + "0" * 36),
        ("github_pat_" + "11AB_cd" * 11 + "xyzab", "github_pat_" + "11AB_cd" * 11 + "xyzab"),
        ("OPENAI_API_KEY=sk-" + "A1b2C3d4E5" * 4, "sk-" + "A1b2C3d4E5" * 4),
        ('"sk-proj-' + "x_Y-9" * 30 + '"', "sk-proj-" + "x_Y-9" * 30),
        (f"SLACK_BOT_TOKEN={SLACK_TOKEN}\n", SLACK_TOKEN),
        ("key=AIzaSyA-1234567890abcdefghijklmnopqrstu&", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
        ("sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"),
        ("rk_test_" + "a" * 99, "rk_test_" + "a" * 99),
    ],
}

# Texts in which a detector finds nothing.
NEGATIVE: dict[str, list[str]] = {
    "email": [
        "no address here, just words and a @ sign",
        "user@localhost",
        "me@host.c",
        "@example.com",
        "a@-bad.com",
        "x@y.com-z",
        "price: $1,234.56 in 2024 at 12:30, Python 3.11.7",
    ],
    "phone": [
        "In 2023 the price rose to $1,234.56 by 12:30.",
        "version 3.11.7 and 10.0.0.1",
        "+5 points, +12345 votes",
        "555-1234",
        "123-45-6789",
        "12345678901",
        "2024-01-15",
        "555-123-45678",
        "+1234567890123456",  # 16 digits: longer than any number
        "a+14155552671",
        "ISBN 978-3-16-148410-0",
    ],
    "payment_card": [
        "4111 1111 1111 1112",  # Luhn fails
        "4111111111111112",
        "1234567890123456789012345",  # a card's worth of digits inside a longer number
        "41111111111111111111",
        "1700000000000",  # a millisecond timestamp (starts with 1)
        "the year 2024, $1,234.56, v3.11.7",
        "order 0.4111111111111111",
        "123 4111 1111 1111 1111",  # inside a longer run of groups
        "4111 1111 1111",
        "٤١١١١١١١١١١١١١١١",  # Arabic-Indic digits are not card digits
    ],
    "iban": [
        "GB82 WEST 1234 5698 7654 33",  # check digits wrong
        "DE89370400440532013001",
        "GB82WEST123456987654",  # too short for GB
        "DE89 3704 0044 0532 0130 001",  # one character too many for DE
        "XDE89370400440532013000",
        "DE893704004405320130001234",
        "Hello WORLD 2024 and ABCD EFGH",
        "gb82 west 1234 5698 7654 32",
    ],
    "us_ssn": [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "123-00-4567",
        "123-45-0000",
        "1123-45-6789",
        "123-45-67890",
        "0-123-45-6789",
        "123-45-6789-1",
        "123 45 6789",
        "2024-01-15",
        "١٢٣-٤٥-٦٧٨٩",
    ],
    "ipv4": [
        "256.1.1.1",
        "1.2.3.4.5",
        "1.2.3",
        "Python 3.11.7",
        "v1.2.3.4",
        "1.2.3.4a",
        "01.02.03.04",
        "1.2.3.256",
        "$1,234.56 at 12:30",
        "10.0.0.1.2",
    ],
    "secret": [
        "-----BEGIN PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----",
        "AKIAIOSFODNN7EXAMPL",  # 15 characters after the prefix
        "AKIAIOSFODNN7EXAMPLE1",
        "XAKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a" * 35,
        "ghp_" + "a" * 37,
        "task-" + "a" * 30,
        "sk-" + "a" * 19,
        "sk-" + "a" * 201,
        "scikit sk-learn pipelines",
        "xoxb-short",
        "AIza" + "b" * 34,
        "sk_live_" + "a" * 23,
        "sk_prod_" + "a" * 30,
        "the desk-top and the risk",
    ],
}


def test_the_detectors() -> None:
    assert set(DETECTORS) == {
        "email",
        "phone",
        "payment_card",
        "iban",
        "us_ssn",
        "ipv4",
        "secret",
    }
    for name, d in DETECTORS.items():
        assert isinstance(d, Detector)
        assert d.name == name
        assert d.description


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [(name, text, expected) for name, cases in POSITIVE.items() for text, expected in cases],
)
def test_found(name: str, text: str, expected: str) -> None:
    assert found(name, text) == [span_of(text, expected)]


@pytest.mark.parametrize(
    ("name", "text"), [(name, text) for name, texts in NEGATIVE.items() for text in texts]
)
def test_not_found(name: str, text: str) -> None:
    assert found(name, text) == []


def test_other_detectors_stay_quiet_on_prose() -> None:
    prose = (
        "In 2023 revenue grew 12% to $1,234.56 million; the 3.11.7 release shipped at 12:30 "
        "on 2024-01-15. Chapter 4, pages 120-135, lists 42 items (see fig. 3.2) and "
        "version 1.2.3 of the tool."
    )
    for name in DETECTORS:
        assert found(name, prose) == [], name


def test_several_in_one_text() -> None:
    text = "mail a@b.io or c@d.io, cards 4111111111111111 and 5555 5555 5555 4444."
    assert found("email", text) == [span_of(text, "a@b.io"), span_of(text, "c@d.io")]
    assert found("payment_card", text) == [
        span_of(text, "4111111111111111"),
        span_of(text, "5555 5555 5555 4444"),
    ]


def test_known_good_values_validate() -> None:
    for card in (
        "4111 1111 1111 1111",
        "4242424242424242",
        "4111-1111-1111-1111",
        "378282246310005",
        "5555 5555 5555 4444",
        "6011111111111117",
    ):
        assert luhn_valid(card), card
    for iban in (
        "GB82 WEST 1234 5698 7654 32",
        "DE89370400440532013000",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "NO9386011117947",
        "MT84MALT011000012345MTLCAST001S",
        "gb82west12345698765432",
    ):
        assert iban_valid(iban), iban


def test_luhn_rejects() -> None:
    assert not luhn_valid("4111 1111 1111 1112")
    assert not luhn_valid("")
    assert not luhn_valid(" - ")
    assert not luhn_valid("4111x1111")
    assert not luhn_valid("٤١١١١١١١١١١١١١١١")  # Unicode digits: not a number here
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def test_iban_rejects() -> None:
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")  # checksum
    assert not iban_valid("GB82WEST1234569876543")  # length for GB
    assert not iban_valid("DE8937040044053201300")
    assert not iban_valid("")
    assert not iban_valid("GB8-WEST12345698765432")
    assert not iban_valid("1282WEST12345698765432")
    assert not iban_valid("GBX2WEST12345698765432")
    # A country missing from the table: 15..34 characters and the checksum.
    assert iban_valid(_with_check("ZZ", "1234567890ABC"))
    assert not iban_valid(_with_check("ZZ", "1234567890"))  # 14 characters
    assert not iban_valid(_with_check("ZZ", "1" * 31))  # 35 characters


def _mod97(country: str, check: str, bban: str) -> int:
    return int("".join(str(int(ch, 36)) for ch in bban + country + check)) % 97


def _with_check(country: str, bban: str) -> str:
    """An IBAN with correct check digits, to test the rules around the checksum."""
    return f"{country}{98 - _mod97(country, '00', bban):02d}{bban}"


def test_check_digits_out_of_range() -> None:
    """00, 01 and 99 are never computed check digits, even where mod 97 would pass."""
    for check in ("00", "01", "99"):
        bban = next(
            bban for n in range(10_000) if _mod97("GB", check, bban := f"WEST{n:014d}") == 1
        )
        assert not iban_valid(f"GB{check}{bban}")


# -- the rules the streaming guard relies on ---------------------------------------------


def test_ascii_classes_only() -> None:
    # \d, \w, \s and \b are Unicode-aware in ``regex``; the detectors spell classes out.
    for d in DETECTORS.values():
        assert re.search(r"(?<!\\)\\[dDwWsSbB]", d.pattern) is None, d.name


def test_patterns_compile_for_both_engines() -> None:
    for d in DETECTORS.values():
        regex.compile(d.pattern, regex.VERSION0)
        re.compile(d.pattern)


def test_no_detector_matches_the_empty_string() -> None:
    for name, d in DETECTORS.items():
        assert _parser.parse(d.pattern).getwidth()[0] >= 1, name
        pattern = COMPILED[name]
        assert pattern.search("") is None, name
        assert pattern.fullmatch("") is None, name
        assert all(m.group() for m in pattern.finditer(" . - @ + ( ) \n ")), name


def test_max_len_is_a_tight_bound() -> None:
    """Every quantifier bounded, and ``max_len`` exactly the longest possible match."""
    for name, d in DETECTORS.items():
        assert _parser.parse(d.pattern).getwidth()[1] == d.max_len, name


def test_longest_matches_reach_max_len() -> None:
    longest = {
        "secret": "xoxp-" + "a1" * 100,
        "ipv4": "255.255.255.255.",
        "us_ssn": "123-45-6789",
        "payment_card": "4" + "0" * 17 + "4",
        "phone": "+1" + "".join(f" ({i % 10}" for i in range(14)),
    }
    for name, text in longest.items():
        (match,) = COMPILED[name].finditer(text)
        assert len(match.group()) == DETECTORS[name].max_len, name
    assert not found("secret", "xoxp-" + "a1" * 100 + "b")


def _lookahead_reach(sub: _parser.SubPattern) -> list[int]:
    """For each lookahead: how far past the end of what follows it (in its sequence) it reads.

    Items after the lookahead that are certainly consumed (their minimum width)
    cover that much of its reach; what is left reads past them. Items outside the
    lookahead's own sequence are not counted, which only overstates the reach.
    """
    reach: list[int] = []
    items = list(sub)
    for i, (op, av) in enumerate(items):
        if op in (_parser.ASSERT, _parser.ASSERT_NOT):
            direction, inner = av
            reach.extend(_lookahead_reach(inner))
            if direction == 1:
                after = _parser.SubPattern(sub.state, items[i + 1 :]).getwidth()[0]
                reach.append(inner.getwidth()[1] - after)
        elif op is _parser.BRANCH:
            for branch in av[1]:
                reach.extend(_lookahead_reach(branch))
        elif op is _parser.SUBPATTERN:
            reach.extend(_lookahead_reach(av[-1]))
        elif op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT):
            reach.extend(_lookahead_reach(av[2]))
    return reach


def test_lookahead_reads_at_most_one_character_past_the_match() -> None:
    for name, d in DETECTORS.items():
        assert max(_lookahead_reach(_parser.parse(d.pattern)), default=0) <= 1, name


FRAGMENTS = [
    "4111 1111 1111 1111",
    "4242424242424242",
    "3782 822463 10005",
    "GB82 WEST 1234 5698 7654 32",
    "DE89370400440532013000",
    "123-45-6789",
    "192.168.1.1",
    "1.2.3.4",
    "jane@example.com",
    "a@b.co",
    ".uk",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "555.123.4567",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "a" * 36,
    "sk-" + "x" * 20,
    "xoxb-1234567890",
    "AIza" + "b" * 35,
    "sk_test_" + "c" * 24,
    "-----BEGIN PRIVATE KEY-----",
]
ALPHABET = "0123456789 .-+()@_:/\nabkxAEGKSWZ"
TEXTS = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(ALPHABET, max_size=4)), max_size=12
).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_no_match_is_longer_than_max_len(text: str) -> None:
    for name, d in DETECTORS.items():
        for m in COMPILED[name].finditer(text, overlapped=True):
            assert 0 < len(m.group()) <= d.max_len, (name, m)


def check_confirmed_matches(text: str) -> None:
    """A match with one character after it is the match the whole text has at that start.

    The phone pattern is the exception it documents: "+1 415 555 2671" is confirmed
    before " 3" arrives, which the whole text would join to it; both have 10..15
    digits, so the confirmed match is still a phone number.
    """
    for name, pattern in COMPILED.items():
        for k in range(1, len(text) + 1):
            for m in pattern.finditer(text[:k]):
                if m.end() == k:
                    continue  # not confirmed yet: the next character may change it
                whole = pattern.match(text, m.start())
                assert whole is not None, (name, k, m)
                if name == "phone":
                    assert whole.end() >= m.end(), (name, k, m)
                    assert 10 <= sum(ch.isdigit() for ch in m.group()) <= 15, (name, m)
                else:
                    assert whole.span() == m.span(), (name, k, m)


STREAM_CASES = [
    "mail jane@mail.example.co.uk.",
    "a@b.co.uk",
    "at 1.2.3.4.5 and 10.0.0.1.",
    "4111 1111 1111 1111 1111 and 4111 1111 1111 1111 123",
    "3782 822463 10005 6",
    "+1 415 555 2671 3",
    "GB82 WEST 1234 5698 7654 32 10",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789-0",
    "sk-" + "a" * 199 + "bc",
    *(text for cases in POSITIVE.values() for text, _ in cases),
    *(text for texts in NEGATIVE.values() for text in texts),
]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_one_following_character_confirms_a_match(text: str) -> None:
    check_confirmed_matches(text)


@settings(max_examples=150, deadline=None)
@given(TEXTS)
def test_one_following_character_confirms_a_match_in_random_text(text: str) -> None:
    check_confirmed_matches(text)


def test_unicode_digits_are_not_digits() -> None:
    arabic = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
    fullwidth = str.maketrans("0123456789", "０１２３４５６７８９")
    for name, cases in POSITIVE.items():
        for text, expected in cases:
            if name == "secret" or not any(ch.isdigit() for ch in expected):
                continue
            for table in (arabic, fullwidth):
                assert found(name, text.translate(table)) == [], (name, text)


def test_the_caller_can_stream_with_partial_matching() -> None:
    """Held while it could grow, confirmed with one more character."""
    card = COMPILED["payment_card"]
    assert card.search("pay 4111 1111 11", partial=True).partial
    m = card.search("pay 4111 1111 1111 1111 ", partial=True)
    assert not m.partial and m.group() == "4111 1111 1111 1111"
    ip = COMPILED["ipv4"]
    # "10.0.0.1." may still become "10.0.0.1.5": the match reaches the end, nothing confirmed.
    assert ip.search("at 10.0.0.1.", partial=True).end() == len("at 10.0.0.1.")
    assert found("ipv4", "at 10.0.0.1.5") == []
