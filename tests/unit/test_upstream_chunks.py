"""Upstream chunks -> GenOutputs (spigot.upstream.chunks), with every framing quirk."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spigot.engine.types import FinishReason, GenOutput, UsageSource
from spigot.sse_parser import SSEParser
from spigot.upstream.chunks import (
    ChoiceAssembler,
    MalformedEvent,
    UpstreamEventError,
    error_from_response,
    finish_reason,
)


def chat_chunk(
    content: str | None = None,
    *,
    role: bool = False,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    chunk: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if choices
        else [],
        **extra,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def frames(chunks: list[dict[str, Any]], *, nl: str = "\n", done: bool = True) -> bytes:
    out = "".join(f"data: {orjson.dumps(c).decode()}{nl}{nl}" for c in chunks)
    return (out + (f"data: [DONE]{nl}{nl}" if done else "")).encode()


def run(raw: bytes, *, chat: bool = True, splits: list[int] | None = None) -> Any:
    """Parse and assemble like the engine does; (outputs, final, assembler)."""
    parser = SSEParser()
    assembler = ChoiceAssembler(0, chat=chat)
    outputs: list[GenOutput] = []
    cuts = [0, *(splits or []), len(raw)]
    payloads: list[str] = []
    for a, b in itertools.pairwise(cuts):
        payloads += parser.feed(raw[a:b])
    payloads += parser.close()
    for payload in payloads:
        output = assembler.feed(payload)
        if output is not None:
            outputs.append(output)
    return outputs, assembler.take_final(), assembler


STANDARD = [
    chat_chunk("", role=True),
    chat_chunk("Hel"),
    chat_chunk("lo"),
    chat_chunk(finish="stop"),
    chat_chunk(choices=False, usage=USAGE),
]


def check_standard(outputs: list[GenOutput], final: GenOutput | None, asm: Any) -> None:
    assert [o.text for o in outputs] == ["Hel", "lo"]
    assert all(o.finish_reason is None for o in outputs)
    assert final is not None and final.finish_reason is FinishReason.STOP and final.text == ""
    assert asm.usage is not None and asm.usage.prompt_tokens == 7
    assert asm.usage.completion_tokens == 2 and asm.usage.source is UsageSource.UPSTREAM
    assert asm.text == "Hello" and asm.content_events == 2


def test_a_standard_stream() -> None:
    check_standard(*run(frames(STANDARD)))


def test_usage_after_the_finish_completes_the_stream() -> None:
    _, _, asm = run(frames(STANDARD, done=False))
    assert asm.complete


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_split_of_the_bytes(data: st.DataObject) -> None:
    raw = frames(STANDARD, nl=data.draw(st.sampled_from(["\n", "\r\n"])))
    splits = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=8)))
    check_standard(*run(raw, splits=splits))


def test_role_in_every_delta() -> None:
    chunks = [chat_chunk("", role=True), chat_chunk("Hel", role=True), chat_chunk("lo", role=True)]
    chunks += [chat_chunk(finish="stop", role=True), chat_chunk(choices=False, usage=USAGE)]
    check_standard(*run(frames(chunks)))


def test_usage_on_every_chunk_takes_the_last() -> None:
    chunks = [
        chat_chunk("", role=True, usage={**USAGE, "completion_tokens": 0}),
        chat_chunk("Hel", usage={**USAGE, "completion_tokens": 1}),
        chat_chunk("lo", usage={**USAGE, "completion_tokens": 2}),
        chat_chunk(finish="stop", usage=USAGE),
    ]
    outputs, final, asm = run(frames(chunks))
    check_standard(outputs, final, asm)
    assert not asm.complete  # the usage came with the choices: [DONE] ends it


def test_usage_in_the_finishing_chunk() -> None:
    chunks = [
        chat_chunk("Hel", role=True),
        chat_chunk("lo"),
        chat_chunk(finish="stop", usage=USAGE),
    ]
    check_standard(*run(frames(chunks)))


def test_comment_pings_and_event_fields_are_skipped() -> None:
    raw = b": ping\n\n" + b"".join(
        b"event: completion\n: ping\n" + event + b"\n\n"
        for event in frames(STANDARD).split(b"\n\n")
        if event
    )
    check_standard(*run(raw))


def test_missing_done_at_eof() -> None:
    check_standard(*run(frames(STANDARD, done=False)))


def test_an_error_object_event() -> None:
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}}
    with pytest.raises(UpstreamEventError) as caught:
        run(frames([error]))
    assert str(caught.value) == "boom" and caught.value.body == error
    assert caught.value.status == 500


def test_vllm_error_shape_and_llama_code() -> None:
    vllm = {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}
    with pytest.raises(UpstreamEventError) as caught:
        run(frames([vllm]))
    assert caught.value.body == {
        "error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}
    }
    assert caught.value.status == 400


def test_garbage_event() -> None:
    with pytest.raises(MalformedEvent):
        run(b"data: {not json\n\n")
    with pytest.raises(MalformedEvent):
        run(b"data: [1, 2]\n\n")


def test_extras_go_where_they_came_from_and_only_on_outputs_that_carry_them() -> None:
    chunks = [
        chat_chunk("", role=True, system_fingerprint="fp"),
        {
            **chat_chunk("Hi", system_fingerprint="fp", service_tier=None),
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "Hi", "reasoning_content": "think", "refusal": None},
                    "finish_reason": None,
                    "stop_reason": None,
                }
            ],
        },
        chat_chunk(finish="stop", system_fingerprint="fp"),
    ]
    outputs, final, _ = run(frames(chunks))
    (hi,) = outputs
    assert hi.chunk_extra == {"system_fingerprint": "fp"}
    assert hi.delta_extra == {"reasoning_content": "think"}
    assert final is not None and final.delta_extra is None


def test_a_reasoning_only_delta_is_an_output() -> None:
    chunk = chat_chunk()
    chunk["choices"][0]["delta"] = {"reasoning_content": "hmm"}
    outputs, _, asm = run(frames([chunk]))
    assert outputs[0].text == "" and outputs[0].delta_extra == {"reasoning_content": "hmm"}
    assert asm.content_events == 0


def test_completions_chunks_logprobs_and_choice_extras() -> None:
    chunk = {
        "id": "x",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "ab",
                "logprobs": {
                    "tokens": ["a", "b"],
                    "token_logprobs": [-0.1, -0.2],
                    "top_logprobs": [{"z": -3.0, "a": -0.1}, None],
                    "text_offset": [0, 1],
                },
                "finish_reason": None,
                "stop_reason": None,
                "prompt_logprobs": None,
                "token_ids": [1, 2],
            }
        ],
    }
    end = {"id": "x", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    outputs, final, _ = run(frames([chunk, end]), chat=False)
    (out,) = outputs
    assert out.text == "ab" and out.delta_extra == {"token_ids": [1, 2]}
    assert [(lp.token, lp.token_bytes, lp.logprob) for lp in out.logprobs] == [
        ("a", b"a", -0.1),
        ("b", b"b", -0.2),
    ]
    assert out.logprobs[0].top == (("a", b"a", -0.1), ("z", b"z", -3.0))
    assert out.logprobs[1].top == ()
    assert final is not None and final.finish_reason is FinishReason.LENGTH


def test_chat_logprobs() -> None:
    chunk = chat_chunk("é")
    chunk["choices"][0]["logprobs"] = {
        "content": [
            {
                "token": "é",
                "logprob": -0.5,
                "bytes": [195, 169],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                    {"token": "e", "logprob": -1.5, "bytes": None},
                ],
            }
        ]
    }
    (out,), _, _ = run(frames([chunk]))
    (lp,) = out.logprobs
    assert (lp.token, lp.token_bytes, lp.logprob) == ("é", "é".encode(), -0.5)
    assert lp.top == (("é", "é".encode(), -0.5), ("e", b"e", -1.5))


def test_text_in_the_finishing_chunk_is_held_with_it() -> None:
    outputs, final, _ = run(frames([chat_chunk("all", finish="length")]))
    assert outputs == []
    assert final is not None and final.text == "all" and final.finish_reason is FinishReason.LENGTH


def test_nothing_after_the_finish_but_usage() -> None:
    chunks = [
        chat_chunk("a", finish="stop"),
        chat_chunk("late"),
        chat_chunk(choices=False, usage=USAGE),
    ]
    outputs, final, asm = run(frames(chunks))
    assert outputs == [] and final is not None and final.text == "a"
    assert asm.usage is not None and asm.complete and asm.text == "a"


def test_finish_reasons() -> None:
    assert finish_reason("stop") is FinishReason.STOP
    assert finish_reason("length") is FinishReason.LENGTH
    assert finish_reason("content_filter") is FinishReason.CONTENT_FILTER
    assert finish_reason("tool_calls") is FinishReason.TOOL_CALLS
    assert finish_reason("eos") is FinishReason.STOP
    assert finish_reason(None) is None


def test_cached_tokens_are_read() -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 5}}
    _, _, asm = run(
        frames([chat_chunk("a", finish="stop"), chat_chunk(choices=False, usage=usage)])
    )
    assert asm.usage.cached_tokens == 5


def test_http_error_bodies() -> None:
    openai = {"error": {"message": "m", "type": "invalid_request_error", "param": "x", "code": "c"}}
    assert error_from_response(400, orjson.dumps(openai)) == openai
    assert error_from_response(502, b"<html>Bad gateway</html>") == {
        "error": {
            "message": "<html>Bad gateway</html>",
            "type": "upstream_error",
            "param": None,
            "code": None,
        }
    }
    assert error_from_response(422, b'{"detail": "nope"}')["error"]["message"] == "nope"
    assert error_from_response(500, b"")["error"]["message"] == "The upstream server answered 500."
