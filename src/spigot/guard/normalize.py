"""Per-character folding for phrase matching.

Phrases match case-insensitively (by default), across Unicode
compatibility forms, and with any run of whitespace matching any other. The
folding works one character at a time so that a stream can be folded as it
arrives: NFKD decomposition and case folding are both defined per character
(unlike NFC composition, which would need to see the next character), so
"é" and "e" + U+0301 fold to the same characters whichever way they arrive.

Combining marks (accents, dots, rings) are then dropped: their canonical
order could only be restored by looking across characters, and a guard
should not be defeated by an accent ("púrple" still matches "purple").
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache


def is_word_char(ch: str) -> bool:
    # A combining mark belongs to the letter before it ("e" + U+0301 is one letter).
    return ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M")


@lru_cache(maxsize=8192)
def fold_char(ch: str, case_sensitive: bool) -> str:
    """The folded form of one character: possibly several characters, or none (a mark)."""
    if not case_sensitive:
        ch = ch.casefold()
    folded = unicodedata.normalize("NFKD", ch)
    if not case_sensitive:
        # Case folding after decomposition catches what decomposition uncovers.
        folded = unicodedata.normalize("NFKD", folded.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c))


def fold_text(text: str, case_sensitive: bool) -> str:
    """Fold a whole phrase the way a stream is folded: whitespace runs become one space."""
    out: list[str] = []
    in_space = False
    for ch in text.strip():
        if ch.isspace():
            if not in_space:
                out.append(" ")
            in_space = True
            continue
        in_space = False
        out.append(fold_char(ch, case_sensitive))
    return "".join(out)
