"""Built-in detectors for personal data and secrets in generated text.

A detector is a pattern for the third-party ``regex`` module, a true upper bound
on the length of its matches, and optionally a checksum on the matched text.
The guard runs the patterns over a stream with partial matching, which shapes
every pattern here:

* ``[0-9]`` and ``[A-Za-z0-9_]``, never ``\\d`` or ``\\w``: Unicode digits and
  letters must not count.
* Every quantifier is bounded, so ``max_len`` is a true bound and the text
  the guard holds back for a possible match is bounded too.
* A pattern looks at most one character past its match: the guard confirms a
  match as soon as that character is known (or the stream has ended). Where
  "the token goes on" takes two characters to see (``1.2.3.4`` then ``.5``),
  the pattern consumes the first one instead, so the decision is again one
  character away.
* Lookbehinds and trailing lookaheads keep a detector from firing on part of a
  longer token of the same kind (digits inside a longer number, an address
  starting in the middle of a word).

Every pattern is also valid for the standard ``re`` module, whose parser gives
the tests an independent check of ``max_len``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    pattern: str  # for ``regex``, compiled with ``regex.VERSION0`` by the caller
    max_len: int  # no match of ``pattern`` is longer (in characters)
    validate: Callable[[str], bool] | None = None  # None: every match counts
    description: str = ""


_DIGITS = frozenset("0123456789")


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch in _DIGITS)


def luhn_valid(text: str) -> bool:
    """The Luhn (mod 10) check of payment card numbers; spaces and dashes are ignored."""
    compact = text.replace(" ", "").replace("-", "")
    # ``str.isdigit`` would also accept Unicode digits; only ASCII ones are a card number.
    if not compact or not set(compact) <= _DIGITS:
        return False
    total = 0
    for i, ch in enumerate(reversed(compact)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ISO 13616 IBAN lengths (SWIFT IBAN registry; RU is in use though not yet registered).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip
_IBAN_MIN, _IBAN_MAX = 15, 34  # for countries missing from the table
_ALNUM = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def iban_valid(text: str) -> bool:
    """ISO 13616: the length for the country, and mod 97 of the rearranged number is 1.

    Spaces are ignored. Countries missing from the table need 15..34 characters.
    """
    iban = text.replace(" ", "").upper()
    country, check = iban[:2], iban[2:4]
    if not set(iban) <= _ALNUM or not country.isalpha() or not set(check) <= _DIGITS:
        return False
    length = IBAN_LENGTHS.get(country)
    if length is None:
        if not _IBAN_MIN <= len(iban) <= _IBAN_MAX:
            return False
    elif len(iban) != length:
        return False
    # 98 - (n mod 97) is always in 2..98; 00, 01 and 99 cannot be check digits.
    if not 2 <= int(check) <= 98:
        return False
    # Letters count as 10..35: int(ch, 36) does exactly that for 0-9A-Z.
    rearranged = "".join(str(int(ch, 36)) for ch in iban[4:] + iban[:4])
    return int(rearranged) % 97 == 1


def _payment_card_valid(text: str) -> bool:
    return 13 <= len(_digits(text)) <= 19 and luhn_valid(text)


def _iban_printed(length: int) -> str:
    """The printed form for one IBAN length: groups of four, the last one shorter."""
    full, rest = divmod(length - 4, 4)
    tail = f" [A-Z0-9]{{{rest}}}" if rest else ""
    return f"[0-9]{{2}}(?: [A-Z0-9]{{4}}){{{full}}}{tail}"


def _iban_pattern() -> tuple[str, int]:
    by_length: dict[int, list[str]] = {}
    for country, length in sorted(IBAN_LENGTHS.items()):
        by_length.setdefault(length, []).append(country)
    # The printed form only for known countries: with the length fixed, a match
    # can never be cut short at a group boundary when more groups follow.
    printed = "|".join(
        f"(?:{'|'.join(countries)}){_iban_printed(length)}"
        for length, countries in sorted(by_length.items())
    )
    compact = f"[A-Z]{{2}}[0-9]{{2}}[A-Z0-9]{{{_IBAN_MIN - 4},{_IBAN_MAX - 4}}}"
    pattern = f"(?<![A-Za-z0-9])(?:{compact}|{printed})(?![A-Za-z0-9])"
    # One space before each group after the first four characters.
    printed_max = max(length + -(-(length - 4) // 4) for length in IBAN_LENGTHS.values())
    return pattern, max(_IBAN_MAX, printed_max)


# Local part up to 64 characters, then up to five labels and a top-level domain.
# The match cannot stop before a "." (another label may follow, and that takes
# two characters to see), so a "." that no label follows is part of the match:
# an address at the end of a sentence takes the full stop with it.
_EMAIL_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = (
    "(?<![A-Za-z0-9._%+-])"
    "[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63}"
    f"@(?:{_EMAIL_LABEL}\\.){{1,5}}[A-Za-z]{{2,24}}"
    "(?:(?![A-Za-z0-9.-])|\\.(?![A-Za-z0-9]))"
)
_EMAIL_MAX = 64 + len("@") + 5 * (63 + len(".")) + 24 + len(".")

# International: "+", then 10..15 digits in all (E.164 allows 15), with at most
# one separator between two digits: a space, "." or "-", or a parenthesis with
# one of those beside it: "+44 (0)20 7946 0958", "+1 (415) 555-2671".
# The digit count is in the pattern, not in a checksum, so every match is a
# phone number even when the stream confirms it before a trailing group arrives.
_PHONE_SEP = "(?:[ .-]|[ -]?\\(|\\)[ .-]?)"
_PHONE_INTL = f"(?<![A-Za-z0-9+])\\+[1-9](?:{_PHONE_SEP}?[0-9]){{9,14}}(?![0-9])"
_PHONE_INTL_MAX = len("+1") + 14 * len(") 5")  # at most three characters per digit
# National (North American layout, the usual one in English text): an optional
# "1", then 3-3-4 digits with one consistent separator, or "(555) 123-4567".
_PHONE_NATIONAL = (
    "(?<![A-Za-z0-9+])(?<![0-9][.-])"
    "(?:1[ .-]?)?"
    "(?:[0-9]{3}-[0-9]{3}-|[0-9]{3}\\.[0-9]{3}\\.|\\([0-9]{3}\\) ?[0-9]{3}[ .-])"
    "[0-9]{4}(?![0-9-])"
)
_PHONE_NATIONAL_MAX = len("1-(555) 123-4567")
_PHONE = f"{_PHONE_INTL}|{_PHONE_NATIONAL}"

# 13..19 digits starting with 2..6 (Mastercard 2-series, Amex, Diners, JCB, Visa,
# Mastercard, Discover, UnionPay, Maestro; not 1, so not millisecond timestamps),
# written either without separators or in the printed groups: 4-4-4-4, or 4-6-5
# and 4-6-4 (Amex, Diners), with one consistent separator. Free grouping would let
# "4111 1111 1111 1111" be confirmed and checked while " 123" might still follow.
_CARD_GROUPED = "|".join(
    f"[2-6][0-9]{{3}}(?:{sep}[0-9]{{4}}){{3}}|3[0-9]{{3}}{sep}[0-9]{{6}}{sep}[0-9]{{4,5}}"
    for sep in (" ", "-")
)
_CARD = f"(?<![0-9])(?<![0-9][ .,-])(?:[2-6][0-9]{{12,18}}|{_CARD_GROUPED})(?![0-9])"

_SSN = "(?<![0-9])(?<![0-9]-)(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9-])"

# An octet: 0..255 without leading zeros. As for e-mail, the match may not stop
# before a "." that digits may follow ("1.2.3.4.5" is not an address), so a "."
# that no digit follows (the end of a sentence) is part of the match.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = (
    f"(?<![A-Za-z0-9])(?<![0-9]\\.){_OCTET}(?:\\.{_OCTET}){{3}}(?:(?![A-Za-z0-9.])|\\.(?![0-9]))"
)

# One alternation of credential formats whose prefixes make them unmistakable.
# Each branch ends where its token does: a longer run of the same characters is
# some other token, not a key cut short.
_SECRET_BRANCHES: tuple[tuple[str, int], ...] = (
    # PEM private key headers; the body that follows is base64 lines.
    (
        "-----BEGIN "
        "(?:(?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY|PGP PRIVATE KEY BLOCK)"
        "-----",
        len("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
    ),
    # AWS access key ids (long-term and temporary).
    ("(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])", 20),
    # GitHub tokens: classic personal, OAuth, user-to-server, server-to-server, refresh.
    ("(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36}(?![A-Za-z0-9_])", 40),
    ("(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{82}(?![A-Za-z0-9_])", 93),
    # OpenAI-style keys: "sk-", "sk-proj-", "sk-svcacct-"... then the secret.
    ("(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,200}(?![A-Za-z0-9_-])", 203),
    # Slack bot, user, app-level, refresh and legacy tokens.
    ("(?<![A-Za-z0-9_-])xox[abprs]-[A-Za-z0-9-]{10,200}(?![A-Za-z0-9_-])", 205),
    # Google API keys.
    ("(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])", 39),
    # Stripe secret and restricted keys.
    ("(?<![A-Za-z0-9_])[rs]k_(?:live|test)_[0-9A-Za-z]{24,99}(?![0-9A-Za-z_])", 107),
)

_IBAN, _IBAN_MAX_LEN = _iban_pattern()

DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "email",
            _EMAIL,
            _EMAIL_MAX,
            description="e-mail addresses (ASCII), e.g. jane.doe@example.com",
        ),
        Detector(
            "phone",
            _PHONE,
            max(_PHONE_INTL_MAX, _PHONE_NATIONAL_MAX),
            description="phone numbers: +CC international, and (555) 123-4567 / 555-123-4567",
        ),
        Detector(
            "payment_card",
            _CARD,
            19,  # 19 digits, or 16 in four groups
            _payment_card_valid,
            "payment card numbers (13-19 digits, Luhn-checked), e.g. 4111 1111 1111 1111",
        ),
        Detector(
            "iban",
            _IBAN,
            _IBAN_MAX_LEN,
            iban_valid,
            "IBANs, compact or printed in groups of four (mod-97 checked)",
        ),
        Detector(
            "us_ssn",
            _SSN,
            11,
            description="US social security numbers written AAA-GG-SSSS",
        ),
        Detector(
            "ipv4",
            _IPV4,
            15 + 1,  # with a sentence's full stop
            description="IPv4 addresses in dotted-quad form",
        ),
        Detector(
            "secret",
            "|".join(f"(?:{p})" for p, _ in _SECRET_BRANCHES),
            max(n for _, n in _SECRET_BRANCHES),
            description="private key headers and API keys/tokens (AWS, GitHub, OpenAI, "
            "Slack, Google, Stripe)",
        ),
    )
}
