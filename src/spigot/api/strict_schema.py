"""OpenAI's Structured Outputs rules for ``strict: true`` schemas, in OpenAI's words.

A strict schema is checked as OpenAI checks it, so that a client moving between
spigot and OpenAI meets the same refusals for the same mistakes. The rules
(platform.openai.com/docs/guides/structured-outputs, "Supported schemas"):
the root is an object, not ``anyOf``; every object has ``additionalProperties:
false`` and lists every property in ``required``; types, keywords and string
formats from a subset; ``$ref`` alone in its node; and size limits. Messages are
OpenAI's where its wording is known ("Invalid schema for response_format 'x': In
context=('properties', 'a'), 'additionalProperties' is required to be supplied
and to be false."), and in its style where not (the limits).

Whether a schema can be enforced at all is ``spigot.api.structured``'s question.
"""

from __future__ import annotations

from typing import Any, NoReturn

from spigot.errors import InvalidRequest

SCHEMA_CODE = "invalid_json_schema"  # OpenAI's code for a schema it refuses
# Not OpenAI's: the walks over a schema recurse once per subschema, and llguidance
# refuses JSON nested deeper than 128 levels anyway; this keeps a hostile schema
# from reaching Python's recursion limit first.
MAX_NESTING = 128
# OpenAI's limits for strict schemas (platform.openai.com/docs/guides/structured-outputs,
# "Supported schemas").
MAX_OBJECT_DEPTH = 10
MAX_PROPERTIES = 5000
MAX_ENUM_VALUES = 1000
MAX_TOTAL_STRING_LENGTH = 120_000
LARGE_ENUM = 250  # a string enum with more values than this ...
MAX_LARGE_ENUM_LENGTH = 15_000  # ... may total at most this many characters

STRICT_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
STRICT_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)
# Keywords strict mode refuses: OpenAI's "not yet supported" list and the rest of
# 2020-12 that constrains output or moves $ref resolution. A keyword in neither
# list is an annotation (title, description, default, ...) to OpenAI and llguidance.
NOT_PERMITTED = frozenset(
    {
        "allOf", "oneOf", "not", "if", "then", "else", "dependentRequired",
        "dependentSchemas", "dependencies", "patternProperties", "unevaluatedProperties",
        "propertyNames", "minProperties", "maxProperties", "unevaluatedItems", "contains",
        "minContains", "maxContains", "uniqueItems", "prefixItems", "additionalItems",
        "$id", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
        "$recursiveAnchor", "$vocabulary", "contentEncoding", "contentMediaType",
        "contentSchema",
    }
)  # fmt: skip
_DEFS = ("$defs", "definitions")
_REQUIRED = (
    "'required' is required to be supplied and to be an array including every key in properties."
)


Path = tuple[str, ...]


class _Strict:
    """One walk over a strict schema; the first violation is raised."""

    def __init__(self, param: str, prefix: str, code: str) -> None:
        self.param, self.prefix, self.code = param, prefix, code
        self.properties = self.enum_values = self.strings = 0

    def fail(self, detail: str, path: Path | None = None, how: str = "In context=") -> NoReturn:
        # OpenAI names the place as a Python tuple: In context=('properties', 'a'), ...
        where = "" if path is None else f"{how}{path!r}, "
        raise InvalidRequest(f"{self.prefix}{where}{detail}", param=self.param, code=self.code)

    def walk(self, node: Any, path: Path, objects: int, nesting: int) -> None:
        if nesting > MAX_NESTING:
            self.fail(f"schema is nested more than {MAX_NESTING} levels deep.", path)
        if not isinstance(node, dict):
            self.fail("schema must have a 'type' key.", path)
        for key in node:
            if key in NOT_PERMITTED:
                self.fail(f"'{key}' is not permitted.", path)
        for key in _DEFS:
            if key in node:
                self.definitions(node[key], (*path, key), nesting)
        if "$ref" in node:
            self.reference(node, path)
            return
        any_of = node.get("anyOf")
        if any_of is not None:
            if not isinstance(any_of, list) or not any_of:
                self.fail("'anyOf' must be a non-empty array.", path)
            for i, branch in enumerate(any_of):
                self.walk(branch, (*path, "anyOf", str(i)), objects, nesting + 1)
        elif "type" not in node:
            self.fail("schema must have a 'type' key.", path)
        self.values(node, path)
        types = node.get("type")
        types = [types] if isinstance(types, str) or types is None else types
        if not isinstance(types, list) or not types:
            self.fail(f"{types!r} is not a valid type.", path)
        for t in types:
            if t is not None and not (isinstance(t, str) and t in STRICT_TYPES):
                self.fail(f"{t!r} is not a valid type.", path)
        fmt = node.get("format")
        if fmt is not None and not (isinstance(fmt, str) and fmt in STRICT_FORMATS):
            self.fail(f"{fmt!r} is not a valid format.", path)
        if "object" in types:
            self.object(node, path, objects + 1, nesting)
        if "array" in types:
            if "items" not in node:
                self.fail("array schema missing items.", path)
            self.walk(node["items"], (*path, "items"), objects, nesting + 1)

    def definitions(self, defs: Any, path: Path, nesting: int) -> None:
        if not isinstance(defs, dict):
            self.fail(f"'{path[-1]}' must be an object.", path[:-1])
        for name, sub in defs.items():
            self.strings += len(name)
            self.walk(sub, (*path, name), 0, nesting + 1)

    def reference(self, node: dict[str, Any], path: Path) -> None:
        extra = sorted(k for k in node if k != "$ref" and k not in _DEFS)
        if extra:
            keys = ", ".join(repr(k) for k in extra)
            self.fail(f"$ref cannot have keywords {{{keys}}}.", path, how="context=")
        if not isinstance(node["$ref"], str):
            self.fail("'$ref' must be a string.", path)

    def values(self, node: dict[str, Any], path: Path) -> None:
        if isinstance(node.get("const"), str):
            self.strings += len(node["const"])
        if "enum" not in node:
            return
        enum = node["enum"]
        if not isinstance(enum, list) or not enum:
            self.fail("'enum' must be a non-empty array.", path)
        length = sum(len(v) for v in enum if isinstance(v, str))
        self.enum_values += len(enum)
        self.strings += length
        if len(enum) > LARGE_ENUM and length > MAX_LARGE_ENUM_LENGTH:
            self.fail(
                f"an enum with more than {LARGE_ENUM} values may total at most "
                f"{MAX_LARGE_ENUM_LENGTH} characters, got {length}.",
                path,
            )

    def object(self, node: dict[str, Any], path: Path, objects: int, nesting: int) -> None:
        if objects > MAX_OBJECT_DEPTH:
            self.fail(f"objects are nested more than {MAX_OBJECT_DEPTH} levels deep.", path)
        if node.get("additionalProperties") is not False:
            self.fail("'additionalProperties' is required to be supplied and to be false.", path)
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            self.fail("'properties' must be an object.", path)
        required = node.get("required")
        if properties or required is not None:
            if not isinstance(required, list):
                self.fail(f"{_REQUIRED} Missing '{next(iter(properties), 'required')}'.", path)
            for key in properties:
                if key not in required:
                    self.fail(f"{_REQUIRED} Missing '{key}'.", path)
            for key in required:
                if not isinstance(key, str) or key not in properties:
                    self.fail(f"{_REQUIRED} Extra required key '{key}' supplied.", path)
        self.properties += len(properties)
        for key, sub in properties.items():
            self.strings += len(key)
            self.walk(sub, (*path, "properties", key), objects, nesting + 1)

    def limits(self) -> None:
        for total, limit, what in (
            (self.properties, MAX_PROPERTIES, "object properties"),
            (self.enum_values, MAX_ENUM_VALUES, "enum values"),
            (self.strings, MAX_TOTAL_STRING_LENGTH, "characters in property names, "
             "definition names, enum values and const values"),
        ):  # fmt: skip
            if total > limit:
                self.fail(f"the schema has {total} {what} in total; at most {limit} are allowed.")


def check_strict_schema(
    schema: Any,
    *,
    param: str,
    name: str,
    what: str = "response_format",
    code: str = SCHEMA_CODE,
) -> None:
    """OpenAI's Structured Outputs rules for ``strict: true``: the first violation
    is an ``InvalidRequest`` with OpenAI's message, ``param`` and ``code``.

    The message opens "Invalid schema for {what} '{name}': "; a tool's parameters
    pass ``what="function"`` and the function's name.
    """
    walker = _Strict(param, f"Invalid schema for {what} '{name}': ", code)
    root_type = schema.get("type") if isinstance(schema, dict) else None
    if root_type != "object":
        walker.fail(
            f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{root_type}\"'."
        )
    if "anyOf" in schema:
        walker.fail("'anyOf' is not permitted.", ())
    walker.walk(schema, (), 0, 0)
    walker.limits()
