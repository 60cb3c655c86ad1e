"""Fields an upstream sends that spigot does not know: passed on, unless output rules apply."""

from __future__ import annotations

import orjson

from spigot.api.chat import ChatChunks
from spigot.api.completions import CompletionChunks
from spigot.api.guarding import GuardCounters, OutputGuard
from spigot.engine.types import GenOutput
from spigot.guard import Policy

EXTRA = GenOutput(
    0,
    "Hi",
    chunk_extra={"system_fingerprint": "fp_1", "id": "upstream-id"},
    delta_extra={"reasoning_content": "secret thoughts", "content": "not this"},
)


class NoStream:
    def abort_choice(self, choice_index: int) -> None:
        raise AssertionError("nothing is blocked here")


def test_unknown_fields_are_passed_on_where_they_were_never_over_spigots() -> None:
    chunk = ChatChunks("chatcmpl-1", 1, "m", with_logprobs=False).content(EXTRA)
    assert chunk["id"] == "chatcmpl-1" and chunk["system_fingerprint"] == "fp_1"
    delta = chunk["choices"][0]["delta"]
    assert delta == {"content": "Hi", "reasoning_content": "secret thoughts"}
    text = CompletionChunks("cmpl-1", 1, "m", None).content(EXTRA)
    assert text["choices"][0]["text"] == "Hi"
    assert text["choices"][0]["reasoning_content"] == "secret thoughts"
    # A delta that only carries extras is still a chunk.
    only = ChatChunks("c", 1, "m", False).content(GenOutput(0, "", delta_extra={"x": 1}))
    assert only["choices"][0]["delta"] == {"x": 1}


def test_output_rules_drop_what_they_have_not_seen() -> None:
    policy = Policy.from_toml(
        '[[rule]]\nid = "r"\nkind = "phrase"\nphrases = ["never"]\naction = "block"\n'
    )
    guard = OutputGuard(policy, GuardCounters(), "req", NoStream(), 1)  # type: ignore[arg-type]
    shown = guard.apply(EXTRA)
    assert shown is not None
    chunk = orjson.dumps(ChatChunks("c", 1, "m", False).content(shown))
    assert b"secret thoughts" not in chunk and b"fp_1" not in chunk
