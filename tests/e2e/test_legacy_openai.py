"""The seed article's client code, run unchanged on the legacy openai 0.28 SDK.

The code runs in a subprocess (openai 0.28 and openai 1+ cannot share one
interpreter). Besides its own output, the script prints one JSON summary line
per scenario, which the tests assert on; the streamed text must equal what a
non-streamed request with the same parameters returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import LEGACY_OPENAI_DIR, ROOT, RunningServer

pytestmark = pytest.mark.e2e

SUMMARY = "@@SUMMARY@@ "

# The seed article sets no max_tokens on its chat request. At temperature 0
# SmolLM2-135M does not stop on this prompt: it repeats itself until the
# context is full (thousands of tokens, minutes on CPU). So max_tokens is the
# one addition to the article's chat call.
CHAT_MAX_TOKENS = 24
# The article asks for 512 completion tokens; 48 keep the test fast and show
# the same streaming.
COMPLETION_MAX_TOKENS = 48
CHAT_MESSAGES = [{"role": "user", "content": "What's 1+1? Answer in one word."}]

LEGACY_SCRIPT = r"""
import json
import sys

import openai

SUMMARY = "@@SUMMARY@@ "
openai.api_base = sys.argv[1]
openai.api_key = "sk-any-string-works"
CHAT_MAX_TOKENS = int(sys.argv[2])
COMPLETION_MAX_TOKENS = int(sys.argv[3])


def emit(name, chunks):
    chunks = [c.to_dict_recursive() for c in chunks]
    print()
    print(SUMMARY + json.dumps({"scenario": name, "chunks": chunks}), flush=True)


# (a) Simple Streaming ChatCompletion Request, as in the article.
response = openai.ChatCompletion.create(
    model='gpt-3.5-turbo',
    messages=[
        {'role': 'user', 'content': "What's 1+1? Answer in one word."}
    ],
    temperature=0,
    stream=True,
    max_tokens=CHAT_MAX_TOKENS,  # the only addition: see the test module
)

chunks = []
for chunk in response:
    print(chunk)
    chunks.append(chunk)
emit("chat_stream", chunks)

# (b) The article's streaming Completion loop (temperature 0 added so the
# text can be compared with a non-streamed request).
chunks = []
for resp in openai.Completion.create(model='code-davinci-002', prompt='def hello():',
                                     max_tokens=COMPLETION_MAX_TOKENS, temperature=0, stream=True):
    sys.stdout.write(resp.choices[0].text)
    sys.stdout.flush()
    chunks.append(resp)
emit("completion_stream", chunks)

# (c) The same two requests, not streamed.
chat = openai.ChatCompletion.create(
    model='gpt-3.5-turbo',
    messages=[{'role': 'user', 'content': "What's 1+1? Answer in one word."}],
    temperature=0,
    max_tokens=CHAT_MAX_TOKENS,
)
emit("chat", [chat])
completion = openai.Completion.create(
    model='code-davinci-002',
    prompt='def hello():',
    max_tokens=COMPLETION_MAX_TOKENS,
    temperature=0,
)
emit("completion", [completion])
"""


class LegacyRun:
    def __init__(self, stdout: str, summaries: dict[str, list[dict[str, Any]]]) -> None:
        self.stdout = stdout
        self.summaries = summaries


@pytest.fixture(scope="module")
def legacy_run(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> LegacyRun:
    script = Path(tmp_path_factory.mktemp("legacy")) / "seed_client.py"
    script.write_text(LEGACY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(LEGACY_OPENAI_DIR), "PYTHONUNBUFFERED": "1"}
    for key in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_KEY"):
        env.pop(key, None)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            server.base_url,
            str(CHAT_MAX_TOKENS),
            str(COMPLETION_MAX_TOKENS),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    summaries: dict[str, list[dict[str, Any]]] = {}
    for line in result.stdout.splitlines():
        if line.startswith(SUMMARY):
            summary = json.loads(line[len(SUMMARY) :])
            summaries[summary["scenario"]] = summary["chunks"]
    assert set(summaries) == {"chat_stream", "completion_stream", "chat", "completion"}, (
        result.stdout
    )
    return LegacyRun(result.stdout, summaries)


def _post(server: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def reference_chat(server: RunningServer) -> dict[str, Any]:
    return _post(
        server,
        "/chat/completions",
        {
            "model": "gpt-3.5-turbo",
            "messages": CHAT_MESSAGES,
            "temperature": 0,
            "max_tokens": CHAT_MAX_TOKENS,
        },
    )


@pytest.fixture(scope="module")
def reference_completion(server: RunningServer) -> dict[str, Any]:
    return _post(
        server,
        "/completions",
        {
            "model": "code-davinci-002",
            "prompt": "def hello():",
            "temperature": 0,
            "max_tokens": COMPLETION_MAX_TOKENS,
        },
    )


def test_legacy_chat_stream_chunk_shapes(legacy_run: LegacyRun) -> None:
    chunks = legacy_run.summaries["chat_stream"]
    assert len(chunks) >= 3  # role, content..., finish
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == "smollm2-135m-instruct" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["finish_reason"] is None
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] in ("stop", "length")
    assert last["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_legacy_chat_stream_prints_chunks(legacy_run: LegacyRun) -> None:
    # ``print(chunk)`` shows each chunk as JSON, as in the article's output.
    printed = legacy_run.stdout.split(SUMMARY)[0]
    assert printed.count('"object": "chat.completion.chunk"') == len(
        legacy_run.summaries["chat_stream"]
    )
    assert '"role": "assistant"' in printed


def test_legacy_chat_stream_text_matches_non_streamed(
    legacy_run: LegacyRun, reference_chat: dict[str, Any]
) -> None:
    chunks = legacy_run.summaries["chat_stream"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    assert text == reference_chat["choices"][0]["message"]["content"]
    assert (
        chunks[-1]["choices"][0]["finish_reason"] == reference_chat["choices"][0]["finish_reason"]
    )


def test_legacy_completion_stream_chunk_shapes(legacy_run: LegacyRun) -> None:
    chunks = legacy_run.summaries["completion_stream"]
    assert len(chunks) >= 2
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("cmpl-")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_legacy_completion_stream_text_matches_non_streamed(
    legacy_run: LegacyRun, reference_completion: dict[str, Any]
) -> None:
    chunks = legacy_run.summaries["completion_stream"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.strip()
    assert text == reference_completion["choices"][0]["text"]
    # The article's loop wrote the same text to stdout as it arrived.
    assert text in legacy_run.stdout


def test_legacy_non_streamed_calls(
    legacy_run: LegacyRun,
    reference_chat: dict[str, Any],
    reference_completion: dict[str, Any],
) -> None:
    (chat,) = legacy_run.summaries["chat"]
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert (
        chat["choices"][0]["message"]["content"]
        == (reference_chat["choices"][0]["message"]["content"])
    )
    assert chat["usage"]["completion_tokens"] == reference_chat["usage"]["completion_tokens"]
    (completion,) = legacy_run.summaries["completion"]
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == reference_completion["choices"][0]["text"]
