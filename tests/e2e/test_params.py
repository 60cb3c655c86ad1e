"""Sampling and output parameters, on the real model, streamed and not."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def stream_events(url: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", url, json={**payload, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(orjson.loads(line[6:]))
    return events


def chat(server: RunningServer, **payload: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": STORY, **payload},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream_text(server: RunningServer, **payload: Any) -> tuple[str, str | None]:
    events = stream_events(
        f"{server.base_url}/chat/completions", {"model": MODEL, "messages": STORY, **payload}
    )
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    return text, reasons[-1]


def test_max_tokens_cuts_with_length(server: RunningServer) -> None:
    body = chat(server, temperature=0, max_tokens=7, ignore_eos=True)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7
    body = chat(server, temperature=0, max_completion_tokens=5, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 5


def test_stop_strings_cut_at_many_positions_and_never_leak(server: RunningServer) -> None:
    full = chat(server, temperature=0, max_tokens=80, ignore_eos=True)["choices"][0]["message"][
        "content"
    ]
    assert len(full) > 120
    positions = list(range(3, min(len(full) - 6, 150), 11))
    for at in positions:
        for width in (1, 4):
            stop = full[at : at + width]
            if not stop.strip():
                continue
            expected = full[: full.index(stop)]
            text, reason = chat_stream_text(
                server, temperature=0, max_tokens=80, ignore_eos=True, stop=[stop, "\x00never"]
            )
            assert text == expected, (at, stop)
            assert reason == "stop"
            assert stop not in text


def test_seed_reproducible_and_distinct(server: RunningServer) -> None:
    def sample(seed: int) -> str:
        return chat(server, temperature=1.0, seed=seed, max_tokens=24, ignore_eos=True)["choices"][
            0
        ]["message"]["content"]

    a, b, c = sample(1234), sample(1234), sample(999)
    assert a == b
    assert a != c
    streamed, _ = chat_stream_text(
        server, temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True
    )
    assert streamed == a


def test_n_choices_stream_each_with_own_role_and_finish(server: RunningServer) -> None:
    events = stream_events(
        f"{server.base_url}/chat/completions",
        {
            "model": MODEL,
            "messages": STORY,
            "n": 3,
            "temperature": 1.0,
            "seed": 7,
            "max_tokens": 12,
            "stream_options": {"include_usage": True},
        },
    )
    choice_events = [e for e in events if e["choices"]]
    first_seen: list[int] = []
    for e in choice_events:
        (choice,) = e["choices"]
        if choice["index"] not in first_seen:
            first_seen.append(choice["index"])
            assert choice["delta"] == {"role": "assistant", "content": ""}
        else:
            assert "role" not in choice["delta"]
    assert first_seen == [0, 1, 2]
    finishes = [e["choices"][0]["index"] for e in choice_events if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    texts = [
        "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in choice_events
            if e["choices"][0]["index"] == i
        )
        for i in range(3)
    ]
    assert len(set(texts)) > 1  # each choice is its own sequence
    usage_events = [e for e in events if not e["choices"]]
    assert len(usage_events) == 1
    assert usage_events[0]["usage"]["completion_tokens"] <= 36


def test_chat_logprobs_shape(server: RunningServer) -> None:
    body = chat(server, temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        assert set(entry) >= {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0.0
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert len(entry["top_logprobs"]) == 3
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(top[0], abs=1e-4)
    events = stream_events(
        f"{server.base_url}/chat/completions",
        {
            "model": MODEL,
            "messages": STORY,
            "temperature": 0,
            "max_tokens": 6,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    streamed = [
        item
        for e in events
        if e["choices"] and e["choices"][0]["logprobs"]
        for item in e["choices"][0]["logprobs"]["content"]
    ]
    assert [s["token"] for s in streamed] == [c["token"] for c in content]


def test_completions_logprobs_echo_token_prompts_and_multiple_prompts(
    server: RunningServer,
) -> None:
    url = f"{server.base_url}/completions"
    r = httpx.post(
        url,
        json={
            "model": MODEL,
            "prompt": "The capital of France is",
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": 2,
        },
        timeout=60,
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    assert lp["text_offset"] == sorted(lp["text_offset"])

    echoed = httpx.post(
        url,
        json={
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 5,
            "temperature": 0,
            "echo": True,
        },
        timeout=60,
    ).json()
    assert echoed["choices"][0]["text"].startswith("Once upon a time")
    events = stream_events(
        url,
        {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 5,
            "temperature": 0,
            "echo": True,
        },
    )
    assert events[0]["choices"][0]["text"] == "Once upon a time"
    assert "".join(e["choices"][0]["text"] for e in events) == echoed["choices"][0]["text"]

    # Token ids as the prompt: the same ids as the text gives the same completion.
    by_text = httpx.post(
        url,
        json={"model": MODEL, "prompt": "Hello, my name is", "max_tokens": 6, "temperature": 0},
        timeout=60,
    ).json()
    ids = by_text["usage"]["prompt_tokens"]
    assert ids > 0
    multi = httpx.post(
        url,
        json={
            "model": MODEL,
            "prompt": ["Hello, my name is", "The sky is"],
            "max_tokens": 6,
            "temperature": 0,
        },
        timeout=60,
    ).json()
    assert [c["index"] for c in multi["choices"]] == [0, 1]
    assert multi["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert multi["usage"]["prompt_tokens"] > by_text["usage"]["prompt_tokens"]


def test_token_id_prompt(server: RunningServer) -> None:
    url = f"{server.base_url}/completions"
    echo_ids = httpx.post(
        url,
        json={
            "model": MODEL,
            "prompt": [504, 3458, 314],
            "max_tokens": 4,
            "temperature": 0,
            "echo": True,
        },
        timeout=60,
    ).json()
    assert echo_ids["usage"]["prompt_tokens"] == 3
    text_prompt = echo_ids["choices"][0]["text"]
    assert text_prompt


def tokenize(server: RunningServer, text: str) -> list[int]:
    r = httpx.post(f"{server.root_url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_tokenize_round_trip(server: RunningServer) -> None:
    ids = tokenize(server, "Hello, world")
    r = httpx.post(
        f"{server.root_url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=30
    )
    assert r.json()["prompt"] == "Hello, world"


def test_logit_bias_bans_and_forces_tokens(server: RunningServer) -> None:
    first = chat(server, temperature=0, max_tokens=1, logprobs=True)["choices"][0]["message"][
        "content"
    ]
    (first_id,) = tokenize(server, first)
    banned = chat(server, temperature=0, max_tokens=1, logit_bias={str(first_id): -100})
    assert banned["choices"][0]["message"]["content"] != first
    (forced_id,) = tokenize(server, " banana")
    forced = chat(server, temperature=0, max_tokens=3, logit_bias={str(forced_id): 100})
    assert forced["choices"][0]["message"]["content"] == " banana" * 3


def test_penalties_change_greedy_output(server: RunningServer) -> None:
    plain = chat(server, temperature=0, max_tokens=40, ignore_eos=True)["choices"][0]["message"][
        "content"
    ]
    penalised = chat(
        server,
        temperature=0,
        max_tokens=40,
        ignore_eos=True,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )["choices"][0]["message"]["content"]
    assert penalised != plain


def test_min_tokens_holds_back_end_of_turn(server: RunningServer) -> None:
    short = [{"role": "user", "content": "What is 1+1? Answer in one word."}]
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": short, "temperature": 0, "max_tokens": 200},
        timeout=60,
    ).json()
    natural = r["usage"]["completion_tokens"]
    assert r["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json={
            "model": MODEL,
            "messages": short,
            "temperature": 0,
            "max_tokens": 200,
            "min_tokens": natural + 10,
        },
        timeout=60,
    ).json()
    assert r["usage"]["completion_tokens"] >= natural + 10
