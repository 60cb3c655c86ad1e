"""/openapi.json describes the request bodies the routes read, and the error body they answer.

Served by the real app (``create_app``) in-process, with no model loaded: the schema
depends on the routes only. Schemathesis, which ``make reliability`` fuzzes with, must
see a body for every POST and PATCH.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import httpx
import pytest
import schemathesis
from starlette.testclient import TestClient

from spigot.api.app import create_app
from spigot.api.state import ServerState
from spigot.models import ModelRouter

BODIES = {
    ("post", "/v1/chat/completions"): "ChatCompletionRequest",
    ("post", "/v1/completions"): "CompletionRequest",
    ("post", "/tokenize"): "TokenizeRequest",
    ("post", "/detokenize"): "DetokenizeRequest",
    ("post", "/admin/keys"): "KeyCreate",
    ("patch", "/admin/keys/{id_or_name}"): "KeyUpdate",
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    app = create_app(ServerState(engines={}, router=ModelRouter([], {})))
    # Not as a context manager: the lifespan (engines, prep pool) is not needed.
    response = TestClient(app, base_url="http://127.0.0.1").get("/openapi.json")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_every_body_route_has_its_request_model(schema: dict[str, Any]) -> None:
    for (method, path), name in BODIES.items():
        operation = schema["paths"][path][method]
        body = operation["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])
    assert chat["properties"]["temperature"]["anyOf"][0] == {
        "maximum": 2.0,
        "minimum": 0.0,
        "type": "number",
    }
    # The admin bodies refuse unknown fields; the OpenAI ones accept them (and drop them).
    assert schema["components"]["schemas"]["KeyCreate"]["additionalProperties"] is False
    assert "additionalProperties" not in chat


def test_every_post_route_has_a_body(schema: dict[str, Any]) -> None:
    posts = [path for path, item in schema["paths"].items() if "post" in item]
    assert posts
    for path in posts:
        assert "requestBody" in schema["paths"][path]["post"], path


def test_errors_are_the_openai_error_object(schema: dict[str, Any]) -> None:
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    for item in schema["paths"].values():
        for operation in item.values():
            for status in ("4XX", "5XX"):
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/Error"}
            # Bodies are validated by hand: FastAPI's 422 is never answered.
            assert "422" not in operation["responses"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_streaming_routes_also_answer_events(schema: dict[str, Any]) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        # Before OpenAPI 3.2 an event stream's schema describes one event, as parsed.
        event = content["text/event-stream"]["schema"]
        assert event["type"] == "object" and event["required"] == ["data"]
        assert set(event["properties"]) == {"data", "event", "id", "retry"}
        headers = [p["name"] for p in schema["paths"][path]["post"]["parameters"]]
        assert headers == ["Last-Event-ID"]


def test_every_reference_resolves(schema: dict[str, Any]) -> None:
    names = set(schema["components"]["schemas"])
    for ref in refs(schema["paths"]) + refs(schema["components"]):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in names, ref


def test_schemathesis_sees_the_bodies(schema: dict[str, Any]) -> None:
    loaded = schemathesis.openapi.from_dict(schema)
    with_body = set()
    for result in loaded.get_all_operations():
        operation = result.ok()
        if len(operation.body) > 0:
            with_body.add((operation.method.lower(), operation.path))
    assert set(BODIES) <= with_body


def answer(status: int, media_type: str, body: bytes) -> schemathesis.Response:
    response = httpx.Response(
        status,
        headers={"content-type": media_type},
        content=body,
        request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"),
    )
    response._elapsed = datetime.timedelta(0)  # set by a transport; this one had none
    return schemathesis.Response.from_any(response)


def test_answers_are_checked_as_the_fuzzer_checks_them(schema: dict[str, Any]) -> None:
    chat = schemathesis.openapi.from_dict(schema)["/v1/chat/completions"]["POST"]
    stream = (
        b'id: abcdefghijklmnopqrstuvwx:0\ndata: {"id":"chatcmpl-1","choices":[]}\n\n'
        b'data: {"error":{"message":"m","type":"server_error","param":null,"code":null}}\n\n'
        b"data: [DONE]\n\n"
    )
    chat.validate_response(answer(200, "text/event-stream; charset=utf-8", stream))
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    chat.validate_response(answer(200, "application/json", json.dumps(completion).encode()))
    error = {"error": {"message": "m", "type": "invalid_request_error", "param": "n", "code": None}}
    chat.validate_response(answer(400, "application/json", json.dumps(error).encode()))
    del error["error"]["code"]
    with pytest.raises(AssertionError):
        chat.validate_response(answer(400, "application/json", json.dumps(error).encode()))
