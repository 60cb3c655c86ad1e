"""Structured output against the real server and model: every reply matches its schema.

``response_format`` is enforced by constrained decoding (docs/structured-output.md),
so the tests ask a 135M model for JSON at temperature 1 and check every reply with
a validator, instead of hoping: a reply that ends with "stop" is whole, compact JSON
that matches the schema. Schemas with bounded strings and arrays keep every reply
short, so each one finishes well inside its ``max_tokens``.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
ASK = [
    {"role": "system", "content": "You answer in JSON."},
    {"role": "user", "content": "Describe a made-up person: name, kind, tags, address, contact."},
]
SCHEMA_PARAM = "response_format.json_schema.schema"

# Nested objects, an array, enums and anyOf; every string and array bounded.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "kind": {"type": "string", "enum": ["friend", "colleague", "stranger"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 10},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "contact": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"email": {"type": "string", "maxLength": 24}},
                    "required": ["email"],
                    "additionalProperties": False,
                },
                {"type": "null"},
            ]
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "kind", "age", "tags", "address", "contact", "active"],
    "additionalProperties": False,
}
# Whatever the model writes, a reply to PERSON is far shorter than this.
ROOM = 400


def strict(schema: dict[str, Any], name: str = "person", **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **extra}}


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


# -- a validator for the JSON Schema these tests use ------------------------------------


def violations(value: Any, schema: Any, root: Any = None, at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (empty: it matches). The subset spigot's
    schemas use: type, enum, const, objects, arrays, anyOf/oneOf/allOf, local
    $ref, string length and pattern, number bounds."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{at}: no value is allowed"]
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#").strip("/").split("/"):
            if part:
                target = target[part.replace("~1", "/").replace("~0", "~")]
        return violations(value, target, root, at)
    out: list[str] = []
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in allowed):
            return [f"{at}: {value!r} is not of type {types}"]
    if "enum" in schema and not any(_same(value, v) for v in schema["enum"]):
        out.append(f"{at}: {value!r} not in enum")
    if "const" in schema and not _same(value, schema["const"]):
        out.append(f"{at}: {value!r} is not the const")
    for sub in schema.get("allOf", []):
        out += violations(value, sub, root, at)
    for key, need in (("anyOf", "any"), ("oneOf", "one")):
        if key in schema:
            ok = sum(not violations(value, sub, root, at) for sub in schema[key])
            if ok == 0 or (need == "one" and ok != 1):
                out.append(f"{at}: {key} matched {ok} branches")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{at}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                out += violations(v, props[k], root, f"{at}.{k}")
            else:
                out += violations(v, extra, root, f"{at}.{k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{at}: fewer than minItems")
        if len(value) > schema.get("maxItems", math.inf):
            out.append(f"{at}: more than maxItems")
        for i, item in enumerate(value):
            out += violations(item, schema.get("items", True), root, f"{at}[{i}]")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            out.append(f"{at}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: {value!r} does not match {schema['pattern']!r}")
    if _is(value, "number"):
        for key, fails in NUMBER_BOUNDS.items():
            if key in schema and fails(value, schema[key]):
                out.append(f"{at}: {value} breaks {key} {schema[key]}")
    return out


NUMBER_BOUNDS = {
    "minimum": lambda v, b: v < b,
    "maximum": lambda v, b: v > b,
    "exclusiveMinimum": lambda v, b: v <= b,
    "exclusiveMaximum": lambda v, b: v >= b,
}


def _is(value: Any, type_: str) -> bool:
    if type_ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    kinds = {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}
    return type_ in kinds and isinstance(value, kinds[type_])


def _same(a: Any, b: Any) -> bool:
    if _is(a, "number") and _is(b, "number"):
        return bool(a == b)
    return type(a) is type(b) and a == b


def assert_compact(text: str) -> None:
    """No whitespace outside strings: spigot's grammars allow none there."""
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            in_string = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        elif ch == '"':
            in_string = True
        else:
            assert ch not in " \t\r\n", f"whitespace at {i} in {text!r}"


def assert_matches(text: str, schema: dict[str, Any]) -> Any:
    """``text`` is compact JSON that matches ``schema``; its value."""
    value = json.loads(text)
    assert_compact(text)
    assert violations(value, schema) == [], (text, violations(value, schema))
    return value


# -- json_object and strict json_schema, streamed and not --------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_is_one_compact_object(client: openai.OpenAI, stream: bool) -> None:
    text, finish = complete(
        client,
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
        stream=stream,
    )
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(assert_matches(text, {"type": "object"}), dict)
    else:
        assert finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_strict_schema_reply_matches(client: openai.OpenAI, stream: bool) -> None:
    text, finish = complete(
        client, response_format=strict(PERSON, strict=True), max_tokens=ROOM, stream=stream
    )
    assert finish == "stop", text
    assert_matches(text, PERSON)


def test_streamed_text_equals_non_streamed(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "response_format": strict(PERSON, strict=True),
        "max_tokens": ROOM,
        "temperature": 0,
    }
    whole, _ = complete(client, **args)
    streamed, _ = complete(client, **args, stream=True)
    assert streamed == whole
    assert_matches(whole, PERSON)


def test_fifty_seeds_at_temperature_one_all_match(client: openai.OpenAI) -> None:
    def one(seed: int) -> tuple[str, str]:
        return complete(
            client,
            response_format=strict(PERSON, strict=True),
            max_tokens=ROOM,
            temperature=1.0,
            seed=seed,
            stream=seed % 2 == 1,
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(50)))
    for text, finish in replies:
        assert finish == "stop", text
        assert_matches(text, PERSON)
    assert len({text for text, _ in replies}) > 1  # temperature 1 did sample


class Address(BaseModel):
    city: str = Field(max_length=16)
    zip: str = Field(pattern="^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=16)
    kind: Literal["friend", "colleague", "stranger"]
    tags: list[Annotated[str, Field(max_length=10)]] = Field(max_length=3)
    address: Address
    nickname: Annotated[str, Field(max_length=12)] | None


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    """The SDK's own strict schema (to_strict_json_schema) passes the strict rules,
    and its parser accepts the reply."""
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Person, max_tokens=ROOM, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


def test_non_strict_schema_outside_the_strict_rules_is_enforced(
    server: RunningServer, client: openai.OpenAI
) -> None:
    # An optional property: strict mode refuses it, a non-strict schema is enforced anyway.
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 12},
            "digit": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer"],
        "additionalProperties": False,
    }
    for seed in range(4):
        text, finish = complete(
            client, response_format=strict(schema, name="a"), max_tokens=80, seed=seed
        )
        assert finish == "stop", text
        assert_matches(text, schema)
    reply = post(server, chat(response_format=strict(schema, name="a", strict=True)))
    assert_error(reply, SCHEMA_PARAM, "invalid_json_schema", "'required' is required")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_inside_the_json_finishes_with_length(
    client: openai.OpenAI, stream: bool
) -> None:
    text, finish = complete(
        client, response_format=strict(PERSON, strict=True), max_tokens=4, stream=stream
    )
    assert finish == "length"
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


# -- refusals: OpenAI's error shape, param naming the field -------------------------------


def _with(schema: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**schema, **changes}


def _prop(schema: dict[str, Any]) -> dict[str, Any]:
    return _with(PERSON, properties={**PERSON["properties"], "name": schema})


BAD: list[tuple[str, Any, str, str | None, str]] = [
    # (case, response_format, param, code, message fragment)
    ("type-unknown", {"type": "object"}, "response_format.type", None, "'response_format.type'"),
    ("json_schema-missing", {"type": "json_schema"}, "response_format.json_schema", None,
     "Missing required parameter"),
    ("name-missing", {"type": "json_schema", "json_schema": {"schema": PERSON}},
     "response_format.json_schema.name", None, "Missing required parameter"),
    ("name-pattern", strict(PERSON, name="a person"), "response_format.json_schema.name",
     None, "does not match pattern"),
    ("name-too-long", strict(PERSON, name="n" * 65), "response_format.json_schema.name",
     None, "string too long"),
    ("strict-without-schema", {"type": "json_schema", "json_schema": {"name": "p", "strict": True}},
     SCHEMA_PARAM, None, "Missing required parameter"),
    ("root-array", strict({"type": "array", "items": {"type": "string"}}, strict=True),
     SCHEMA_PARAM, "invalid_json_schema", "'type: \"object\"', got 'type: \"array\"'"),
    ("no-additionalProperties",
     strict({k: v for k, v in PERSON.items() if k != "additionalProperties"}, strict=True),
     SCHEMA_PARAM, "invalid_json_schema", "'additionalProperties' is required"),
    ("required-missing-key", strict(_with(PERSON, required=["name"]), strict=True),
     SCHEMA_PARAM, "invalid_json_schema", "Missing 'kind'"),
    ("allOf", strict(_prop({"allOf": [{"type": "string"}]}), strict=True), SCHEMA_PARAM,
     "invalid_json_schema", "In context=('properties', 'name'), 'allOf' is not permitted."),
    ("ref-with-description",
     strict(_with(_prop({"$ref": "#/$defs/s", "description": "x"}),
                  **{"$defs": {"s": {"type": "string"}}}), strict=True),
     SCHEMA_PARAM, "invalid_json_schema", "$ref cannot have keywords {'description'}"),
    ("format-uri", strict(_prop({"type": "string", "format": "uri"}), strict=True),
     SCHEMA_PARAM, "invalid_json_schema", "'uri' is not a valid format."),
    ("bad-pattern", strict(_prop({"type": "string", "pattern": "(["})), SCHEMA_PARAM,
     "invalid_json_schema", "regex"),
    ("unimplemented-keyword", strict(_prop({"type": "array", "uniqueItems": True})),
     SCHEMA_PARAM, "invalid_json_schema", "uniqueItems"),
    ("ref-to-nowhere", strict(_prop({"$ref": "#/$defs/nowhere"})), SCHEMA_PARAM,
     "invalid_json_schema", "nowhere"),
    ("no-finite-instance", strict(_prop({"$ref": "#"})), SCHEMA_PARAM,
     "invalid_json_schema", "no finite instance"),
    ("unsatisfiable", strict(_prop({"type": "string", "minLength": 5, "maxLength": 2})),
     SCHEMA_PARAM, "invalid_json_schema", "nsatisfiable"),
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("case", "fmt", "param", "code", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_format_is_400_naming_the_field(
    server: RunningServer,
    case: str,
    fmt: Any,
    param: str,
    code: str | None,
    fragment: str,
    stream: bool,
) -> None:
    reply = post(server, chat(response_format=fmt, stream=stream))
    assert_error(reply, param, code, fragment)


@pytest.mark.parametrize(
    "fmt", [{"type": "json_object"}, strict(PERSON, strict=True)], ids=["json_object", "schema"]
)
@pytest.mark.parametrize(
    "option", [{"ignore_eos": True}, {"min_tokens": 5}], ids=["ignore_eos", "min_tokens"]
)
def test_options_that_would_force_output_past_the_json_are_refused(
    server: RunningServer, fmt: dict[str, Any], option: dict[str, Any]
) -> None:
    (name,) = option
    assert_error(post(server, chat(response_format=fmt, **option)), name, None, name)


# -- many schemas over HTTP ---------------------------------------------------------------


def random_schema(rng: random.Random, depth: int = 0) -> Any:
    """A schema, valid or not: mostly what strict mode accepts, with mistakes and
    keywords llguidance cannot enforce mixed in."""
    roll = rng.random()
    if depth >= 3 or roll < 0.35:
        return rng.choice(
            [
                {"type": "string", "maxLength": rng.randint(0, 8)},
                {"type": "integer", "minimum": 0, "maximum": rng.randint(0, 99)},
                {"type": "boolean"},
                {"type": "null"},
                {"type": "string", "enum": ["a", "b", "c"][: rng.randint(1, 3)]},
                {"type": "string", "pattern": rng.choice(["^[a-z]{1,4}$", "([", "(?=a)"])},
                {"type": "string", "format": rng.choice(["date", "uuid", "uri", "bogus"])},
                {"type": "number", "multipleOf": rng.choice([0, 0.5])},
                {"$ref": rng.choice(["#/$defs/leaf", "#/$defs/missing", "#"])},
                {"type": "wat"},
                {},
            ]
        )
    if roll < 0.6:
        names = [f"k{i}" for i in range(rng.randint(0, 3))]
        node: dict[str, Any] = {
            "type": "object",
            "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": names if rng.random() < 0.8 else names[:1],
        }
        if rng.random() < 0.85:
            node["additionalProperties"] = False
        return node
    if roll < 0.8:
        node = {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": 2}
        if rng.random() < 0.1:
            node["uniqueItems"] = True
        return node
    branches = [random_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    return {rng.choice(["anyOf", "anyOf", "oneOf", "allOf"]): branches}


def test_two_hundred_generated_schemas_leave_the_server_serving(server: RunningServer) -> None:
    rng = random.Random(1234)
    cases = []
    for i in range(200):
        root = random_schema(rng, 1)
        schema = {
            "type": "object",
            "properties": {"v": root},
            "required": ["v"],
            "additionalProperties": False,
            "$defs": {"leaf": {"type": "string", "maxLength": 4}},
        }
        cases.append((schema, rng.random() < 0.5, i))

    def one(case: tuple[dict[str, Any], bool, int]) -> str:
        schema, is_strict, seed = case
        fmt = strict(schema, name=f"s{seed}", strict=is_strict)
        with httpx.Client(timeout=120) as http:
            reply = http.post(
                f"{server.base_url}/chat/completions",
                json=chat(response_format=fmt, max_tokens=24, seed=seed, temperature=1.0),
            )
        body = reply.json()
        if reply.status_code == 400:
            assert body["error"]["param"].startswith("response_format"), body
            return "refused"
        assert reply.status_code == 200, body
        choice = body["choices"][0]
        if choice["finish_reason"] == "stop":
            assert_matches(choice["message"]["content"], schema)
        else:
            assert choice["finish_reason"] == "length", choice
        return str(choice["finish_reason"])

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, cases))
    # The generator mixes both: some schemas are refused, some generate.
    assert 0 < outcomes.count("refused") < len(outcomes), outcomes
    assert server.process.poll() is None
    assert server.health()["status"] == "ok"
    text, finish = complete_http(server, max_tokens=8)
    assert finish in ("stop", "length") and text
    stats = server.wait_idle()
    assert stats["running"] == 0 and stats["in_flight"] == 0


# -- helpers ------------------------------------------------------------------------------


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": ASK, "max_tokens": 1, **fields}


def post(server: RunningServer, body: dict[str, Any]) -> httpx.Response:
    """POST a chat body; a 200 stream is not read (the test fails on its status)."""
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.base_url}/chat/completions", json=body) as reply,
    ):
        if not reply.headers.get("content-type", "").startswith("text/event-stream"):
            reply.read()
        return reply


def assert_error(reply: httpx.Response, param: str, code: str | None, fragment: str) -> None:
    assert reply.status_code == 400, (reply.status_code, reply.headers)
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers.get("x-request-id", "").startswith("req_")
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    assert error["code"] == code, error
    assert fragment in error["message"], error


def complete(client: openai.OpenAI, *, stream: bool = False, **args: Any) -> tuple[str, str]:
    """(content, finish_reason) of one choice, streamed or not."""
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=ASK, **args)
        choice = reply.choices[0]
        return choice.message.content or "", str(choice.finish_reason)
    text, finish = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, stream=True, **args):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def complete_http(server: RunningServer, **fields: Any) -> tuple[str, str]:
    reply = httpx.post(f"{server.base_url}/chat/completions", json=chat(**fields), timeout=60)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]
