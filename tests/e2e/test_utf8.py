"""Non-ASCII output end to end: every delta is whole characters, none is U+FFFD."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
PROMPTS = ["東京は日本の首都です。東京には", "Les élèves ont répondu: «", "🍎🍊🍋🍉🍇"]


def test_multibyte_output_streams_whole_characters(server: RunningServer) -> None:
    saw_non_ascii = False
    for prompt in PROMPTS:
        payload = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        whole = httpx.post(f"{server.base_url}/completions", json=payload, timeout=60).json()
        deltas = []
        with httpx.stream(
            "POST", f"{server.base_url}/completions", json={**payload, "stream": True}, timeout=60
        ) as r:
            raw = b"".join(r.iter_bytes())
        for event in raw.split(b"\n\n"):
            if event.startswith(b"data: {"):
                # Each event is valid UTF-8 JSON on its own.
                deltas.append(orjson.loads(event[6:])["choices"][0]["text"])
        text = "".join(deltas)
        assert text == whole["choices"][0]["text"]
        assert "\ufffd" not in text
        saw_non_ascii |= any(ord(c) > 127 for c in text)
    assert saw_non_ascii
