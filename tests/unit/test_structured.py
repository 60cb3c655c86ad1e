"""response_format: OpenAI's strict rules, llguidance's grammars, and what they let out.

Grammars are checked the way an engine uses them: an llguidance matcher over a
byte-level tokenizer (one token per byte, plus EOS) is walked at random, and what
it lets through must be compact JSON that matches the schema.
"""

from __future__ import annotations

import json
import random
import time
from typing import Annotated, Any, ClassVar, Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field, ValidationError

from spigot.api.strict_schema import (
    MAX_OBJECT_DEPTH,
    MAX_PROPERTIES,
    MAX_TOTAL_STRING_LENGTH,
    NOT_PERMITTED,
)
from spigot.api.structured import (
    ResponseFormat,
    TextFormat,
    check_constrained_sampling,
    check_enforceable,
    check_strict_schema,
    format_constraint,
    json_object_grammar,
)
from spigot.api.validation import validation_error
from spigot.engine.types import Constraint
from spigot.errors import InvalidRequest
from tests.e2e.test_structured_output import PERSON, assert_compact, violations

PARAM = "response_format.json_schema.schema"
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Bytes:
    """A tokenizer with one token per byte and EOS (256): every text has one spelling."""

    eos_token_id = 256
    bos_token_id = None
    tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids: ClassVar[list[int]] = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


TOKENIZER = LLTokenizer(TokenizerWrapper(_Bytes()))
EOS = 256


def accepts(grammar: str, text: str) -> bool:
    m = LLMatcher(TOKENIZER, grammar, log_level=0)
    return m.consume_tokens(list(text.encode())) and m.is_accepting() and not m.is_error()


def sample(grammar: str, rng: random.Random, steps: int = 4000) -> str | None:
    """A random text the grammar allows, ended by EOS; None if none ended in ``steps``.
    Closing characters are favoured so that the walk ends."""
    m = LLMatcher(TOKENIZER, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    out = bytearray()
    for _ in range(steps):
        mask = m.compute_bitmask()
        allowed = [t for t in range(257) if mask[t // 8] >> (t % 8) & 1]
        assert allowed, f"nothing allowed after {bytes(out)!r}"
        if EOS in allowed:
            return out.decode()
        weights = [30 if bytes([t]) in b'"]}n' else 1 for t in allowed]
        token = rng.choices(allowed, weights)[0]
        assert m.consume_token(token), m.get_error()
        out.append(token)
    return None


def assert_generates_valid(grammar: str, schema: Any, tries: int = 8, seed: int = 0) -> None:
    rng = random.Random(seed)
    done = 0
    for _ in range(tries):
        text = sample(grammar, rng)
        if text is None:
            continue
        done += 1
        assert_compact(text)
        assert violations(json.loads(text), schema) == [], (text, schema)
    assert done, "no sample finished"


def fmt(schema: Any, *, strict: bool | None = True, name: str = "s") -> ResponseFormat:
    spec: dict[str, Any] = {"name": name, "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return ResponseFormat.model_validate({"type": "json_schema", "json_schema": spec})


def refusal(schema: Any, *, strict: bool = True) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        format_constraint(fmt(schema, strict=strict))
    error = caught.value
    assert error.status == 400 and error.error_type == "invalid_request_error"
    return error


def obj(**properties: Any) -> dict[str, Any]:
    """A strict object: every property required, nothing else allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


STR = {"type": "string"}
NESTED_ARRAY = obj(
    ids=STR, steps={"type": "array", "items": obj(explanation=STR, output=STR), "maxItems": 3}
)


# -- strict rules: each violation, OpenAI's words, the schema's param ---------------------

STRICT_CASES: list[tuple[str, Any, str]] = [
    ("root-array", {"type": "array", "items": STR},
     "schema must be a JSON Schema of 'type: \"object\"', got 'type: \"array\"'."),
    ("root-anyOf-without-type", {"anyOf": [obj(a=STR)]},
     "schema must be a JSON Schema of 'type: \"object\"', got 'type: \"None\"'."),
    ("root-anyOf", {**obj(a=STR), "anyOf": [obj(a=STR)]},
     "In context=(), 'anyOf' is not permitted."),
    ("no-additionalProperties", {"type": "object", "properties": {"a": STR}, "required": ["a"]},
     "In context=(), 'additionalProperties' is required to be supplied and to be false."),
    ("additionalProperties-true", {**obj(a=STR), "additionalProperties": True},
     "In context=(), 'additionalProperties' is required to be supplied and to be false."),
    ("map-of-values", obj(m={"type": "object", "properties": {}, "additionalProperties": STR}),
     "In context=('properties', 'm'), 'additionalProperties' is required to be supplied and "
     "to be false."),
    ("nested-in-anyOf", obj(c={"anyOf": [{"type": "object", "properties": {}}, {"type": "null"}]}),
     "In context=('properties', 'c', 'anyOf', '0'), 'additionalProperties' is required to be "
     "supplied and to be false."),
    ("required-missing-key", {**obj(a=STR, b=STR), "required": ["a"]},
     "In context=(), 'required' is required to be supplied and to be an array including every "
     "key in properties. Missing 'b'."),
    ("required-absent", {k: v for k, v in obj(a=STR).items() if k != "required"},
     "In context=(), 'required' is required to be supplied and to be an array including every "
     "key in properties. Missing 'a'."),
    ("required-extra-key", {**obj(a=STR), "required": ["a", "z"]},
     "In context=(), 'required' is required to be supplied and to be an array including every "
     "key in properties. Extra required key 'z' supplied."),
    ("no-type", obj(a={"description": "anything"}),
     "In context=('properties', 'a'), schema must have a 'type' key."),
    ("enum-without-type", obj(a={"enum": ["x"]}),
     "In context=('properties', 'a'), schema must have a 'type' key."),
    ("boolean-schema", obj(a=True),
     "In context=('properties', 'a'), schema must have a 'type' key."),
    ("unknown-type", obj(a={"type": "text"}),
     "In context=('properties', 'a'), 'text' is not a valid type."),
    ("format-uri", obj(a={"type": "string", "format": "uri"}),
     "In context=('properties', 'a'), 'uri' is not a valid format."),
    ("array-without-items", obj(a={"type": "array"}),
     "In context=('properties', 'a'), array schema missing items."),
    ("ref-with-keywords", {**obj(a={"$ref": "#/$defs/s", "title": "A", "description": "d"}),
                           "$defs": {"s": STR}},
     "context=('properties', 'a'), $ref cannot have keywords {'description', 'title'}."),
    ("empty-enum", obj(a={"type": "string", "enum": []}),
     "In context=('properties', 'a'), 'enum' must be a non-empty array."),
    ("empty-anyOf", obj(a={"anyOf": []}),
     "In context=('properties', 'a'), 'anyOf' must be a non-empty array."),
    ("in-defs", {**obj(a={"$ref": "#/$defs/d"}), "$defs": {"d": {"type": "object"}}},
     "In context=('$defs', 'd'), 'additionalProperties' is required to be supplied and to be "
     "false."),
    ("in-array-items", obj(a={"type": "array", "items": {"type": "object", "properties": {}}}),
     "In context=('properties', 'a', 'items'), 'additionalProperties' is required to be supplied "
     "and to be false."),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "schema", "detail"), STRICT_CASES, ids=[c[0] for c in STRICT_CASES]
)
def test_strict_rule_is_400_in_openais_words(case: str, schema: Any, detail: str) -> None:
    error = refusal(schema)
    assert error.message == f"Invalid schema for response_format 's': {detail}"
    assert error.param == PARAM
    assert error.code == "invalid_json_schema"
    assert error.to_body()["error"] == {
        "message": error.message,
        "type": "invalid_request_error",
        "param": PARAM,
        "code": "invalid_json_schema",
    }


@pytest.mark.parametrize("keyword", sorted(NOT_PERMITTED))
def test_unsupported_keyword_is_not_permitted(keyword: str) -> None:
    error = refusal(obj(a={"type": "string", keyword: 1}))
    assert error.message == (
        f"Invalid schema for response_format 's': In context=('properties', 'a'), "
        f"'{keyword}' is not permitted."
    )


def nested_objects(levels: int) -> dict[str, Any]:
    schema = obj(leaf=STR)
    for _ in range(levels - 1):
        schema = obj(inner=schema)
    return schema


def test_object_nesting_limit() -> None:
    format_constraint(fmt(nested_objects(MAX_OBJECT_DEPTH)))
    error = refusal(nested_objects(MAX_OBJECT_DEPTH + 1))
    assert "objects are nested more than 10 levels deep." in error.message
    assert error.param == PARAM


def test_total_properties_limit() -> None:
    names = {f"p{i}": {"type": "integer"} for i in range(MAX_PROPERTIES)}
    check_strict_schema(obj(**names), param=PARAM, name="s")
    with pytest.raises(InvalidRequest, match="5001 object properties in total; at most 5000"):
        check_strict_schema(obj(**names, extra=STR), param=PARAM, name="s")


def test_enum_value_limits() -> None:
    def enum(n: int, width: int = 2) -> dict[str, Any]:
        return {"type": "string", "enum": [f"{i:0{width}}" for i in range(n)]}

    check_strict_schema(obj(a=enum(600), b=enum(400)), param=PARAM, name="s")
    with pytest.raises(InvalidRequest, match="1001 enum values in total; at most 1000"):
        check_strict_schema(obj(a=enum(600), b=enum(401)), param=PARAM, name="s")
    # More than 250 string values may total 15,000 characters, no more.
    check_strict_schema(obj(a=enum(251, 59)), param=PARAM, name="s")  # 14,809 characters
    with pytest.raises(InvalidRequest, match="may total at most 15000 characters, got 15311"):
        check_strict_schema(obj(a=enum(251, 61)), param=PARAM, name="s")
    check_strict_schema(obj(a=enum(250, 100)), param=PARAM, name="s")  # 25,000: only 250


def test_total_string_length_limit() -> None:
    # Property names, definition names, enum and const values count; descriptions do not.
    big = {"type": "string", "enum": ["x" * 10_000] * 5, "description": "d" * 200_000}
    schema = obj(a=big, b=big, c={"type": "string", "const": "y" * 19_000})
    check_strict_schema(schema, param=PARAM, name="s")  # 119,003 characters
    schema["properties"]["c"]["const"] += "y" * 1000
    with pytest.raises(InvalidRequest, match=f"at most {MAX_TOTAL_STRING_LENGTH} are allowed"):
        check_strict_schema(schema, param=PARAM, name="s")


def test_function_parameters_get_functions_wording() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_strict_schema(
            {"type": "object", "properties": {"q": STR}, "required": ["q"]},
            param="tools[0].function.parameters",
            name="lookup",
            what="function",
        )
    assert caught.value.message == (
        "Invalid schema for function 'lookup': In context=(), 'additionalProperties' is "
        "required to be supplied and to be false."
    )
    assert caught.value.param == "tools[0].function.parameters"


# -- valid strict schemas pass, and what they let out matches them -------------------------

LINKED_LIST = {
    **obj(linked_list={"$ref": "#/$defs/node"}),
    "$defs": {
        "node": obj(value={"type": "number"},
                    next={"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]})
    },
}  # fmt: skip
UI = obj(
    type={"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
    label=STR,
    children={"type": "array", "items": {"$ref": "#"}},
    attributes={"type": "array", "items": obj(name=STR, value=STR)},
)
VALID: dict[str, dict[str, Any]] = {
    "person": PERSON,
    "nested-array": NESTED_ARRAY,
    "enum-and-null-union": obj(unit={"type": ["string", "null"], "enum": ["F", "C", None]}),
    "any-of-objects": obj(item={"anyOf": [obj(name=STR, age={"type": "number"}), obj(city=STR)]}),
    "defs": {**obj(steps={"type": "array", "items": {"$ref": "#/$defs/step"}}, final=STR),
             "$defs": {"step": obj(explanation=STR, output=STR)}},
    "definitions": {**obj(a={"$ref": "#/definitions/b"}),
                    "definitions": {"b": {"type": "boolean"}}},
    "linked-list": LINKED_LIST,
    "root-recursion": UI,
    "constraints": obj(
        n={"type": "number", "minimum": -1.5, "exclusiveMaximum": 10, "multipleOf": 0.5},
        i={"type": "integer", "exclusiveMinimum": 0, "maximum": 3},
        s={"type": "string", "pattern": "^@[a-z]{1,5}$"},
        d={"type": "string", "format": "date"},
        u={"type": "string", "format": "uuid"},
        a={"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
        c={"type": "string", "const": "fixed"},
        m={"type": "string", "minLength": 2, "maxLength": 3},
    ),
    "annotations": {**obj(a={"type": "string", "title": "A", "default": "x", "examples": ["y"]}),
                    "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T"},
    "empty-object": obj(),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VALID))
def test_valid_strict_schema_gives_a_grammar_whose_outputs_match(name: str) -> None:
    schema = VALID[name]
    constraint = format_constraint(fmt(schema))
    assert isinstance(constraint, Constraint) and constraint.trigger is None
    ok, messages = LLMatcher.validate_grammar_with_warnings(constraint.grammar)
    assert not ok, messages
    assert_generates_valid(constraint.grammar, schema)


class Address(BaseModel):
    city: str
    zip: str = Field(pattern="^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=16, description="The name")
    kind: Literal["friend", "colleague"]
    tags: list[Annotated[str, Field(max_length=10)]] = Field(max_length=3)
    home: Address = Field(description="Where they live")  # $ref with a sibling: inlined
    work: Address | None
    note: str = "none"


class Scored(Person):
    scores: dict[str, int] | None = None


def test_the_openai_sdks_strict_schema_passes() -> None:
    # What client.chat.completions.parse(response_format=Person) sends.
    schema = to_strict_json_schema(Person)
    constraint = format_constraint(fmt(schema))
    assert constraint is not None
    assert_generates_valid(constraint.grammar, schema)


def test_a_dict_field_is_refused_as_openai_refuses_it() -> None:
    # The SDK leaves a dict[...] open ("additionalProperties": {...}); OpenAI refuses it.
    error = refusal(to_strict_json_schema(Scored))
    assert "('properties', 'scores', 'anyOf', '0'), 'additionalProperties'" in error.message


def test_output_is_compact_whatever_the_schemas_x_guidance_says() -> None:
    schema = {**PERSON, "x-guidance": {"whitespace_flexible": True, "whitespace_pattern": " *",
                                       "lenient": True}}  # fmt: skip
    constraint = format_constraint(fmt(schema, strict=False))
    assert constraint is not None
    grammar = constraint.grammar
    whole = (
        '{"name":"a","kind":"friend","age":1,"tags":["x"],'
        '"address":{"city":"c","zip":"12345"},"contact":null,"active":true}'
    )
    assert accepts(grammar, whole)
    assert not accepts(grammar, '{ "name":"a"')
    assert not accepts(grammar, '{"name": "a"')
    assert not accepts(grammar, '\n{"name":"a"')
    # ... and its lenient flag does not let an unenforceable keyword through.
    lenient = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}},
               "x-guidance": {"lenient": True}}  # fmt: skip
    assert "uniqueItems" in refusal(lenient, strict=False).message


def test_json_object_grammar_is_any_compact_object() -> None:
    grammar = json_object_grammar()
    for text in ["{}", '{"a":[1,{"b":null}],"c":"x y","d":-1.5e3,"e":true}']:
        assert accepts(grammar, text), text
    for text in ["[]", '"x"', "1", "{ }", '{"a": 1}', '{"a":1}\n', ' {"a":1}']:
        assert not accepts(grammar, text), text
    rng = random.Random(3)
    for _ in range(10):
        text = sample(grammar, rng)
        if text is not None:
            assert_compact(text)
            assert isinstance(json.loads(text), dict)


def test_json_object_format_and_a_schemaless_json_schema() -> None:
    json_object = ResponseFormat.model_validate({"type": "json_object"})
    assert format_constraint(json_object) == Constraint(
        grammar=json_object_grammar(), openai={"response_format": {"type": "json_object"}}
    )
    assert format_constraint(ResponseFormat.model_validate({"type": "text"})) is None
    # Non-strict without a schema: any object. Strict without one: the schema is missing.
    loose = format_constraint(fmt(None, strict=None))
    assert loose is not None and loose.grammar == json_object_grammar()
    error = refusal(None)
    assert (error.param, error.code) == (PARAM, None)
    assert error.message == f"Missing required parameter: '{PARAM}'."


def test_constraint_carries_the_format_for_an_engine_elsewhere() -> None:
    schema = obj(a=STR)
    wire = {"name": "s", "description": "d", "schema": schema, "strict": True}
    chat = ResponseFormat.model_validate({"type": "json_schema", "json_schema": wire})
    constraint = format_constraint(chat)
    assert constraint is not None
    assert constraint.openai == {"response_format": {"type": "json_schema", "json_schema": wire}}
    responses = TextFormat.model_validate({"type": "json_schema", **wire})
    same = format_constraint(responses)
    assert same is not None and same.openai == constraint.openai
    assert same.grammar == constraint.grammar


# -- any schema: what llguidance cannot enforce is a 400 -----------------------------------


def test_non_strict_schema_outside_the_strict_rules_is_enforced() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert "Missing 'b'" in refusal(schema).message
    constraint = format_constraint(fmt(schema, strict=False))
    assert constraint is not None
    assert accepts(constraint.grammar, '{"a":"xy"}')
    assert accepts(constraint.grammar, '{"a":"xy","b":3}')
    assert not accepts(constraint.grammar, '{"a":"xyzw"}')
    assert not accepts(constraint.grammar, '{"b":3}')
    assert_generates_valid(constraint.grammar, schema)
    one_of = {"type": "object", "properties": {"v": {"oneOf": [STR, {"type": "integer"}]}}}
    assert format_constraint(fmt(one_of, strict=False)) is not None


UNENFORCEABLE: list[tuple[str, dict[str, Any], str]] = [
    ("bad-regex", {"type": "string", "pattern": "(["}, "regex parse error"),
    ("look-around", {"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ("unique-items", {"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("contains", {"type": "array", "contains": STR}, "contains"),
    ("property-names", {"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ("not", {"not": STR}, "not"),
    ("ref-to-nowhere", {"$ref": "#/$defs/none"}, "/$defs/none"),
    ("remote-ref", {"$ref": "https://example.com/s.json"}, "example.com"),
    ("unknown-format", {"type": "string", "format": "bogus"}, "bogus"),
    ("unknown-type", {"type": "text"}, "text"),
    ("multiple-of-zero", {"type": "number", "multipleOf": 0}, "multiple"),
    ("unsatisfiable", {"type": "string", "minLength": 3, "maxLength": 1}, "nsatisfiable"),
    ("false", False, "nsatisfiable"),
]


@pytest.mark.parametrize(
    ("case", "sub", "fragment"), UNENFORCEABLE, ids=[c[0] for c in UNENFORCEABLE]
)
def test_what_llguidance_cannot_enforce_is_400(case: str, sub: Any, fragment: str) -> None:
    error = refusal(obj(v=sub), strict=False)
    assert error.message.startswith("Invalid schema for response_format 's': ")
    assert fragment in error.message
    assert (error.param, error.code) == (PARAM, "invalid_json_schema")


def test_param_follows_the_api_and_the_callers_prefix() -> None:
    bad = obj(v={"type": "string", "pattern": "(["})
    responses = TextFormat.model_validate({"type": "json_schema", "name": "s", "schema": bad})
    with pytest.raises(InvalidRequest) as caught:
        format_constraint(responses)
    assert caught.value.param == "text.format.schema"
    with pytest.raises(InvalidRequest) as caught:
        format_constraint(fmt(bad, strict=False), param="body.response_format")
    assert caught.value.param == "body.response_format.json_schema.schema"
    with pytest.raises(InvalidRequest) as caught:
        check_enforceable(bad, param="tools[2].function.parameters")
    assert caught.value.param == "tools[2].function.parameters"
    assert caught.value.message.startswith("Invalid JSON schema: regex parse error")


# -- schemas with no finite instance ---------------------------------------------------------

INFINITE: dict[str, Any] = {
    "self": obj(me={"$ref": "#"}),
    "loop": {**obj(a={"$ref": "#/$defs/a"}), "$defs": {"a": {"$ref": "#/$defs/a"}}},
    "mutual": {**obj(a={"$ref": "#/$defs/a"}),
               "$defs": {"a": obj(b={"$ref": "#/$defs/b"}), "b": obj(a={"$ref": "#/$defs/a"})}},
    "non-empty-array": obj(kids={"type": "array", "items": {"$ref": "#"}, "minItems": 1}),
    "all-branches": obj(x={"anyOf": [{"$ref": "#"}, obj(y={"$ref": "#"})]}),
}  # fmt: skip
FINITE: dict[str, Any] = {
    "nullable": obj(me={"anyOf": [{"$ref": "#"}, {"type": "null"}]}),
    "type-list": obj(me={"type": ["object", "null"], "properties": {"me": {"$ref": "#"}},
                         "required": ["me"], "additionalProperties": False}),
    "empty-array": obj(kids={"type": "array", "items": {"$ref": "#"}}),
    "optional": {"type": "object", "properties": {"me": {"$ref": "#"}}},
    "mutual-with-exit": {**obj(a={"$ref": "#/$defs/a"}),
                         "$defs": {"a": obj(b={"$ref": "#/$defs/b"}),
                                   "b": {"anyOf": [obj(a={"$ref": "#/$defs/a"}), STR]}}},
    "linked-list": LINKED_LIST,
}  # fmt: skip


@pytest.mark.parametrize("name", list(INFINITE))
def test_schema_with_only_infinite_instances_is_refused(name: str) -> None:
    for strict in (False, True):
        error = refusal(INFINITE[name], strict=strict)
        assert "no finite instance" in error.message and error.param == PARAM


@pytest.mark.parametrize("name", list(FINITE))
def test_recursive_schema_with_a_way_out_is_enforced(name: str) -> None:
    constraint = format_constraint(fmt(FINITE[name], strict=False))
    assert constraint is not None
    assert_generates_valid(constraint.grammar, FINITE[name])


def chain(n: int, end: Any) -> dict[str, Any]:
    """d0 needs d1 needs ... d{n-1} needs ``end``."""
    defs: dict[str, Any] = {f"d{i}": obj(next={"$ref": f"#/$defs/d{i + 1}"}) for i in range(n)}
    defs[f"d{n}"] = end
    return {**obj(start={"$ref": "#/$defs/d0"}), "$defs": defs}


def test_a_chain_of_definitions_is_followed_to_its_end() -> None:
    assert_generates_valid(check_enforceable(chain(30, STR), param=PARAM), chain(30, STR))
    error = refusal(chain(30, {"$ref": "#/$defs/d0"}), strict=False)  # a loop: no end
    assert "no finite instance" in error.message


@pytest.mark.parametrize("end", [STR, {"$ref": "#/$defs/d0"}], ids=["ends", "loops"])
def test_a_long_chain_of_definitions_is_a_400_not_a_crash(end: Any) -> None:
    # llguidance compiles each $ref inside its user: 3000 of them overflow its stack.
    started = time.perf_counter()
    error = refusal(chain(3000, end), strict=False)
    assert "nested more than 128 levels deep, counting through each '$ref'" in error.message
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("key", ["items", "anyOf"])
def test_deep_nesting_is_a_400_not_a_crash(strict: bool, key: str) -> None:
    inner: Any = STR
    for _ in range(900):
        inner = {"type": "array", "items": inner} if key == "items" else {"anyOf": [inner]}
    error = refusal(obj(v=inner), strict=strict)
    assert error.param == PARAM and "nested" in error.message


# -- the wire: names, types, missing fields, other options ---------------------------------


class Body(BaseModel):
    response_format: ResponseFormat | None = None


class ResponsesBody(BaseModel):
    class Text(BaseModel):
        format: TextFormat

    text: Text


WIRE_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown-type", {"type": "object"}, "response_format.type", "Input should be"),
    ("name-missing", {"type": "json_schema", "json_schema": {"schema": obj()}},
     "response_format.json_schema.name",
     "Missing required parameter: 'response_format.json_schema.name'."),
    ("name-pattern", {"type": "json_schema", "json_schema": {"name": "my schema"}},
     "response_format.json_schema.name",
     "string does not match pattern. Expected a string that matches the pattern "
     "'^[a-zA-Z0-9_-]+$'."),
    ("name-too-long", {"type": "json_schema", "json_schema": {"name": "n" * 65}},
     "response_format.json_schema.name",
     "string too long. Expected a string with maximum length 64, but got a string with "
     "length 65 instead."),
    ("schema-not-an-object", {"type": "json_schema", "json_schema": {"name": "s", "schema": True}},
     "response_format.json_schema.schema", "valid dictionary"),
    ("strict-not-a-bool", {"type": "json_schema", "json_schema": {"name": "s", "strict": "yes"}},
     "response_format.json_schema.strict", "valid boolean"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "value", "param", "fragment"), WIRE_CASES, ids=[c[0] for c in WIRE_CASES]
)
def test_wire_mistakes_name_the_field(case: str, value: Any, param: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"response_format": value})
    error = validation_error(caught.value)
    assert error.param == param and fragment in error.message, error.message


def test_name_may_be_64_of_the_allowed_characters() -> None:
    name = "aZ0_-" * 12 + "abcd"
    assert len(name) == 64
    Body.model_validate({"response_format": {"type": "json_schema", "json_schema": {"name": name}}})


def test_missing_json_schema_and_responses_fields() -> None:
    with pytest.raises(InvalidRequest) as caught:
        format_constraint(ResponseFormat.model_validate({"type": "json_schema"}))
    assert caught.value.param == "response_format.json_schema"
    for missing, present in (("name", {"schema": obj()}), ("schema", {"name": "s"})):
        body = {"text": {"format": {"type": "json_schema", **present}}}
        with pytest.raises(InvalidRequest) as caught:
            format_constraint(ResponsesBody.model_validate(body).text.format)
        assert caught.value.param == f"text.format.{missing}"
        assert caught.value.message == f"Missing required parameter: 'text.format.{missing}'."


def test_unknown_fields_are_ignored() -> None:
    value = {"type": "json_schema", "json_schema": {"name": "s", "schema": obj(), "x": 1}, "y": 2}
    parsed = Body.model_validate({"response_format": value}).response_format
    assert parsed is not None and format_constraint(parsed) is not None


def test_options_that_would_force_output_past_the_end_are_refused() -> None:
    check_constrained_sampling(ignore_eos=False, min_tokens=0)
    for kwargs, param in (({"ignore_eos": True, "min_tokens": 0}, "ignore_eos"),
                          ({"ignore_eos": False, "min_tokens": 3}, "min_tokens")):  # fmt: skip
        with pytest.raises(InvalidRequest) as caught:
            check_constrained_sampling(**kwargs)
        assert caught.value.param == param


def test_a_repeated_schema_is_compiled_once() -> None:
    schema = obj(a={"type": "string", "pattern": "^[a-z]{1,3}$"}, b=STR)
    first = check_enforceable(schema, param=PARAM)
    assert check_enforceable(json.loads(json.dumps(schema)), param=PARAM) is first


# -- generated schemas: a 400 or a grammar, never anything else -----------------------------

LEAVES = st.sampled_from(
    [
        STR, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
        {"type": "string", "maxLength": 4}, {"type": "string", "enum": ["a", "b"]},
        {"type": ["string", "null"]}, {"type": "string", "pattern": "^[a-z]+$"},
        {"type": "string", "pattern": "(["}, {"type": "string", "format": "date-time"},
        {"type": "string", "format": "uri"}, {"type": "integer", "minimum": 5, "maximum": 1},
        {"type": "number", "multipleOf": 0.25}, {"const": 3}, {"enum": []}, {}, True, False,
        {"$ref": "#"}, {"$ref": "#/$defs/d"}, {"$ref": "#/$defs/nope"}, {"type": "wat"},
        {"type": 5}, {"type": []}, {"type": "string", "minLength": "x"}, {"not": STR},
        {"$ref": "#/properties"}, {"type": "array"}, {"anyOf": []}, 7, None, "x", [],
    ]
)  # fmt: skip


def _node(kind: str, children: list[Any], flags: list[bool], key: str) -> Any:
    names = [f"k{i}" for i in range(len(children))]
    if kind == "object":
        node: dict[str, Any] = {
            "type": "object",
            "properties": dict(zip(names, children, strict=True)),
        }
        node["required"] = names if flags[0] else names[1:] + ([key] if flags[1] else [])
        if flags[2]:
            node["additionalProperties"] = False
        return node
    if kind == "array":
        node = {"type": "array", "items": children[0] if children else {}}
        if flags[0]:
            node["minItems"] = 1
        return node
    if kind == "ref":
        return (
            {"$ref": "#/$defs/d", key: children[0] if children else {}}
            if flags[0]
            else {"$ref": "#/$defs/d"}
        )
    return {kind: children}  # anyOf, oneOf, allOf, or a keyword nobody knows


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(
        _node,
        st.sampled_from(
            ["object", "object", "object", "array", "array", "anyOf", "oneOf", "allOf", "ref", "if"]
        ),
        st.lists(children, max_size=3),
        st.lists(st.booleans(), min_size=3, max_size=3),
        st.sampled_from(["description", "title", "allOf", "k0", "zz"]),
    )  # fmt: skip


SCHEMAS = st.builds(
    lambda root, d, x: {**root, "$defs": {"d": d}} if isinstance(root, dict) and x else root,
    st.recursive(LEAVES, _extend, max_leaves=10),
    st.recursive(LEAVES, _extend, max_leaves=4),
    st.booleans(),
)


@SETTINGS
@given(SCHEMAS, st.booleans())
def test_any_schema_is_a_400_or_a_grammar_llguidance_accepts(schema: Any, strict: bool) -> None:
    if not isinstance(schema, dict | None):
        with pytest.raises(ValidationError):
            fmt(schema, strict=strict)
        return
    try:
        constraint = format_constraint(fmt(schema, strict=strict))
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.param == PARAM, exc
        event("refused")
        return
    event("a grammar")
    assert constraint is not None
    failed, messages = LLMatcher.validate_grammar_with_warnings(constraint.grammar, TOKENIZER)
    assert not failed, messages
    matcher = LLMatcher(TOKENIZER, constraint.grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()


STRICT_LEAVES = st.sampled_from(
    [
        STR, {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"},
        {"type": "null"}, {"type": "string", "enum": ["a", "b", "c"]},
        {"type": ["string", "null"], "maxLength": 3}, {"type": "string", "pattern": "^[0-9]{2}$"},
        {"type": "string", "format": "date"}, {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "string", "const": "k"}, {"$ref": "#/$defs/leaf"},
    ]
)  # fmt: skip


def _strict_node(kind: str, children: list[Any]) -> Any:
    if kind == "array":
        return {"type": "array", "items": children[0] if children else STR, "maxItems": 2}
    if kind == "anyOf" and children:
        return {"anyOf": [*children, {"type": "null"}]}
    return obj(**{f"p{i}": c for i, c in enumerate(children)})


STRICT_SCHEMAS = st.builds(
    lambda children: {**obj(**{f"r{i}": c for i, c in enumerate(children)}),
                      "$defs": {"leaf": {"type": "string", "maxLength": 2}}},
    st.lists(st.recursive(STRICT_LEAVES, lambda c: st.builds(
        _strict_node, st.sampled_from(["object", "array", "anyOf"]), st.lists(c, max_size=3)),
        max_leaves=8), max_size=4),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STRICT_SCHEMAS, st.integers(0, 2**16))
def test_strict_schemas_are_enforced_exactly(schema: dict[str, Any], seed: int) -> None:
    constraint = format_constraint(fmt(schema))
    assert constraint is not None
    assert_generates_valid(constraint.grammar, schema, tries=3, seed=seed)


def test_text_format_with_null_fields_is_a_400_not_a_crash() -> None:
    # Found by the reliability fuzz: a null name reached the name check (a 500).
    nulls = {"name": None, "description": None, "schema": None, "strict": None}
    with pytest.raises(ValidationError) as caught:
        ResponsesBody.model_validate({"text": {"format": nulls}})  # no type
    error = validation_error(caught.value)
    assert error.param == "text.format.type", error.message
    body = ResponsesBody.model_validate({"text": {"format": {"type": "json_schema", **nulls}}})
    with pytest.raises(InvalidRequest) as missing:
        body.text.format.spec()
    assert missing.value.param == "text.format.name"
