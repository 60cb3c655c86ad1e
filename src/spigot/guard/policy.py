"""Guard policies: TOML rules, validated at load, compiled once per direction.

```toml
[[rule]]
id = "secret-project"          # unique, used in logs and metrics
kind = "phrase"                # phrase | regex | detector | plugin
phrases = ["purple elephant"]
action = "block"               # block | redact | flag
applies_to = ["output"]        # output and/or input
```
"""

from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from spigot.guard.automaton import Automaton
from spigot.guard.detectors import DETECTORS
from spigot.guard.normalize import fold_text
from spigot.guard.scanners import (
    PatternScanner,
    PhraseScanner,
    PluginFinder,
    PluginScanner,
    Scanner,
)
from spigot.guard.stream import TextGuard

KINDS = ("phrase", "regex", "detector", "plugin")
ACTIONS = ("block", "redact", "flag")
DIRECTIONS = ("output", "input")
PLUGIN_ENTRY_POINT_GROUP = "spigot.guard"
# The longest span a regex or plug-in rule may declare: it bounds what a stream holds back.
MAX_LEN_LIMIT = 4096

_COMMON_KEYS = {"id", "kind", "action", "applies_to", "mask", "description"}
_KIND_KEYS = {
    "phrase": {"phrases", "case_sensitive", "whole_word"},
    "regex": {"pattern", "max_len", "ignore_case"},
    "detector": {"detector"},
    "plugin": {"plugin", "entry_point", "max_len", "options"},
}


class PolicyError(ValueError):
    """A policy that cannot be loaded; the message names the file and the rule."""


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str
    action: str
    applies_to: frozenset[str]
    mask: str
    phrases: tuple[str, ...] = ()
    case_sensitive: bool = False
    whole_word: bool = False
    pattern: str = ""
    ignore_case: bool = False
    max_len: int = 0
    detector: str = ""
    plugin: str = ""
    entry_point: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


class RuleSet:
    """The rules of one direction, compiled: automata and patterns shared by every stream."""

    def __init__(self, rules: list[Rule], plugins: Mapping[str, LoadedPlugin]) -> None:
        self.rules = tuple(rules)
        by_case: dict[bool, list[tuple[str, int]]] = {}
        whole_word = tuple(r.whole_word for r in self.rules)
        self._patterns: list[tuple[regex.Pattern[str], int, int, Any]] = []
        self._plugins: list[tuple[PluginFinder, int, int]] = []
        for label, rule in enumerate(self.rules):
            if rule.kind == "phrase":
                folded = [(fold_text(p, rule.case_sensitive), label) for p in rule.phrases]
                by_case.setdefault(rule.case_sensitive, []).extend(folded)
            elif rule.kind == "regex":
                flags = regex.VERSION0 | (regex.IGNORECASE if rule.ignore_case else 0)
                self._patterns.append(
                    (regex.compile(rule.pattern, flags), rule.max_len, label, None)
                )
            elif rule.kind == "detector":
                d = DETECTORS[rule.detector]
                pattern = regex.compile(d.pattern, regex.VERSION0)
                self._patterns.append((pattern, d.max_len, label, d.validate))
            else:
                plugin = plugins[rule.id]
                self._plugins.append((plugin.finder, plugin.max_len, label))
        self._automata = [
            (Automaton(phrases), case, whole_word) for case, phrases in by_case.items()
        ]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def new_scanners(self) -> list[Scanner]:
        scanners: list[Scanner] = [
            PhraseScanner(ac, case, whole_word) for ac, case, whole_word in self._automata
        ]
        scanners += [PatternScanner(p, n, label, v) for p, n, label, v in self._patterns]
        scanners += [PluginScanner(f, n, label) for f, n, label in self._plugins]
        return scanners

    def guard(self) -> TextGuard:
        return TextGuard(self)


class Policy:
    def __init__(self, rules: list[Rule], source: str = "<policy>") -> None:
        self.rules = tuple(rules)
        self.source = source
        plugins = {r.id: _load_plugin(r, source) for r in rules if r.kind == "plugin"}
        self.output = RuleSet([r for r in rules if "output" in r.applies_to], plugins)
        self.input = RuleSet([r for r in rules if "input" in r.applies_to], plugins)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        return cls(rules_from_file(path), str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<policy>") -> Policy:
        return cls(rules_from_toml(text, source), source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<policy>") -> Policy:
        return cls(rules_from_dict(data, source), source)

    def __repr__(self) -> str:
        return f"Policy({self.source!r}, {len(self.rules)} rules)"


# Reading rules checks a policy completely except that plug-ins are not
# imported: importing runs their code, which checking a file must not do.


def rules_from_file(path: str | Path) -> list[Rule]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc.strerror}") from None
    return rules_from_toml(text, source=str(path))


def rules_from_toml(text: str, source: str = "<policy>") -> list[Rule]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    return rules_from_dict(data, source=source)


def rules_from_dict(data: Mapping[str, Any], source: str = "<policy>") -> list[Rule]:
    unknown = set(data) - {"rule"}
    if unknown:
        raise PolicyError(
            f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
            "rules go in [[rule]] tables"
        )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_rules, start=1):
        rule = _parse_rule(raw, number, source)
        if rule.id in seen:
            raise PolicyError(f"{source}: rule {rule.id!r}: the id is used twice")
        seen.add(rule.id)
        rules.append(rule)
    return rules


def _parse_rule(raw: Mapping[str, Any], number: int, source: str) -> Rule:
    rule_id = raw.get("id")
    where = f"{source}: rule #{number}"
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise PolicyError(f"{where}: 'id' is missing (a non-empty string)")
    where = f"{source}: rule {rule_id!r}"

    def fail(message: str) -> PolicyError:
        return PolicyError(f"{where}: {message}")

    def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = raw.get(key, default)
        if value is not default and (
            not isinstance(value, kind) or (isinstance(value, bool) and kind is int)
        ):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise fail(f"'{key}' must be a {names}")
        return value

    kind = get("kind", str)
    if kind not in KINDS:
        raise fail(f"'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    action = get("action", str)
    if action not in ACTIONS:
        raise fail(f"'action' must be one of {', '.join(ACTIONS)} (got {action!r})")
    unknown = set(raw) - _COMMON_KEYS - _KIND_KEYS[kind]
    if unknown:
        raise fail(f"unknown key(s) for kind {kind!r}: {', '.join(sorted(unknown))}")
    applies_to = get("applies_to", list, ["output"])
    if not applies_to or any(d not in DIRECTIONS for d in applies_to):
        raise fail(f"'applies_to' must list 'output' and/or 'input' (got {applies_to!r})")

    fields: dict[str, Any] = {}
    label = rule_id
    if kind == "phrase":
        phrases = get("phrases", list)
        if not phrases or not all(isinstance(p, str) for p in phrases):
            raise fail("'phrases' must be a non-empty list of strings")
        case_sensitive = get("case_sensitive", bool, False)
        for p in phrases:
            if not fold_text(p, case_sensitive):
                raise fail(f"the phrase {p!r} is empty once whitespace is trimmed")
        fields.update(
            phrases=tuple(phrases),
            case_sensitive=case_sensitive,
            whole_word=get("whole_word", bool, False),
        )
    elif kind == "regex":
        pattern = get("pattern", str)
        if pattern is None:
            raise fail("'pattern' is missing")
        ignore_case = get("ignore_case", bool, False)
        try:
            compiled = regex.compile(pattern, regex.VERSION0 | (regex.I if ignore_case else 0))
        except regex.error as exc:
            raise fail(f"'pattern' is not a valid regular expression: {exc}") from None
        if compiled.fullmatch(""):
            raise fail("'pattern' matches the empty string")
        fields.update(
            pattern=pattern, ignore_case=ignore_case, max_len=_max_len(get, fail, required=True)
        )
    elif kind == "detector":
        detector = get("detector", str)
        if detector not in DETECTORS:
            raise fail(
                f"unknown detector {detector!r}; the detectors are {', '.join(sorted(DETECTORS))}"
            )
        fields["detector"] = detector
        label = detector
    else:
        plugin, entry_point = get("plugin", str), get("entry_point", str)
        if (plugin is None) == (entry_point is None):
            raise fail("give exactly one of 'plugin' (module:attribute) or 'entry_point'")
        fields.update(
            plugin=plugin or "",
            entry_point=entry_point or "",
            options=get("options", dict, {}),
            max_len=_max_len(get, fail, required=False),
        )
    mask = get("mask", str, f"[REDACTED:{label}]")
    return Rule(
        id=rule_id,
        kind=kind,
        action=action,
        applies_to=frozenset(applies_to),
        mask=mask,
        **fields,
    )


def _max_len(get: Any, fail: Any, *, required: bool) -> int:
    value: int | None = get("max_len", int)
    if value is None:
        if required:
            raise fail("'max_len' is missing: the longest match, in characters")
        return 0  # a plug-in may declare it itself
    if not 1 <= value <= MAX_LEN_LIMIT:
        raise fail(f"'max_len' must be between 1 and {MAX_LEN_LIMIT} (got {value})")
    return value


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    finder: PluginFinder
    max_len: int


def _load_plugin(rule: Rule, source: str) -> LoadedPlugin:
    where = f"{source}: rule {rule.id!r}"
    try:
        if rule.entry_point:
            found = importlib.metadata.entry_points(
                group=PLUGIN_ENTRY_POINT_GROUP, name=rule.entry_point
            )
            if not found:
                raise PolicyError(
                    f"{where}: no entry point {rule.entry_point!r} in group "
                    f"{PLUGIN_ENTRY_POINT_GROUP!r}"
                )
            factory = next(iter(found)).load()
        else:
            module_name, _, attribute = rule.plugin.partition(":")
            if not attribute:
                raise PolicyError(f"{where}: 'plugin' must look like 'package.module:factory'")
            factory = importlib.import_module(module_name)
            for part in attribute.split("."):
                factory = getattr(factory, part)
        finder = factory(**rule.options)
    except PolicyError:
        raise
    except Exception as exc:
        raise PolicyError(
            f"{where}: cannot load the plug-in: {type(exc).__name__}: {exc}"
        ) from None
    if not callable(getattr(finder, "find", None)):
        raise PolicyError(f"{where}: the plug-in has no find(text) method")
    max_len = rule.max_len or getattr(finder, "max_len", 0)
    if not isinstance(max_len, int) or not 1 <= max_len <= MAX_LEN_LIMIT:
        raise PolicyError(
            f"{where}: set 'max_len' (1..{MAX_LEN_LIMIT}) in the rule or on the plug-in"
        )
    return LoadedPlugin(finder, max_len)
