"""/openapi.json that describes what the routes read and answer.

The routes take a raw ``Request`` (the body is read with a size cap and decoded off
the event loop, ``spigot.api.body``), so FastAPI cannot see their request models and
its generated schema has no request bodies. ``install_openapi`` adds them from the
same pydantic models the routes validate with, plus the OpenAI error body every 4xx
and 5xx carries, the bearer key, and the shapes of the success answers: enough for a
client generator, and for a fuzzer (``make reliability``) to build valid and invalid
requests and check every answer against the schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from spigot.api.admin import KeyCreate, KeyUpdate
from spigot.api.responses_api.wire import ResponsesRequest
from spigot.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"

# (method, path as FastAPI writes it) -> the body model that route validates with.
REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/completions"): CompletionRequest,
    ("post", "/v1/responses"): ResponsesRequest,
    ("post", "/tokenize"): TokenizeRequest,
    ("post", "/detokenize"): DetokenizeRequest,
    ("post", "/admin/keys"): KeyCreate,
    ("patch", "/admin/keys/{id_or_name}"): KeyUpdate,
}

# Routes that stream server-sent events when the body asks for ``"stream": true``.
STREAMING = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
# Routes that only ever answer with server-sent events (resuming a detached stream).
EVENTS_ONLY = {"/v1/streams/{stream_id}"}

# The routes no key is needed for.
PUBLIC = {"/health", "/openapi.json"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """An object with these required properties (others allowed: answers may grow)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
    }


STRING: dict[str, Any] = {"type": "string"}
INTEGER: dict[str, Any] = {"type": "integer"}
ARRAY: dict[str, Any] = {"type": "array"}
OBJECT: dict[str, Any] = {"type": "object"}

# The OpenAI error object: every 4xx and 5xx body, and a stream's in-band error event.
ERROR_SCHEMA = _obj(
    {
        "error": _obj(
            {
                "message": STRING,
                "type": STRING,
                "param": _nullable(STRING),
                "code": _nullable(STRING),
            }
        )
    }
)

# One server-sent event (OpenAPI before 3.2 has a stream's ``schema`` describe each event):
# ``data`` is a chunk's JSON, an error object, or ``[DONE]``; ``id`` is there when the
# stream is resumable (``--on-disconnect detach=SECONDS``).
EVENT_STREAM = {
    "schema": _obj(
        {"data": STRING},
        event=STRING,
        id=STRING,
        retry=INTEGER,
    ),
}

USAGE = _obj({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER})

# What the success answers are; each keeps to the fields a client relies on.
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ChatCompletion": _obj(
        {
            "id": STRING,
            "object": {"const": "chat.completion"},
            "created": INTEGER,
            "model": STRING,
            "choices": {
                "type": "array",
                "items": _obj(
                    {
                        "index": INTEGER,
                        "message": _obj(
                            {"role": {"const": "assistant"}, "content": _nullable(STRING)}
                        ),
                        "finish_reason": _nullable(STRING),
                    }
                ),
            },
            "usage": USAGE,
        }
    ),
    "Completion": _obj(
        {
            "id": STRING,
            "object": {"const": "text_completion"},
            "created": INTEGER,
            "model": STRING,
            "choices": {
                "type": "array",
                "items": _obj(
                    {"index": INTEGER, "text": STRING, "finish_reason": _nullable(STRING)}
                ),
            },
            "usage": USAGE,
        }
    ),
    "Response": _obj(
        {
            "id": STRING,
            "object": {"const": "response"},
            "created_at": INTEGER,
            "status": STRING,
            "model": STRING,
            "output": ARRAY,
        },
        usage=_nullable(OBJECT),
    ),
    "ResponseDeleted": _obj(
        {"id": STRING, "object": {"const": "response.deleted"}, "deleted": {"const": True}}
    ),
    "ResponseItemList": _obj({"object": {"const": "list"}, "data": ARRAY}),
    "Tokens": _obj(
        {"tokens": {"type": "array", "items": INTEGER}, "count": INTEGER, "max_model_len": INTEGER}
    ),
    "Detokenized": _obj({"prompt": STRING}),
    "Model": _obj(
        {"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING}
    ),
    "ModelList": _obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": REF.format(model="Model")}},
        }
    ),
    "ApiKey": _obj(
        {
            "object": {"const": "api_key"},
            "id": INTEGER,
            "name": STRING,
            "status": {"enum": ["active", "revoked", "expired"]},
            "admin": {"type": "boolean"},
        }
    ),
    "ApiKeyList": _obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": REF.format(model="ApiKey")}},
        }
    ),
    "Usage": _obj({"object": {"const": "usage"}, "data": ARRAY, "total": OBJECT}),
    "Health": _obj({"status": STRING, "models": OBJECT}),
    "Error": ERROR_SCHEMA,
}

# (method, path) -> the success answer's schema name (and status, where not 200).
RESPONSES: dict[tuple[str, str], tuple[int, str]] = {
    ("post", "/v1/chat/completions"): (200, "ChatCompletion"),
    ("post", "/v1/completions"): (200, "Completion"),
    ("post", "/v1/responses"): (200, "Response"),
    ("get", "/v1/responses/{response_id}"): (200, "Response"),
    ("delete", "/v1/responses/{response_id}"): (200, "ResponseDeleted"),
    ("get", "/v1/responses/{response_id}/input_items"): (200, "ResponseItemList"),
    ("post", "/tokenize"): (200, "Tokens"),
    ("post", "/detokenize"): (200, "Detokenized"),
    ("get", "/v1/models"): (200, "ModelList"),
    ("get", "/v1/models/{model_id}"): (200, "Model"),
    ("get", "/admin/keys"): (200, "ApiKeyList"),
    ("post", "/admin/keys"): (201, "ApiKey"),
    ("get", "/admin/keys/{id_or_name}"): (200, "ApiKey"),
    ("patch", "/admin/keys/{id_or_name}"): (200, "ApiKey"),
    ("delete", "/admin/keys/{id_or_name}"): (200, "ApiKey"),
    ("get", "/admin/usage"): (200, "Usage"),
    ("get", "/health"): (200, "Health"),
}

ERROR_RESPONSE = {
    "description": "An OpenAI error object; `param` names the field at fault.",
    "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def request_body_schemas() -> dict[str, Any]:
    """The request models and every model they use, as OpenAPI component schemas."""
    models = sorted(set(REQUEST_BODIES.values()), key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    defs: dict[str, Any] = top.get("$defs", {})
    clash = defs.keys() & RESPONSE_SCHEMAS.keys()
    assert not clash, f"request and response schemas share names: {sorted(clash)}"
    return defs


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with request bodies, answers, errors and the bearer key added."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    # FastAPI's own HTTPValidationError is never answered: bodies are validated by hand.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.update(request_body_schemas())
    schemas.update(RESPONSE_SCHEMAS)
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key; needed once a key exists (or with --require-auth).",
        }
    }
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict):
                continue
            _describe(method, path, operation)
    return schema


# Resuming a detached stream (--on-disconnect detach=SECONDS): the last event id seen.
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "Resume the stream this event id belongs to, after that event.",
    "schema": {"type": "string"},
}


def _describe(method: str, path: str, operation: dict[str, Any]) -> None:
    if path in STREAMING or path in EVENTS_ONLY:
        operation["parameters"] = [*operation.get("parameters", []), LAST_EVENT_ID]
    body = REQUEST_BODIES.get((method, path))
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body.__name__)}
    responses: dict[str, Any] = {}
    answer = RESPONSES.get((method, path))
    if answer is not None:
        status, name = answer
        content = _json(name)
        if path in STREAMING:
            content["text/event-stream"] = EVENT_STREAM
        responses[str(status)] = {"description": "Success", "content": content}
    elif path in EVENTS_ONLY:
        responses["200"] = {
            "description": "Success",
            "content": {"text/event-stream": EVENT_STREAM},
        }
    else:
        responses.update(operation.get("responses", {}))
        responses.pop("422", None)
    responses["4XX"] = ERROR_RESPONSE
    responses["5XX"] = ERROR_RESPONSE
    operation["responses"] = responses
    if path not in PUBLIC:
        # Optional: until a key exists (and without --require-auth) none is needed.
        operation["security"] = [{"bearer": []}, {}]


def install_openapi(app: FastAPI) -> None:
    """Serve ``build_openapi``'s schema at /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
