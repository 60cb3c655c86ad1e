"""Structured output: ``response_format`` (chat) and ``text.format`` (Responses).

A format becomes an llguidance grammar (``Constraint``) that the engine enforces
while sampling: a token outside the grammar is never sampled, so the output
matches the schema by construction (docs/structured-output.md). A schema passes
two gates, each a 400 naming it:

1. ``check_strict_schema`` (``spigot.api.strict_schema``), with ``strict: true``
   only: OpenAI's Structured Outputs rules, in OpenAI's words.
2. ``check_enforceable``, always: the schema must be one llguidance enforces
   exactly (``lenient: false``: a keyword it cannot enforce is an error, never
   dropped), with a finite instance (else the grammar leaves no way to finish)
   and a nesting llguidance's compiler survives.

The grammar writes compact JSON: no whitespace between tokens, "," and ":" as
separators. A small model free to add whitespace loops on newlines until
``max_tokens``.

This is CPU work that grows with the schema: it runs in the prep pool. Grammars
are cached by schema text, since clients send one schema request after request.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson
from llguidance import LLMatcher
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from spigot.api.strict_schema import MAX_NESTING, SCHEMA_CODE, check_strict_schema
from spigot.engine.types import Constraint
from spigot.errors import InvalidRequest

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "FormatSpec",
    "JsonSchemaSpec",
    "ResponseFormat",
    "TextFormat",
    "check_constrained_sampling",
    "check_enforceable",
    "check_strict_schema",
    "format_constraint",
    "json_object_grammar",
    "resolve_ref",
]

NAME_PATTERN = "^[a-zA-Z0-9_-]+$"
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[a-zA-Z0-9_-]+")

# Compact and not lenient, whatever the schema says: its own "x-guidance" is
# removed before compiling (llguidance would apply it over these defaults).
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
}


# -- wire models -------------------------------------------------------------------


class _Wire(BaseModel):
    # spigot.api.schemas._Wire's config, repeated: schemas imports this module for
    # its response_format field, so this module cannot import schemas.
    model_config = ConfigDict(extra="ignore", strict=True)


def _valid_name(name: str | None) -> str | None:
    # OpenAI's wording for a bad format or function name. None is text.format's
    # absent name (``TextFormat.spec`` asks for it where it is required).
    if name is None:
        return None
    if len(name) > MAX_NAME_LENGTH:
        raise PydanticCustomError(
            "string_above_max_length",
            f"string too long. Expected a string with maximum length {MAX_NAME_LENGTH}, "
            f"but got a string with length {len(name)} instead.",
        )
    if not _NAME.fullmatch(name):
        raise PydanticCustomError(
            "string_pattern_mismatch",
            f"string does not match pattern. Expected a string that matches the pattern "
            f"'{NAME_PATTERN}'.",
        )
    return name


FormatType = Literal["text", "json_object", "json_schema"]


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """A format, whichever API sent it. ``param`` is where its schema sits in the
    body (for text and json_object: where the format does); ``openai`` is the
    format in chat's shape, for an engine elsewhere."""

    type: FormatType
    param: str
    name: str = ""
    schema: dict[str, Any] | None = None
    strict: bool = False
    openai: Mapping[str, Any] = field(default_factory=dict)


def _spec(fmt: ResponseFormat | TextFormat, param: str, where: str) -> FormatSpec:
    spec = fmt.json_schema if isinstance(fmt, ResponseFormat) else fmt
    if fmt.type != "json_schema" or spec is None:
        return FormatSpec(fmt.type, param, openai={"response_format": {"type": fmt.type}})
    assert spec.name is not None
    wire: dict[str, Any] = {"name": spec.name}  # the schema is shared, not copied
    given = (("description", spec.description), ("schema", spec.schema_), ("strict", spec.strict))
    wire.update((key, value) for key, value in given if value is not None)
    chat = {"response_format": {"type": "json_schema", "json_schema": wire}}
    return FormatSpec("json_schema", where, spec.name, spec.schema_, bool(spec.strict), chat)


class JsonSchemaSpec(_Wire):
    """chat's ``response_format.json_schema``."""

    name: str
    description: str | None = None
    # "schema" would shadow BaseModel.schema(): the wire name is an alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    check_name = field_validator("name")(_valid_name)


class ResponseFormat(_Wire):
    """chat's ``response_format``: ``{"type": "text" | "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {name, description?, schema?, strict?}}``."""

    type: FormatType
    json_schema: JsonSchemaSpec | None = None

    def spec(self, param: str = "response_format") -> FormatSpec:
        if self.type == "json_schema" and self.json_schema is None:
            raise _missing(f"{param}.json_schema")
        return _spec(self, param, f"{param}.json_schema.schema")


class TextFormat(_Wire):
    """The Responses API's ``text.format``: the same, with the schema's fields
    beside ``type``: ``{"type": "json_schema", "name", "schema", "strict"?}``."""

    type: FormatType
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    check_name = field_validator("name")(_valid_name)

    def spec(self, param: str = "text.format") -> FormatSpec:
        if self.type == "json_schema":
            for key, value in (("name", self.name), ("schema", self.schema_)):
                if value is None:
                    raise _missing(f"{param}.{key}")
        return _spec(self, param, f"{param}.schema")


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)


# -- what the request path calls ----------------------------------------------------


def format_constraint(
    fmt: ResponseFormat | TextFormat, *, param: str | None = None
) -> Constraint | None:
    """The constraint for a format (None for text), or a 400 naming the bad field.

    ``param`` is the format's place in the body, for error params (default
    ``response_format`` or ``text.format``). A non-strict ``json_schema`` without
    a schema is any JSON object; a strict one is missing its schema.
    """
    spec = fmt.spec() if param is None else fmt.spec(param)
    if spec.type == "text":
        return None
    if spec.type == "json_object" or (spec.schema is None and not spec.strict):
        return Constraint(grammar=json_object_grammar(), openai=spec.openai)
    if spec.schema is None:
        raise _missing(spec.param)
    if spec.strict:
        check_strict_schema(spec.schema, param=spec.param, name=spec.name)
    grammar = check_enforceable(spec.schema, param=spec.param, name=spec.name)
    return Constraint(grammar=grammar, openai=spec.openai)


def check_constrained_sampling(*, ignore_eos: bool, min_tokens: int) -> None:
    """Options a grammar cannot honour, refused: once the JSON is whole the grammar
    allows only EOS, so output cannot be forced past it."""
    for name, given in (("ignore_eos", ignore_eos), ("min_tokens", min_tokens)):
        if given:
            raise InvalidRequest(
                f"'{name}' cannot be used with structured output ('response_format' or "
                "tools): the output ends where the schema does.",
                param=name,
            )


@functools.cache
def json_object_grammar() -> str:
    """Any JSON object, compact (``json_object`` mode)."""
    grammar, error = _compile('{"type":"object"}')
    assert error is None, error
    return grammar


# -- any schema: what llguidance can enforce -----------------------------------------


def check_enforceable(
    schema: Any,
    *,
    param: str,
    name: str | None = None,
    what: str = "response_format",
    code: str = SCHEMA_CODE,
) -> str:
    """The llguidance grammar that enforces ``schema``, or an ``InvalidRequest``
    naming ``param`` where it cannot be enforced exactly: a keyword llguidance
    does not implement, a regex it cannot compile, a ``$ref`` to nowhere, an
    unsatisfiable or infinite schema."""
    prefix = f"Invalid schema for {what} '{name}': " if name else "Invalid JSON schema: "

    def refuse(detail: str) -> InvalidRequest:
        return InvalidRequest(f"{prefix}{detail}", param=param, code=code)

    if not isinstance(schema, dict):
        raise refuse("a schema must be a JSON object.")
    schema = {k: v for k, v in schema.items() if k != "x-guidance"}
    if _too_deep(schema):
        raise refuse(
            f"the schema is nested more than {MAX_NESTING} levels deep, counting through "
            "each '$ref' that is not a recursion."
        )
    if not _finite(schema):
        raise refuse(
            "it has no finite instance: a required property refers back to itself through "
            "'$ref' with no way out (make the recursion optional with 'anyOf' and 'null', or "
            "go through an array that may be empty)."
        )
    try:
        text = orjson.dumps(schema).decode()
    except orjson.JSONEncodeError as exc:  # an integer past 64 bits, nesting past 255
        raise refuse(f"{exc}.") from None
    grammar, error = _compiled(text)
    if error is not None:
        raise refuse(error[:1000])
    return grammar


def _compile(schema_json: str) -> tuple[str, str | None]:
    """(grammar, None), or ("", llguidance's reason)."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_json, overrides=_JSON_OPTIONS)
    except ValueError as exc:  # not JSON, or nested past serde's limit
        return "", str(exc)
    # Without a tokenizer this compiles everything but the token masks: regexes,
    # $refs, unsatisfiable parts. Warnings are not errors.
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        return "", messages[0] if messages else "the schema cannot be enforced."
    return grammar, None


# A cache entry holds the schema's text twice (key, grammar): each cache holds at
# most 8 MiB. A schema past 256 KiB is compiled each time.
_small = functools.lru_cache(maxsize=256)(_compile)  # up to 16 KiB
_large = functools.lru_cache(maxsize=16)(_compile)  # up to 256 KiB


def _compiled(text: str) -> tuple[str, str | None]:
    size = len(text)
    return (
        _small(text) if size <= 16 << 10 else _large(text) if size <= 256 << 10 else _compile(text)
    )


# -- finite instances ----------------------------------------------------------------

_UNRESOLVED = object()


def resolve_ref(root: Any, ref: str) -> Any:
    """What a local ``$ref`` ("#", "#/$defs/a") names in ``root``, or ``_UNRESOLVED``."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return _UNRESOLVED
    node = root
    for raw in ref[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _UNRESOLVED
    return node


def _too_deep(schema: dict[str, Any]) -> bool:
    """Whether the schema nests deeper than ``MAX_NESTING`` JSON levels once its
    $refs are followed (a recursion counted once). llguidance compiles a $ref
    target inside the schema that uses it: a chain of a thousand definitions, each
    a few levels deep, overflows its stack and kills the process. Iterative, so
    that Python's recursion limit is not the one reached first.
    """
    height: dict[int, int] = {}
    on_path: set[int] = set()

    def below(node: dict[str, Any]) -> list[dict[str, Any]]:
        kids = [v for v in node.values() if isinstance(v, dict)]
        kids += [i for v in node.values() if isinstance(v, list) for i in v if isinstance(i, dict)]
        ref = node.get("$ref")
        target = resolve_ref(schema, ref) if isinstance(ref, str) else None
        return [*kids, target] if isinstance(target, dict) else kids

    stack = [(schema, iter(below(schema)))]
    on_path.add(id(schema))
    while stack:
        node, kids = stack[-1]
        for kid in kids:
            if id(kid) not in height and id(kid) not in on_path:
                on_path.add(id(kid))
                stack.append((kid, iter(below(kid))))
                break
        else:
            stack.pop()
            on_path.discard(id(node))
            height[id(node)] = 1 + max((height.get(id(k), 0) for k in below(node)), default=0)
            if height[id(node)] > MAX_NESTING:
                return True
    return False


# When a subschema has a finite instance, in terms of the $refs it uses: True,
# False, a $ref, or ("and" | "or", parts).
Formula = bool | str | tuple[str, tuple[Any, ...]]


def _finite(schema: dict[str, Any]) -> bool:
    """False when every instance of ``schema`` would be infinite (a required
    property whose ``$ref`` leads back to it): llguidance compiles such a schema,
    but its grammar only ever lets the model go deeper. Generous: only recursion
    counts; other constraints are llguidance's to check.

    Each ``$ref`` target gets a formula once (a pass over the schema), then a
    least fixpoint: no target is finite until its formula proves it. Targets are
    tried in reverse order of discovery, so a chain of definitions settles in one
    round; a schema that has not settled after a few rounds is let through.
    """
    memo: dict[int, Formula] = {}
    root = _formula(schema, memo)
    formulas: dict[str, Formula] = {}
    stack = [root]
    while stack:
        f = stack.pop()
        if isinstance(f, tuple):
            stack.extend(f[1])
        elif isinstance(f, str) and f not in formulas:
            target = resolve_ref(schema, f)  # unresolved: llguidance names it
            formulas[f] = True if target is _UNRESOLVED else _formula(target, memo)
            stack.append(formulas[f])
    known = dict.fromkeys(formulas, False)

    def value(f: Formula) -> bool:
        if isinstance(f, bool):
            return f
        if isinstance(f, str):
            return known[f]
        parts = (value(p) for p in f[1])
        return all(parts) if f[0] == "and" else any(parts)

    for _ in range(8):
        changed = False
        for ref in reversed(formulas):
            if not known[ref] and value(formulas[ref]):
                known[ref] = changed = True
        if not changed:
            return value(root)
    return True


def _join(op: str, parts: list[Formula]) -> Formula:
    unit = op == "and"  # and: True is neutral, False decides; or: the other way round
    kept = [p for p in parts if p is not unit]
    if any(p is (not unit) for p in kept):
        return not unit
    return unit if not kept else kept[0] if len(kept) == 1 else (op, tuple(kept))


def _formula(node: Any, memo: dict[int, Formula]) -> Formula:
    """A subschema's own $ref, allOf, anyOf/oneOf and type must all allow a finite
    instance: an object its required properties, an array its ``minItems`` items.
    Only $refs make it False: what else cannot be met is llguidance's to name
    (recursive: ``_too_deep`` has bounded the nesting)."""
    if not isinstance(node, dict):
        return True
    if id(node) in memo:
        return memo[id(node)]

    def sub(s: Any) -> Formula:
        return _formula(s, memo)

    parts: list[Formula] = []
    if isinstance(node.get("$ref"), str):
        parts.append(node["$ref"])
    if isinstance(node.get("allOf"), list):
        parts.extend(sub(s) for s in node["allOf"])
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list) and node[key]:
            parts.append(_join("or", [sub(s) for s in node[key]]))
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if isinstance(types, list) and "const" not in node and "enum" not in node:
        parts.append(_join("or", [_shape(node, t, sub) for t in types]))
    memo[id(node)] = result = _join("and", parts)
    return result


def _shape(node: dict[str, Any], type_: Any, sub: Callable[[Any], Formula]) -> Formula:
    if type_ == "object":
        props, required = node.get("properties"), node.get("required")
        if isinstance(props, dict) and isinstance(required, list):
            return _join(
                "and", [sub(props[k]) for k in required if isinstance(k, str) and k in props]
            )
    elif type_ == "array":
        least = node.get("minItems", 0)
        if isinstance(least, int) and least > 0 and "prefixItems" not in node:
            return sub(node.get("items", True))
    return True
