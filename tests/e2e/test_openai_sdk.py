"""The current openai SDK streams from spigot unchanged: sync, async and the stream helper."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What's 1+1? Answer in one word."}]


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
async def aclient(server: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    # Closed in the test's event loop: left to the garbage collector, its
    # connections outlive the loop (ResourceWarning: unclosed transport).
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0
    ) as client:
        yield client


def _validated(chunk: ChatCompletionChunk) -> ChatCompletionChunk:
    # Re-validate strictly from the wire dict: the SDK's own parsing is lenient.
    return ChatCompletionChunk.model_validate(chunk.model_dump(mode="json", exclude_unset=True))


def test_sync_stream_has_role_first_then_content_then_finish(client: openai.OpenAI) -> None:
    chunks = [
        _validated(c)
        for c in client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True
        )
    ]
    assert len(chunks) >= 3
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()


def test_streamed_text_equals_non_streamed(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    whole = client.chat.completions.create(**args)
    assert isinstance(whole, ChatCompletion)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens > 0


async def test_async_stream(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, stream=True
    )
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces).strip()


def test_stream_helper_final_completion(client: openai.OpenAI) -> None:
    # The helper refuses a reply cut by max_tokens, so leave room to finish.
    # (a prompt the model answers briefly under greedy decoding).
    short = [{"role": "user", "content": "What is 1+1? Answer in one word."}]
    with client.chat.completions.stream(
        model=MODEL, messages=short, temperature=0, max_tokens=200
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "".join(deltas)
    assert final.choices[0].finish_reason == "stop"


def test_include_usage_sends_one_usage_chunk_with_exact_counts(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=1
    )
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_no_usage_chunk_without_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_completions_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="def hello():", max_tokens=20, temperature=0, stream=True
        )
    )
    assert {c.object for c in chunks} == {"text_completion"}
    streamed = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(
        model=MODEL, prompt="def hello():", max_tokens=20, temperature=0
    )
    assert isinstance(whole, Completion)
    assert streamed == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_model_names_route_to_the_served_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=QUESTION, temperature=0, max_tokens=4
    )
    assert reply.model == MODEL
