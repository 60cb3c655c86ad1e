"""Client mistakes get OpenAI-shaped 4xx errors, never a 200 stream or a 5xx.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with all
four keys, carries an ``x-request-id`` header, and names the offending field in
``param``. Requests that should fail are sent with a one-token cap and read
without consuming a stream, so a server that wrongly accepts one fails the
test quickly instead of generating.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.server import RunningServer, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
CHAT = "/chat/completions"
COMPLETIONS = "/completions"
MESSAGES = [{"role": "user", "content": "Say hi."}]
# Far more than the shared server's 8192-token context, whatever the tokenizer.
LONG_TEXT = "hello " * 9000


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return httpx.Response(self.status, content=self.body).json()


def post(
    base_url: str,
    path: str,
    *,
    json_body: Any = None,
    content: bytes | None = None,
    timeout: float = 60.0,
) -> Reply:
    """POST and return status, headers and body; a 200 event stream is not read."""
    kwargs: dict[str, Any] = {"headers": {"content-type": "application/json"}}
    if content is not None:
        kwargs["content"] = content
    else:
        kwargs["json"] = json_body
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("POST", base_url + path, **kwargs) as response,
    ):
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return Reply(response.status_code, response.headers, b"")
        return Reply(response.status_code, response.headers, response.read())


def assert_openai_error(
    reply: Reply,
    status: int,
    *,
    param: str | None,
    code: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers.get("x-request-id", "").startswith("req_"), dict(reply.headers)
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == error_type, error
    assert error["param"] == param, error
    assert error["code"] == code, error
    return error


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **fields}


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "def hello():", "max_tokens": 1, **fields}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


# -- bodies that are not a request at all ---------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_malformed_json_is_400_without_param(server: RunningServer, path: str) -> None:
    reply = post(server.base_url, path, content=b'{"model": "x", "messages": [')
    error = assert_openai_error(reply, 400, param=None)
    assert "JSON" in error["message"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("content", [b"[1, 2]", b"null", b'"text"'])
def test_non_object_json_body_is_400(server: RunningServer, path: str, content: bytes) -> None:
    assert_openai_error(post(server.base_url, path, content=content), 400, param=None)


# -- chat: one bad field each, streamed and not ----------------------------------

CHAT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing-messages", without(chat_body(), "messages"), "messages"),
    ("missing-model", without(chat_body(), "model"), "model"),
    ("empty-messages", chat_body(messages=[]), "messages"),
    ("messages-not-a-list", chat_body(messages="hi"), "messages"),
    ("bad-role", chat_body(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("temperature-2.5", chat_body(temperature=2.5), "temperature"),
    ("temperature-negative", chat_body(temperature=-1), "temperature"),
    ("temperature-not-a-number", chat_body(temperature="hot"), "temperature"),
    ("top_p-1.5", chat_body(top_p=1.5), "top_p"),
    ("n-0", chat_body(n=0), "n"),
    ("presence_penalty-3", chat_body(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty--3", chat_body(frequency_penalty=-3), "frequency_penalty"),
    ("max_tokens-0", chat_body(max_tokens=0), "max_tokens"),
    ("top_logprobs-21", chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top_logprobs-without-logprobs", chat_body(top_logprobs=2), "top_logprobs"),
    ("five-stop-strings", chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("logit_bias-non-integer-key", chat_body(logit_bias={"abc": 1}), "logit_bias"),
    ("logit_bias-token-out-of-range", chat_body(logit_bias={"99999999": 1}), "logit_bias"),
    ("logit_bias-negative-token", chat_body(logit_bias={"-5": 1}), "logit_bias"),
    ("temperature-as-string", chat_body(temperature="0.5"), "temperature"),
    ("stream-as-string", chat_body(stream="yes"), "stream"),
    ("user-message-without-content", chat_body(messages=[{"role": "user"}]), "messages[0]"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("body", "param"), [pytest.param(b, p, id=i) for i, b, p in CHAT_CASES])
def test_chat_invalid_field_is_400_naming_it(
    server: RunningServer, body: dict[str, Any], param: str, stream: bool
) -> None:
    reply = post(server.base_url, CHAT, json_body={"stream": stream, **body})
    assert_openai_error(reply, 400, param=param)


def test_chat_stream_options_without_stream_is_400(server: RunningServer) -> None:
    body = chat_body(stream_options={"include_usage": True})
    assert_openai_error(post(server.base_url, CHAT, json_body=body), 400, param="stream_options")
    body["stream"] = False
    assert_openai_error(post(server.base_url, CHAT, json_body=body), 400, param="stream_options")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_unknown_model_is_404_model_not_found(server: RunningServer, stream: bool) -> None:
    reply = post(server.base_url, CHAT, json_body=chat_body(model="nope-7b", stream=stream))
    error = assert_openai_error(reply, 404, param="model", code="model_not_found")
    assert "nope-7b" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_prompt_longer_than_context_is_400(server: RunningServer, stream: bool) -> None:
    body = without(chat_body(messages=[{"role": "user", "content": LONG_TEXT}]), "max_tokens")
    reply = post(server.base_url, CHAT, json_body={**body, "stream": stream})
    error = assert_openai_error(reply, 400, param="messages", code="context_length_exceeded")
    assert "8192" in error["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_beyond_context_is_400(server: RunningServer, field: str) -> None:
    body = {**without(chat_body(), "max_tokens"), field: 100_000, "stream": True}
    reply = post(server.base_url, CHAT, json_body=body)
    assert_openai_error(reply, 400, param="messages", code="context_length_exceeded")


# -- legacy completions ------------------------------------------------------------

COMPLETION_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing-prompt", without(completion_body(), "prompt"), "prompt"),
    ("missing-model", without(completion_body(), "model"), "model"),
    ("temperature-2.5", completion_body(temperature=2.5), "temperature"),
    ("temperature-negative", completion_body(temperature=-1), "temperature"),
    ("top_p-1.5", completion_body(top_p=1.5), "top_p"),
    ("n-0", completion_body(n=0), "n"),
    ("presence_penalty-3", completion_body(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty--3", completion_body(frequency_penalty=-3), "frequency_penalty"),
    ("five-stop-strings", completion_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("logprobs-6", completion_body(logprobs=6), "logprobs"),
    ("logit_bias-non-integer-key", completion_body(logit_bias={"abc": 1}), "logit_bias"),
    ("logit_bias-token-out-of-range", completion_body(logit_bias={"99999999": 1}), "logit_bias"),
    ("token-prompt-out-of-range", completion_body(prompt=[1, 2, 99999999]), "prompt"),
    ("token-prompt-negative", completion_body(prompt=[-1]), "prompt"),
    ("empty-prompt-list", completion_body(prompt=[]), "prompt"),
    ("empty-token-prompt", completion_body(prompt=[[]]), "prompt"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("body", "param"), [pytest.param(b, p, id=i) for i, b, p in COMPLETION_CASES]
)
def test_completion_invalid_field_is_400_naming_it(
    server: RunningServer, body: dict[str, Any], param: str, stream: bool
) -> None:
    reply = post(server.base_url, COMPLETIONS, json_body={**body, "stream": stream})
    assert_openai_error(reply, 400, param=param)


def test_completion_best_of_with_stream_is_400(server: RunningServer) -> None:
    body = completion_body(best_of=2, stream=True)
    assert_openai_error(post(server.base_url, COMPLETIONS, json_body=body), 400, param="best_of")


def test_completion_stream_options_without_stream_is_400(server: RunningServer) -> None:
    body = completion_body(stream_options={"include_usage": True})
    reply = post(server.base_url, COMPLETIONS, json_body=body)
    assert_openai_error(reply, 400, param="stream_options")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completion_unknown_model_is_404(server: RunningServer, stream: bool) -> None:
    body = completion_body(model="nope-7b", stream=stream)
    reply = post(server.base_url, COMPLETIONS, json_body=body)
    assert_openai_error(reply, 404, param="model", code="model_not_found")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completion_prompt_longer_than_context_is_400(server: RunningServer, stream: bool) -> None:
    body = completion_body(prompt=LONG_TEXT, stream=stream)
    reply = post(server.base_url, COMPLETIONS, json_body=body)
    assert_openai_error(reply, 400, param="prompt", code="context_length_exceeded")


def test_completion_max_tokens_beyond_context_is_400(server: RunningServer) -> None:
    body = completion_body(max_tokens=100_000, stream=True)
    reply = post(server.base_url, COMPLETIONS, json_body=body)
    assert_openai_error(reply, 400, param="prompt", code="context_length_exceeded")


@pytest.mark.parametrize("prompt", ["", [""]], ids=["string", "list"])
def test_completion_empty_string_prompt_is_not_a_server_error(
    server: RunningServer, prompt: str | list[str]
) -> None:
    # OpenAI completes an empty prompt; rejecting it with a 400 is fine too.
    # A 5xx is not: the SDKs retry it, and the failing engine step also fails
    # every sequence still waiting in the queue.
    body = completion_body(prompt=prompt, max_tokens=2)
    reply = post(server.base_url, COMPLETIONS, json_body=body)
    if reply.status != 200:
        assert_openai_error(reply, 400, param="prompt")
    else:
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def _empty_prompt_beside(server: RunningServer, other_prompt: str) -> Reply:
    """An empty-prompt completion sent while another client's stream is generating."""
    other = completion_body(
        prompt=other_prompt, max_tokens=300, ignore_eos=True, temperature=0, stream=True
    )
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", server.base_url + COMPLETIONS, json=other) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert all(line.startswith('data: {"id"') for line in seen if line), seen
        body = completion_body(prompt="", max_tokens=4, temperature=0, logprobs=1)
        return post(server.base_url, COMPLETIONS, json_body=body)


def test_empty_prompt_result_does_not_depend_on_other_clients(server: RunningServer) -> None:
    a = _empty_prompt_beside(server, "Count: one, two, three, four, five, six, seven")
    b = _empty_prompt_beside(server, "List French cities: Paris, Lyon, Marseille, Nice")
    assert a.status == b.status
    if a.status != 200:
        assert_openai_error(a, 400, param="prompt")
        return
    # Greedy, so the same request must give the same text and logprobs.
    assert a.json()["choices"] == b.json()["choices"]


# -- what is accepted --------------------------------------------------------------


def test_unknown_fields_are_ignored(server: RunningServer) -> None:
    body = chat_body(foo=1, bar={"nested": [1, 2]}, max_tokens=2)
    reply = post(server.base_url, CHAT, json_body=body)
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["object"] == "chat.completion"
    body = completion_body(foo=1, max_tokens=2)
    reply = post(server.base_url, COMPLETIONS, json_body=body)
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["object"] == "text_completion"


# -- models and routes --------------------------------------------------------------


def test_list_models_shape(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/models", timeout=10)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    (card,) = body["data"]
    assert card["object"] == "model"
    assert isinstance(card["created"], int) and card["created"] > 0
    assert isinstance(card["owned_by"], str) and card["owned_by"]


def test_get_model_shape(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/models/{MODEL}", timeout=10)
    assert response.status_code == 200
    card = response.json()
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert {"created", "owned_by"} <= set(card)


def test_get_routed_openai_name_describes_the_served_model(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/models/gpt-3.5-turbo", timeout=10)
    assert response.status_code == 200
    assert response.json()["id"] == MODEL


def test_get_unknown_model_is_404(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/models/nope", timeout=10)
    reply = Reply(response.status_code, response.headers, response.content)
    assert_openai_error(reply, 404, param="model", code="model_not_found")


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v1/chat/complete"])
def test_unknown_url_is_404_json(server: RunningServer, path: str) -> None:
    response = httpx.post(f"{server.root_url}{path}", json={}, timeout=10)
    reply = Reply(response.status_code, response.headers, response.content)
    error = assert_openai_error(reply, 404, param=None)
    assert path in error["message"]


def test_wrong_method_is_4xx_json(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/chat/completions", timeout=10)
    reply = Reply(response.status_code, response.headers, response.content)
    assert_openai_error(reply, 405, param=None)


# -- the same errors through the openai SDK -----------------------------------------


@pytest.fixture
def sdk(server: RunningServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-e2e", max_retries=0, timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_sdk_raises_bad_request_for_bad_temperature(sdk: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "hi"}],
            temperature=2.5,
            max_tokens=1,
            stream=stream,
        )
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert info.value.type == "invalid_request_error"
    assert (info.value.request_id or "").startswith("req_")


def test_sdk_raises_not_found_for_unknown_model(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(
            model="nope-7b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_sdk_raises_bad_request_for_context_length(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="code-davinci-002", prompt=LONG_TEXT, stream=True)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "prompt"


def test_sdk_raises_bad_request_for_best_of_with_stream(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(
            model="code-davinci-002", prompt="x", best_of=2, max_tokens=1, stream=True
        )
    assert info.value.param == "best_of"


def test_sdk_models(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nope")


# -- a full queue -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[RunningServer]:
    """One sequence at a time and no queue: a second request is turned away."""
    srv = start_server("--parallel", "1", "--max-queue", "0")
    try:
        yield srv
    finally:
        srv.stop()


LONG_STREAM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from one to one thousand."}],
    # Far longer than the test needs: it is aborted when the client leaves.
    "max_tokens": 2000,
    "ignore_eos": True,
    "stream": True,
}


def test_full_queue_is_503_with_retry_after_then_recovers(tiny_server: RunningServer) -> None:
    url = tiny_server.base_url
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", url + CHAT, json=LONG_STREAM) as first,
    ):
        assert first.status_code == 200
        lines = first.iter_lines()
        # The role chunk is sent at once; wait for generated content so the
        # sequence surely holds the only slot.
        seen = [next(lines) for _ in range(6)]
        assert any('"content":"' in line for line in seen[2:]), seen

        for path, body in [
            (CHAT, chat_body(stream=True)),
            (CHAT, chat_body()),
            (COMPLETIONS, completion_body(stream=True)),
        ]:
            reply = post(url, path, json_body=body)
            assert_openai_error(
                reply, 503, param=None, code="overloaded", error_type="server_error"
            )
            retry_after = reply.headers.get("retry-after")
            assert retry_after is not None and int(retry_after) >= 1

        with (
            openai.OpenAI(base_url=url, api_key="sk-e2e", max_retries=0, timeout=60) as sdk,
            pytest.raises(openai.InternalServerError) as info,
        ):
            sdk.chat.completions.create(
                model="gpt-3.5-turbo",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=1,
                stream=True,
            )
        assert info.value.status_code == 503

        # Turning others away did not disturb the running stream.
        more = [line for line in (next(lines) for _ in range(6)) if line]
        assert all(line.startswith('data: {"id"') for line in more), more
    # Leaving the stream closed the connection: the server aborts the sequence
    # and frees its slot.

    stats = tiny_server.wait_idle(timeout=30)
    assert stats["running"] == 0 and stats["in_flight"] == 0, stats
    reply = post(url, CHAT, json_body=chat_body(max_tokens=2))
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
