"""Guardrails end to end: the real model, a real server with ``--guard``, real clients.

The phrases the guard acts on are taken from what the model actually says:
a greedy reply is generated first by the shared server (no guard), then a
guarded server is started with rules that match words of that reply, and the
same request must come back cut or redacted exactly there, with nothing of
the span in any chunk.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from openai import OpenAI

from spigot.guard import Policy, guard_stream
from tests.e2e.server import ROOT, RunningServer, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a fox who finds a lost key in the forest."
OTHER_PROMPT = "List three colours."
MAX_TOKENS = 80


def chat(base_url: str, prompt: str, *, stream: bool, n: int = 1, **extra: object) -> dict:
    """A greedy chat request; streamed ones are returned as their list of chunks."""
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "n": n,
        "stream": stream,
        **extra,
    }
    if not stream:
        r = httpx.post(f"{base_url}/chat/completions", json=payload, timeout=120)
        return {"status": r.status_code, "body": r.json()}
    payload["stream_options"] = {"include_usage": True}
    chunks = []
    with httpx.stream("POST", f"{base_url}/chat/completions", json=payload, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(orjson.loads(line[6:]))
    return {"status": 200, "chunks": chunks}


def streamed_text(chunks: list[dict], choice: int = 0) -> tuple[list[str], str | None]:
    pieces, reason = [], None
    for chunk in chunks:
        for c in chunk["choices"]:
            if c["index"] == choice:
                if c["delta"].get("content"):
                    pieces.append(c["delta"]["content"])
                reason = c["finish_reason"] or reason
    return pieces, reason


@pytest.fixture(scope="module")
def unguarded(server: RunningServer) -> dict:
    """What the model says to PROMPT with no guard in the way."""
    body = chat(server.base_url, PROMPT, stream=False)["body"]
    assert len(body["choices"][0]["message"]["content"].split()) >= 20, body
    return body


@pytest.fixture(scope="module")
def reply(unguarded: dict) -> str:
    return unguarded["choices"][0]["message"]["content"]


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{4,}", text)


@pytest.fixture(scope="module")
def targets(reply: str) -> dict[str, str]:
    """Words of the reply: one to block (late in it), one to redact (earlier)."""
    candidates = words(reply)
    half = len(reply) // 2
    block = next(w for w in candidates if reply.find(w) > half)
    redact = next(
        w for w in candidates if reply.find(w) < reply.find(block) and w.lower() != block.lower()
    )
    return {"block": block, "redact": redact}


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory, targets: dict[str, str]) -> Path:
    path = tmp_path_factory.mktemp("guard") / "guard.toml"
    path.write_text(
        f"""
[[rule]]
id = "blocked-word"
kind = "phrase"
phrases = ["{targets["block"].upper()}"]
action = "block"

[[rule]]
id = "redacted-word"
kind = "regex"
pattern = "(?i)\\\\b{targets["redact"]}\\\\b"
max_len = {len(targets["redact"])}
action = "redact"
mask = "[gone]"

[[rule]]
id = "emails"
kind = "detector"
detector = "email"
action = "redact"
applies_to = ["output", "input"]

[[rule]]
id = "codes"
kind = "regex"
pattern = "ECHO-[0-9]{{4}}"
max_len = 9
action = "redact"
mask = "[code]"

[[rule]]
id = "forbidden-topic"
kind = "phrase"
phrases = ["forbidden topic"]
action = "block"
applies_to = ["input"]

[[rule]]
id = "noted"
kind = "phrase"
phrases = ["the"]
whole_word = true
action = "flag"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def guarded(policy_file: Path) -> Iterator[RunningServer]:
    srv = start_server("--parallel", "4", "--no-prefix-cache", "--guard", str(policy_file))
    try:
        yield srv
    finally:
        srv.stop()


def expected_output(reply: str, targets: dict[str, str]) -> str:
    """The reply as the policy must leave it: redacted, then cut where the block starts."""
    cut = reply[: reply.lower().find(targets["block"].lower())]
    return re.sub(rf"(?i)\b{targets['redact']}\b", "[gone]", cut)


def test_a_streamed_reply_is_redacted_and_cut_where_the_block_starts(
    guarded: RunningServer, unguarded: dict, reply: str, targets: dict[str, str]
) -> None:
    result = chat(guarded.base_url, PROMPT, stream=True)
    pieces, reason = streamed_text(result["chunks"])
    text = "".join(pieces)
    assert reason == "content_filter"
    assert text == expected_output(reply, targets)
    assert targets["block"].lower() not in text.lower()
    assert not re.search(rf"(?i)\b{targets['redact']}\b", text)
    # Generation stopped at the block (in the reply's second half), and usage counts
    # the tokens generated until then, the blocked ones included.
    usage = result["chunks"][-1]["usage"]
    assert usage["prompt_tokens"] == unguarded["usage"]["prompt_tokens"]
    assert 0 < usage["completion_tokens"] < unguarded["usage"]["completion_tokens"]


def test_a_non_streamed_reply_is_cut_the_same_way(
    guarded: RunningServer, reply: str, targets: dict[str, str]
) -> None:
    result = chat(guarded.base_url, PROMPT, stream=False)
    assert result["status"] == 200
    choice = result["body"]["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == expected_output(reply, targets)


def test_every_choice_is_guarded_on_its_own(
    guarded: RunningServer, targets: dict[str, str]
) -> None:
    # Two prompts, so two choices: one trips the block in its echo, the other does not.
    prompts = ["Quote ECHO-1234 now.", f"Say ECHO-5678 and {targets['block']} now."]
    r = httpx.post(
        f"{guarded.base_url}/completions",
        json={"model": MODEL, "prompt": prompts, "echo": True, "max_tokens": 4, "stream": True},
        timeout=120,
    )
    texts, reasons = {0: "", 1: ""}, {}
    for line in r.iter_lines():
        if line.startswith("data: {"):
            for c in orjson.loads(line[6:])["choices"]:
                texts[c["index"]] += c["text"]
                if c["finish_reason"]:
                    reasons[c["index"]] = c["finish_reason"]
    assert texts[0].startswith("Quote [code] now.")
    assert reasons[0] in ("length", "stop")
    assert texts[1] == "Say [code] and "
    assert reasons[1] == "content_filter"


def test_text_that_trips_nothing_comes_through_unchanged(
    server: RunningServer, guarded: RunningServer, targets: dict[str, str]
) -> None:
    plain = chat(server.base_url, OTHER_PROMPT, stream=False)["body"]["choices"][0]
    text = plain["message"]["content"]
    if targets["block"].lower() in text.lower() or targets["redact"].lower() in text.lower():
        pytest.skip("the other prompt's reply happens to contain a target word")
    pieces, reason = streamed_text(chat(guarded.base_url, OTHER_PROMPT, stream=True)["chunks"])
    assert "".join(pieces) == text
    assert reason == plain["finish_reason"]


def test_the_openai_sdk_sees_content_filter(
    guarded: RunningServer, reply: str, targets: dict[str, str]
) -> None:
    client = OpenAI(base_url=guarded.base_url, api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    text, reason = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    assert reason == "content_filter"
    assert text == expected_output(reply, targets)


def test_an_echoed_prompt_is_output_too(guarded: RunningServer) -> None:
    prompt = "Quote ECHO-1234 now."  # an output-only rule: the model itself sees the code
    for stream in (True, False):
        r = httpx.post(
            f"{guarded.base_url}/completions",
            json={
                "model": MODEL,
                "prompt": prompt,
                "echo": True,
                "max_tokens": 4,
                "stream": stream,
            },
            timeout=120,
        )
        assert r.status_code == 200
        assert "ECHO-1234" not in r.text
        assert "[code]" in r.text
        if not stream:
            assert r.json()["choices"][0]["text"].startswith("Quote [code] now.")


def test_input_rules_block_before_generation_and_redact_what_the_model_sees(
    guarded: RunningServer,
) -> None:
    r = httpx.post(
        f"{guarded.base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "a Forbidden  Topic"}]},
        timeout=30,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "content_filter"
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"

    r = httpx.post(
        f"{guarded.base_url}/completions",
        json={"model": MODEL, "prompt": "forbidden topic", "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"

    # A redacted prompt: the model sees (and echo shows) the mask, never the address.
    r = httpx.post(
        f"{guarded.base_url}/completions",
        json={"model": MODEL, "prompt": "from bob@example.com:", "echo": True, "max_tokens": 1},
        timeout=30,
    )
    assert r.json()["choices"][0]["text"].startswith("from [REDACTED:email]:")
    tokenized = httpx.post(
        f"{guarded.root_url}/tokenize",
        json={"model": MODEL, "prompt": "from [REDACTED:email]:"},
        timeout=30,
    ).json()
    assert r.json()["usage"]["prompt_tokens"] == tokenized["count"]


def test_logprobs_are_refused_while_an_output_guard_runs(guarded: RunningServer) -> None:
    r = httpx.post(
        f"{guarded.base_url}/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
        },
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logprobs"


def test_trips_are_counted_and_logged_without_the_text(
    guarded: RunningServer, targets: dict[str, str]
) -> None:
    chat(guarded.base_url, PROMPT, stream=True)
    trips = guarded.health()["guard"]["trips"]
    counted = {(t["direction"], t["rule"], t["action"]) for t in trips if t["count"] > 0}
    assert ("output", "blocked-word", "block") in counted
    assert ("output", "redacted-word", "redact") in counted
    guard_lines = [line for line in guarded.log().splitlines() if "guard" in line]
    assert any("rule=blocked-word action=block" in line for line in guard_lines)
    for line in guard_lines:
        assert targets["block"].lower() not in line.lower()
        assert targets["redact"].lower() not in line.lower()


def test_guard_stream_over_an_unguarded_server_matches_the_guarded_server(
    server: RunningServer, policy_file: Path, reply: str, targets: dict[str, str]
) -> None:
    client = OpenAI(base_url=server.base_url, api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reason, usage = "", None, None
    for chunk in guard_stream(stream, Policy.from_file(policy_file)):
        assert type(chunk).__name__ == "ChatCompletionChunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    assert reason == "content_filter"
    assert text == expected_output(reply, targets)
    assert usage is not None  # read to its end: the usage chunk still arrives


def test_a_bad_policy_stops_the_server_at_start_naming_the_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rule]]\nid = "broken"\nkind = "regex"\npattern = "(unclosed"\nmax_len = 5\n'
        'action = "block"\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "spigot", "serve", "--guard", str(bad), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "rule 'broken'" in result.stderr
    assert "regular expression" in result.stderr


def test_guard_test_shows_what_would_be_redacted_or_blocked(policy_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spigot", "guard", "test", str(policy_file), "--split", "3"],
        input="mail carol@example.net then nothing",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mail [REDACTED:email] then nothing"
    assert "redact  emails" in result.stderr
    assert "'carol@example.net'" in result.stderr
