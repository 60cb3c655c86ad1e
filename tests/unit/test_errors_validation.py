"""OpenAI error objects (spigot.errors), pydantic errors told as OpenAI does, request checks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from spigot.api.schemas import MAX_STOP_SEQUENCES, ChatCompletionRequest, CompletionRequest
from spigot.api.validation import validation_error
from spigot.errors import (
    AuthenticationFailed,
    ContextLengthExceeded,
    EngineFailure,
    InvalidRequest,
    ModelNotFoundError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    SpigotError,
)

# -- errors ----------------------------------------------------------------------

ERROR_CLASSES: list[tuple[type[SpigotError], int, str, str | None]] = [
    (SpigotError, 500, "server_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded"),
    (AuthenticationFailed, 401, "invalid_request_error", "invalid_api_key"),
    (PermissionDenied, 403, "permission_error", None),
    (NotFound, 404, "invalid_request_error", None),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (RateLimited, 429, "rate_limit_exceeded", "rate_limit_exceeded"),
    (Overloaded, 503, "server_error", "overloaded"),
    (EngineFailure, 500, "server_error", None),
]


@pytest.mark.parametrize(("cls", "status", "error_type", "code"), ERROR_CLASSES)
def test_status_type_and_default_code(
    cls: type[SpigotError], status: int, error_type: str, code: str | None
) -> None:
    err = cls("went wrong")
    assert err.status == status
    assert err.to_body() == {
        "error": {"message": "went wrong", "type": error_type, "param": None, "code": code}
    }


@pytest.mark.parametrize("cls", [c for c, *_ in ERROR_CLASSES])
def test_body_has_exactly_the_openai_keys(cls: type[SpigotError]) -> None:
    body = cls("m", param="p", code="c").to_body()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["param"], body["error"]["code"]) == ("p", "c")


def test_hierarchy() -> None:
    assert issubclass(ContextLengthExceeded, InvalidRequest)
    assert issubclass(ModelNotFoundError, NotFound)
    assert all(issubclass(c, SpigotError) for c, *_ in ERROR_CLASSES)
    assert str(InvalidRequest("shown")) == "shown"


@pytest.mark.parametrize(
    ("retry_after", "header"), [(None, None), (0.2, "1"), (1.0, "1"), (2.6, "3"), (30, "30")]
)
def test_retry_after_header(retry_after: float | None, header: str | None) -> None:
    err = Overloaded("busy", retry_after=retry_after)
    assert err.headers() == ({} if header is None else {"retry-after": header})


# -- pydantic errors as OpenAI errors ---------------------------------------------

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}


def invalid(model: type[BaseModel], body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": 2.5}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "top_p": -0.1}, "top_p"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "presence_penalty": 3}, "presence_penalty"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": "hi"}, "messages"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "bot"}]},
            "messages[1].role",
        ),
        ({**CHAT, "stop": 5}, "stop"),
        ({**CHAT, "stop": ["ok", 1]}, "stop"),
        ({**CHAT, "top_logprobs": 21}, "top_logprobs"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ],
)
def test_chat_validation_param(body: dict[str, Any], param: str) -> None:
    err = invalid(ChatCompletionRequest, body)
    assert err.param == param
    assert err.status == 400
    assert f"'{param}'" in err.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**COMPLETION, "prompt": 5}, "prompt"),
        ({**COMPLETION, "prompt": [[1, "a"]]}, "prompt"),
        ({**COMPLETION, "logprobs": 6}, "logprobs"),
        ({**COMPLETION, "stop": {"a": 1}}, "stop"),
        ({**COMPLETION, "best_of": 0}, "best_of"),
        ({**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ],
)
def test_completion_validation_param(body: dict[str, Any], param: str) -> None:
    assert invalid(CompletionRequest, body).param == param


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatCompletionRequest, {"messages": CHAT["messages"]}, "model"),
        (ChatCompletionRequest, {"model": "m"}, "messages"),
        (ChatCompletionRequest, {**CHAT, "messages": [{"content": "x"}]}, "messages[0].role"),
        (CompletionRequest, {"model": "m"}, "prompt"),
    ],
)
def test_missing_parameter(model: type[BaseModel], body: dict[str, Any], param: str) -> None:
    err = invalid(model, body)
    assert err.param == param
    assert err.message == f"Missing required parameter: '{param}'."


def test_invalid_value_message_shows_the_value() -> None:
    err = invalid(ChatCompletionRequest, {**CHAT, "temperature": 3})
    assert err.message.startswith("Invalid value for 'temperature': ")
    assert err.message.endswith("(got 3).")


def test_invalid_container_value_shows_only_its_type() -> None:
    err = invalid(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": 5}]})
    assert err.message.endswith("(got 5).")
    err = invalid(CompletionRequest, {**COMPLETION, "stop": {"secret": "value"}})
    assert err.message.endswith("(got dict).")
    assert "secret" not in err.message


def test_unknown_fields_are_accepted() -> None:
    ChatCompletionRequest.model_validate({**CHAT, "unknown_field": {"x": 1}}).check()
    CompletionRequest.model_validate({**COMPLETION, "unknown_field": 1}).check()


# -- request checks --------------------------------------------------------------


def check_fails(
    model: type[ChatCompletionRequest | CompletionRequest], body: dict[str, Any]
) -> str:
    request = model.model_validate(body)
    with pytest.raises(InvalidRequest) as info:
        request.check()
    assert info.value.status == 400
    assert info.value.param is not None
    return info.value.param


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream(
    model: type[ChatCompletionRequest | CompletionRequest], stream: bool | None
) -> None:
    base = CHAT if model is ChatCompletionRequest else COMPLETION
    body = {**base, "stream": stream, "stream_options": {"include_usage": True}}
    assert check_fails(model, body) == "stream_options"


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_stream_options_with_stream_is_fine(
    model: type[ChatCompletionRequest | CompletionRequest],
) -> None:
    base = CHAT if model is ChatCompletionRequest else COMPLETION
    request = model.model_validate(
        {**base, "stream": True, "stream_options": {"include_usage": True}}
    )
    request.check()
    assert request.include_usage


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_too_many_stop_strings(model: type[ChatCompletionRequest | CompletionRequest]) -> None:
    base = CHAT if model is ChatCompletionRequest else COMPLETION
    stops = [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]
    assert len(stops) == 5
    assert check_fails(model, {**base, "stop": stops}) == "stop"
    model.model_validate({**base, "stop": stops[:4]}).check()


def test_top_logprobs_without_logprobs() -> None:
    assert check_fails(ChatCompletionRequest, {**CHAT, "top_logprobs": 3}) == "top_logprobs"
    assert (
        check_fails(ChatCompletionRequest, {**CHAT, "top_logprobs": 3, "logprobs": False})
        == "top_logprobs"
    )
    ChatCompletionRequest.model_validate({**CHAT, "top_logprobs": 3, "logprobs": True}).check()


def test_best_of_with_stream() -> None:
    body = {**COMPLETION, "best_of": 2, "stream": True}
    request = CompletionRequest.model_validate(body)
    with pytest.raises(InvalidRequest, match="stream") as info:
        request.check()
    assert info.value.param == "best_of"


def test_best_of_other_than_n() -> None:
    assert check_fails(CompletionRequest, {**COMPLETION, "best_of": 3, "n": 2}) == "best_of"
    CompletionRequest.model_validate({**COMPLETION, "best_of": 2, "n": 2}).check()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**COMPLETION, "suffix": "tail"}, "suffix"),
        ({**COMPLETION, "echo": True, "logprobs": 1}, "logprobs"),
        ({**COMPLETION, "prompt": []}, "prompt"),
    ],
)
def test_other_completion_checks(body: dict[str, Any], param: str) -> None:
    assert check_fails(CompletionRequest, body) == param
