"""``spigot complete`` and ``spigot chat`` against a real server.

The commands run as ``python -m spigot`` subprocesses. Their streamed output
is compared with non-streamed requests with the same parameters (temperature
0, so the text is the same).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.server import ROOT, RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
# One log line per finished request (spigot.api.state.log_record).
CHAT_RECORD = re.compile(
    r"\bchat model=\S+ stream=(?P<stream>\w+) prompt=(?P<prompt>\d+) "
    r"completion=(?P<completion>\d+) .*\bstatus=(?P<status>\w+)"
)


def spigot(*args: str) -> list[str]:
    return [sys.executable, "-m", "spigot", *args]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("SPIGOT_BASE_URL", "OPENAI_BASE_URL", "SPIGOT_API_KEY", "OPENAI_API_KEY"):
        env.pop(key, None)
    return env


def _restore_sigint() -> None:
    # A child inherits an ignored SIGINT (as under a non-interactive shell's
    # background job), and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def post(server: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def chat_reply(server: RunningServer, messages: list[dict[str, str]], max_tokens: int) -> str:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    return str(post(server, "/chat/completions", body)["choices"][0]["message"]["content"])


def new_chat_records(server: RunningServer, log_offset: int) -> list[re.Match[str]]:
    return [m for line in server.log()[log_offset:].splitlines() if (m := CHAT_RECORD.search(line))]


def test_complete_prints_the_streamed_completion(server: RunningServer) -> None:
    result = subprocess.run(
        spigot(
            "complete",
            "def hello():",
            "--base-url",
            server.base_url,
            "--max-tokens",
            "24",
            "--temperature",
            "0",
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = post(
        server,
        "/completions",
        {"model": MODEL, "prompt": "def hello():", "max_tokens": 24, "temperature": 0},
    )["choices"][0]["text"]
    assert expected.strip()
    assert result.stdout == expected + "\n"


def test_complete_reports_a_server_error_and_fails(server: RunningServer) -> None:
    result = subprocess.run(
        spigot("complete", "x", "--base-url", server.base_url, "--model", "nope-7b"),
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode != 0
    assert "nope-7b" in result.stderr
    assert "Traceback" not in result.stderr


CHAT_MAX_TOKENS = 16


def test_chat_streams_two_replies_and_keeps_the_history(server: RunningServer) -> None:
    first, second = "Hi, my name is Ada.", "What is my name?"
    log_offset = len(server.log())
    result = subprocess.run(
        spigot(
            "chat",
            "--base-url",
            server.base_url,
            "--temperature",
            "0",
            "--max-tokens",
            str(CHAT_MAX_TOKENS),
        ),
        input=f"{first}\n{second}\n",
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = new_chat_records(server, log_offset)

    reply1 = chat_reply(server, [{"role": "user", "content": first}], CHAT_MAX_TOKENS)
    reply2 = chat_reply(
        server,
        [
            {"role": "user", "content": first},
            {"role": "assistant", "content": reply1},
            {"role": "user", "content": second},
        ],
        CHAT_MAX_TOKENS,
    )
    assert reply1.strip() and reply2.strip()
    # Each reply follows its "> " prompt; EOF at the third prompt quits.
    assert result.stdout.endswith(f"> {reply1}\n> {reply2}\n> \n"), result.stdout

    # Two streamed requests; the second carried the first exchange.
    assert [m["stream"] for m in records] == ["True", "True"], records
    assert int(records[1]["prompt"]) > int(records[0]["prompt"]) + int(records[0]["completion"])


class OutputReader:
    """Collects a process's stdout in a thread, so a test can wait for text."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._data = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := self._stream.read1(4096):
            with self._lock:
                self._data.extend(chunk)

    @property
    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text
            if predicate(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for output; got:\n{self.text}")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.fixture
def chat_process(server: RunningServer) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        spigot("chat", "--base-url", server.base_url, "--temperature", "0", "--max-tokens", "2000"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
        preexec_fn=_restore_sigint,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_chat_ctrl_c_stops_the_reply_and_the_generation(
    server: RunningServer, chat_process: subprocess.Popen[bytes]
) -> None:
    assert chat_process.stdin is not None and chat_process.stdout is not None
    out = OutputReader(chat_process.stdout)
    log_offset = len(server.log())
    chat_process.stdin.write(
        b"Write a very long story about a dragon who learns to bake bread, with many chapters.\n"
    )
    chat_process.stdin.flush()

    def reply_started(text: str) -> bool:
        _, prompt, reply = text.partition("> ")
        return bool(prompt) and len(reply.strip()) >= 20

    out.wait_for(reply_started, timeout=60)
    assert server.engine_stats()["in_flight"] == 1  # the long reply is being generated

    chat_process.send_signal(signal.SIGINT)
    out.wait_for(lambda t: "[stopped]" in t, timeout=15)
    assert chat_process.poll() is None, "Ctrl-C during a reply must not quit the chat"

    # Leaving the stream closed the connection; the server aborted generation.
    stats = server.wait_idle(timeout=30)
    assert stats["running"] == 0 and stats["in_flight"] == 0 and stats["waiting"] == 0, stats
    records = new_chat_records(server, log_offset)
    assert [m["status"] for m in records] == ["disconnected"], records

    # Back at the prompt; EOF quits cleanly.
    out.wait_for(lambda t: t.rstrip(" ").endswith("[stopped]\n>"), timeout=10)
    chat_process.stdin.close()
    assert chat_process.wait(timeout=30) == 0
    out.join(timeout=5)
    text = out.text
    assert text.count("[stopped]") == 1, text
    assert chat_process.stderr is not None
    assert "Traceback" not in chat_process.stderr.read().decode(errors="replace")
