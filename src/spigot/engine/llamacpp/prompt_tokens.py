"""Prompt text to token ids in time linear in the text, special tokens only where they belong.

A special token (``<|im_start|>``, ``<|im_end|>``) is a whole text that
becomes one id. llama.cpp finds them before it tokenizes (``parse_special``)
by searching the text for each special token in turn, fragment after
fragment: quadratic in the number of specials in the text (a chat message of
``"<|im_end|>" * 80000`` took it 35 s). ``PromptTokenizer.tokenize`` makes
the same split in one pass of one compiled pattern and gives llama.cpp only
the plain text between specials, which is what llama.cpp tokenizes for each
fragment too, so the ids are the same.

The split is leftmost-longest, as Hugging Face tokenizers match added tokens.
llama.cpp instead takes the longest special first over the whole text; the
two differ only where one special's end is another's start, which no
vocabulary we serve has (a test checks the embedded one).

Chat messages are user input: a message may spell a special token without
becoming one, or a user could forge a system or assistant turn. ``chat``
escapes the protected specials' texts in every message before the template
runs, splits the rendered prompt at the specials the template wrote, then
puts the escaped texts back as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias


@dataclass(frozen=True, slots=True)
class SpecialToken:
    """A token llama.cpp matches as a whole text before tokenizing the rest."""

    id: int
    text: str
    # CONTROL or UNKNOWN: matched only when parsing specials. Otherwise
    # USER_DEFINED, which llama.cpp (and Hugging Face) match in any text.
    control: bool
    lstrip: bool = False  # whitespace before it is dropped
    rstrip: bool = False  # whitespace after it is dropped


# C's isspace, which llama.cpp strips around LSTRIP/RSTRIP tokens.
_C_SPACE = " \t\n\v\f\r"

# Escapes are made of private-use characters, which no special token text
# contains (checked) and which templates pass through unchanged.
_PRIVATE_USE = range(0xE000, 0xF900)
_N_DIGITS = 16

# A trie of texts by character; the empty key marks the end of a text.
_Trie: TypeAlias = "dict[str, _Trie]"


def _alternation(texts: Iterable[str]) -> re.Pattern[str]:
    """A pattern matching any of ``texts``, the longest one at a position.

    Built as a trie, so trying a position costs at most the longest text's
    length, however many texts there are (some vocabularies have thousands).
    """
    texts = sorted(set(texts), key=len, reverse=True)
    if not texts:
        return re.compile("(?!)")
    root: _Trie = {}
    for text in texts:
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # a text ends here
    # Children before parents, without recursion (a special may be long).
    order: list[_Trie] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(child for ch, child in node.items() if ch)
    patterns: dict[int, str] = {}
    for node in reversed(order):
        # Longer first: the end of a text (the empty branch) is the last choice.
        branches = [re.escape(ch) + patterns.pop(id(child)) for ch, child in node.items() if ch]
        if "" in node:
            branches.append("")
        patterns[id(node)] = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    try:
        return re.compile(patterns[id(root)])
    except (RecursionError, re.error):
        # Too deeply nested for re (texts that extend each other hundreds of
        # times): plain alternation, longest first, slower but the same.
        return re.compile("|".join(map(re.escape, texts)))


class PromptTokenizer:
    """Split at special tokens in one pass, tokenize the rest with ``tokenize_plain``.

    Immutable once built, so any number of threads may use it at once.
    ``tokenize_plain`` must tokenize without parsing specials (llama.cpp's
    ``parse_special=False``) and be safe to call from any thread.
    """

    def __init__(
        self,
        specials: Sequence[SpecialToken],
        tokenize_plain: Callable[[str], list[int]],
        *,
        template_source: str = "",
    ) -> None:
        self._tokenize_plain = tokenize_plain
        by_text = {s.text: s for s in specials if s.text}
        self._by_text = by_text
        self._split = _alternation(by_text)
        # Protected from message contents: control tokens, and user-defined
        # tokens the template writes as markup (gpt-oss's <|start|> and
        # <|message|> are user-defined in llama.cpp). Other user-defined
        # tokens (runs of spaces, HTML tags) are ordinary text to the model.
        self._protected = [
            s
            for s in by_text.values()
            if s.control or (s.text.strip() and s.text in template_source)
        ]
        self._protected_ids = frozenset(s.id for s in self._protected)
        self._protected_pattern = _alternation(s.text for s in self._protected)

        used = {ord(ch) for text in [*by_text, template_source] for ch in text}
        free = [chr(c) for c in _PRIVATE_USE if c not in used][: _N_DIGITS + 1]
        self._esc, digits = free[0], "".join(free[1:])
        self._digits = digits
        self._digit_values = {ch: i for i, ch in enumerate(digits)}
        self._escape_pattern = _alternation([*(s.text for s in self._protected), self._esc])
        self._escapes = {self._esc: self._esc * 2}
        for i, s in enumerate(self._protected):
            self._escapes[s.text] = self._esc + self._encode(i) + self._esc
        self._unescape_pattern = re.compile(
            re.escape(self._esc) + "([" + re.escape(digits) + "]*)" + re.escape(self._esc)
        )

    @property
    def protected_texts(self) -> list[str]:
        """The special texts that message contents cannot turn into tokens."""
        return [s.text for s in self._protected]

    # -- plain text and raw prompts ---------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Like llama.cpp's ``tokenize(text, add_special=False, parse_special=True)``."""
        return self._tokenize(text, escaped=False)

    def _tokenize(self, text: str, *, escaped: bool) -> list[int]:
        # llama.cpp spends ~40 us on each call whatever its length (it builds
        # its pre-tokenizer regex each time), as it does on each fragment of
        # one call: templates repeat the same fragments, so each distinct one
        # is tokenized once.
        seen: dict[str, list[int]] = {}
        ids: list[int] = []
        start = 0
        rstrip = False  # the previous special drops the whitespace after it
        for match in self._split.finditer(text):
            special = self._by_text[match.group()]
            raw = text[start : match.start()]
            if rstrip:
                raw = raw.lstrip(_C_SPACE)
            if special.lstrip:
                raw = raw.rstrip(_C_SPACE)
            if raw:
                raw_ids = seen.get(raw)
                if raw_ids is None:
                    raw_ids = seen[raw] = self._raw(raw, escaped)
                ids.extend(raw_ids)
            ids.append(special.id)
            start = match.end()
            rstrip = special.rstrip
        raw = text[start:]
        if rstrip:
            raw = raw.lstrip(_C_SPACE)
        if raw:
            ids.extend(self._raw(raw, escaped))
        return ids

    def _raw(self, raw: str, escaped: bool) -> list[int]:
        if not escaped or self._esc not in raw:
            # No special's text is left in it: llama.cpp tokenizes it as is.
            return self._tokenize_plain(raw)
        return self.tokenize_text(self._unescape_pattern.sub(self._unescape, raw))

    def tokenize_text(self, text: str) -> list[int]:
        """Tokens of ``text`` as plain text: a special token's text never becomes its id."""
        ids = self._tokenize_plain(text)
        if self._protected_ids.isdisjoint(ids):
            return ids
        # A protected user-defined token's text, which llama.cpp matches even
        # in plain text: tokenize each such text as its first character and
        # the rest, which cannot match it whole.
        ids = []
        start = 0
        for match in self._protected_pattern.finditer(text):
            if match.start() > start:
                ids.extend(self._tokenize_plain(text[start : match.start()]))
            found = match.group()
            ids.extend(self._tokenize_plain(found[:1]))
            if len(found) > 1:
                ids.extend(self.tokenize_text(found[1:]))
            start = match.end()
        if start < len(text):
            ids.extend(self._tokenize_plain(text[start:]))
        return ids

    # -- chat -------------------------------------------------------------

    def chat(
        self,
        render: Callable[[list[dict[str, Any]]], str],
        messages: list[dict[str, Any]],
        *,
        specials_in_content: bool = False,
    ) -> list[int]:
        """Tokens of a conversation as ``render`` (the chat template) lays it out.

        The specials the template writes (turn markers, BOS) are tokens; those
        spelled in the messages are text, unless ``specials_in_content``.
        """
        if specials_in_content:
            return self.tokenize(render(messages))
        escaped = [self._escape_value(m) for m in messages]
        return self._tokenize(render(escaped), escaped=True)

    def escape(self, text: str) -> str:
        """``text`` with every protected special's text (and the escape) escaped."""
        return self._escape_pattern.sub(self._escape_match, text)

    def escape_value(self, value: Any) -> Any:
        """Every string in ``value`` (a JSON-like structure: tools) escaped."""
        return self._escape_value(value)

    def _escape_value(self, value: Any) -> Any:
        # Every string a template may write: content, name, and parts.
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, dict):
            return {k: self._escape_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._escape_value(v) for v in value]
        return value

    def _escape_match(self, match: re.Match[str]) -> str:
        return self._escapes[match.group()]

    def _unescape(self, match: re.Match[str]) -> str:
        code = match.group(1)
        if not code:
            return self._esc
        index = 0
        for ch in code:
            index = index * _N_DIGITS + self._digit_values[ch]
        if index >= len(self._protected):  # not ours (a template cut one up): leave it
            return match.group()
        return self._protected[index].text

    def _encode(self, index: int) -> str:
        code = ""
        while True:
            code = self._digits[index % _N_DIGITS] + code
            index //= _N_DIGITS
            if not index:
                return code
