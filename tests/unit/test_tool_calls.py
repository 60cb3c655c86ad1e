"""Tool calls parsed out of streamed text (``spigot.api.tool_calls``) and their chunk shapes.

The parser's result must not depend on where the text was cut: every test feeds
the same text cut in several ways and compares content and assembled calls.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from spigot.api.chat import ChatChunks, tool_call_deltas, tool_calls_message
from spigot.api.tool_calls import MAX_NAME, MAX_SPACE, ChoiceParser, ToolCallStage
from spigot.api.tools import CLOSE, OPEN
from spigot.engine import tool_format
from spigot.engine.types import FinishReason, GenOutput, TokenLogprob, ToolCallDelta, Usage

NAMES = frozenset({"get_weather", "noargs"})


def call(name: str, arguments: object) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    return f"{OPEN}\n{body}\n{CLOSE}"


WEATHER = call("get_weather", {"city": 'Paris, "FR" {x}', "days": [1, {"a": "}"}]})
NOARGS = call("noargs", {})


def run(
    pieces: Sequence[str], *, stream_arguments: bool = True, names: frozenset[str] = NAMES
) -> tuple[str, list[tuple[str, str]], list[list[ToolCallDelta]]]:
    """(content, [(name, arguments)], the deltas of each output) of ``pieces`` fed in turn."""
    parser = ChoiceParser(names, stream_arguments=stream_arguments)
    text, per_output = [], []
    for i, piece in enumerate(pieces):
        out, deltas = parser.feed(piece, final=i == len(pieces) - 1)
        text.append(out)
        per_output.append(deltas)
    calls: dict[int, list[str]] = {}
    for deltas in per_output:
        for d in deltas:
            if d.name is not None:
                assert d.index not in calls and d.id and d.id.startswith("call_")
                calls[d.index] = [d.name, ""]
            calls[d.index][1] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return "".join(text), [(n, a) for n, a in (calls[i] for i in sorted(calls))], per_output


def cuts(text: str, rng: random.Random) -> list[list[str]]:
    """The same text one character per output, in random pieces, and whole."""
    ways = [list(text), [text]]
    for _ in range(3):
        points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
        ways.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    return [[*w, ""] for w in ways]  # a last output without text, as an engine's finish


def same_everywhere(text: str, **options: object) -> tuple[str, list[tuple[str, str]]]:
    rng = random.Random(text)
    results = {
        (c, tuple(calls)) for way in cuts(text, rng) for c, calls, _ in [run(way, **options)]
    }  # type: ignore[arg-type]
    assert len(results) == 1, results
    content, calls = results.pop()
    return content, list(calls)


def test_a_call_is_parsed_whatever_the_cuts() -> None:
    content, calls = same_everywhere(WEATHER)
    assert content == ""
    assert calls == [
        ("get_weather", json.dumps(json.loads(WEATHER[12:-13])["arguments"], separators=(",", ":")))
    ]
    assert json.loads(calls[0][1]) == {"city": 'Paris, "FR" {x}', "days": [1, {"a": "}"}]}


def test_text_before_and_parallel_calls() -> None:
    text = "Let me look.\n" + WEATHER + "\n" + NOARGS + "\n"
    content, calls = same_everywhere(text)
    assert content == "Let me look.\n"
    assert [name for name, _ in calls] == ["get_weather", "noargs"]
    assert calls[1][1] == "{}"


def test_text_after_a_call_is_content() -> None:
    content, calls = same_everywhere(NOARGS + "\n  Done.")
    assert content == "\n  Done." and len(calls) == 1


def test_tag_like_text_is_released_as_content() -> None:
    for text in ["a <tool b", "<tool_cal", "x <tool_call", "<tool_call>\nnot json</tool_call> ok"]:
        content, calls = same_everywhere(text)
        assert content == text and calls == []


def test_an_undeclared_function_is_text() -> None:
    text = call("rm_rf", {"path": "/"})
    assert same_everywhere(text) == (text, [])
    assert same_everywhere(text, stream_arguments=False) == (text, [])


def test_without_a_grammar_a_call_is_checked_whole() -> None:
    # Spaces and key order a grammar would not allow: fine when parsed whole.
    loose = f'{OPEN}\n{{ "arguments": {{"city": "x"}}, "name": "get_weather" }}\n{CLOSE}'
    content, calls = same_everywhere("Sure. " + loose, stream_arguments=False)
    assert content == "Sure. " and calls == [("get_weather", '{"city":"x"}')]
    for bad in [
        f'{OPEN}{{"name":"get_weather","arguments":"x"}}{CLOSE}',
        f'{OPEN}{{"name":"get_weather","arguments":{{}},"extra":1}}{CLOSE}',
        f"{OPEN}{{oops{CLOSE} tail",
        f'{OPEN}{{"name":"get_weather","arguments":{{}}}}',  # never closed
    ]:
        assert same_everywhere(bad, stream_arguments=False) == (bad, [])


def test_a_call_cut_short_keeps_its_arguments_so_far() -> None:
    text = WEATHER[:60]
    content, calls = same_everywhere(text)
    assert content == "" and calls == [("get_weather", text[text.index("arguments") + 11 :])]


def test_a_tag_cut_short_after_a_call_is_dropped() -> None:
    assert same_everywhere(NOARGS + "\n<tool_c") == ("", [("noargs", "{}")])
    assert same_everywhere(NOARGS + "\n<tool_x") == ("\n<tool_x", [("noargs", "{}")])


def test_a_head_cut_short_is_dropped_under_a_grammar_and_text_without() -> None:
    text = "Hi " + WEATHER[:20]
    assert same_everywhere(text) == ("Hi ", [])
    assert same_everywhere(text, stream_arguments=False) == (text, [])
    wrong = "Hi " + WEATHER[:20].replace("name", "nbme")
    assert same_everywhere(wrong) == (wrong, [])


def test_the_name_waits_for_the_arguments_to_open_and_no_longer() -> None:
    parser = ChoiceParser(NAMES, stream_arguments=True)
    head = f'{OPEN}\n{{"name":"get_weather","arguments":'
    for ch in head:
        assert parser.feed(ch, final=False) == ("", [])
    out, deltas = parser.feed("{", final=False)
    assert out == "" and [(d.name, d.arguments) for d in deltas] == [
        ("get_weather", ""),
        (None, "{"),
    ]
    assert parser.feed('"c', final=False)[1] == [ToolCallDelta(0, arguments='"c')]


@given(st.text(alphabet='ab<>/_toolcal \n{}"', max_size=60))
@settings(max_examples=300, deadline=None)
def test_held_back_text_is_bounded(text: str) -> None:
    """Outside a call at most an opening tag's length less one is held; in a call's
    head at most the head itself with its bounded whitespace."""
    parser = ChoiceParser(NAMES, stream_arguments=True)
    head_bound = len('\n{"name":"","arguments":') + MAX_NAME + 9 * MAX_SPACE
    for ch in text:
        parser.feed(ch, final=False)
        held = len(parser._buf)
        assert held <= (len(OPEN) - 1 if parser._state == "text" else head_bound)


_FRAGMENTS = st.sampled_from(
    [WEATHER, NOARGS, "hello ", "\n", "  ", "<tool", "<tool_call>", "</tool_call>", '{"name":',
     call("get_weather", {"city": "a\\\"b"}), call("nope", {}), "}", "é", "<tool_call>\n{\"name\""]
)  # fmt: skip


@given(st.lists(_FRAGMENTS, max_size=8), st.booleans(), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_cuts_never_change_the_result(
    fragments: list[str], stream_arguments: bool, rng: random.Random
) -> None:
    text = "".join(fragments)
    if not text:
        return
    ways = [list(text), [text]]
    points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6))) if len(text) > 1 else []
    ways.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    results = {
        (content, tuple(calls))
        for way in ways
        for content, calls, _ in [run(way, stream_arguments=stream_arguments)]
    }
    assert len(results) == 1
    content, calls = results.pop()
    for _, arguments in calls:
        if stream_arguments is False:
            json.loads(arguments)
    # Nothing is lost outside the calls: every character of the text is content, markup
    # of a call, or its arguments.
    assert len(content) + sum(len(a) for _, a in calls) <= len(text)


# -- the stage ----------------------------------------------------------------------------


def _lp(token: str) -> TokenLogprob:
    return TokenLogprob(token, token.encode(), -0.5, ())


def feed_stage(pieces: Sequence[str], finish: FinishReason = FinishReason.STOP) -> list[GenOutput]:
    stage = ToolCallStage(1, NAMES, stream_arguments=True)
    shown = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out = stage.apply(
            GenOutput(
                0,
                piece,
                [_lp(piece)],
                finish if last else None,
                Usage(3, len(pieces)) if last else None,
            )
        )
        if out is not None:
            shown.append(out)
    return shown


def test_stage_finishes_with_tool_calls_and_keeps_every_logprob() -> None:
    pieces = ["Hi ", *WEATHER, ""]
    shown = feed_stage(pieces)
    assert shown[-1].finish_reason is FinishReason.TOOL_CALLS and shown[-1].usage is not None
    assert [e.token for o in shown for e in o.logprobs] == pieces
    first = next(o for o in shown if o.tool_calls)
    # The first delta of a call has its name and empty arguments, as OpenAI sends it.
    assert [(d.name, d.arguments) for d in first.tool_calls] == [("get_weather", "")]


def test_stage_keeps_stop_and_length_without_a_call() -> None:
    assert feed_stage(["plain ", "text"])[-1].finish_reason is FinishReason.STOP
    shown = feed_stage(list(WEATHER[:30]), FinishReason.LENGTH)
    assert shown[-1].finish_reason is FinishReason.LENGTH


def test_a_content_filter_ending_stays_and_flushes_what_was_held() -> None:
    shown = feed_stage(["before <tool"], FinishReason.CONTENT_FILTER)
    assert "".join(o.text for o in shown) == "before <tool"
    assert shown[-1].finish_reason is FinishReason.CONTENT_FILTER


# -- chunk and message shapes -----------------------------------------------------------


def test_chunk_deltas_are_openais() -> None:
    deltas = [ToolCallDelta(0, "call_a", "f", ""), ToolCallDelta(0, arguments='{"x":')]
    # The first entry of a call never carries arguments: a client may treat it as the
    # call's header (the tests' stream reader does), fragments follow at the same index.
    assert tool_call_deltas(deltas) == [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"x":'}},
    ]
    assert tool_call_deltas([ToolCallDelta(1, arguments="1}")]) == [
        {"index": 1, "function": {"arguments": "1}"}}
    ]
    chunk = ChatChunks("chatcmpl-x", 1, "m", False).content(
        GenOutput(0, "", tool_calls=[ToolCallDelta(0, "call_a", "f", "")])
    )
    assert chunk["choices"][0]["delta"] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_a",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    }


def test_message_assembles_calls() -> None:
    outputs = [
        GenOutput(0, "", tool_calls=[ToolCallDelta(0, "call_a", "f", "")]),
        GenOutput(
            0,
            "",
            tool_calls=[ToolCallDelta(0, arguments='{"x":1}'), ToolCallDelta(1, "call_b", "g", "")],
        ),
        GenOutput(0, "", tool_calls=[ToolCallDelta(1, arguments="{}")]),
    ]
    assert tool_calls_message(outputs) == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


def test_the_engine_and_the_api_spell_the_tags_alike() -> None:
    assert (tool_format.OPEN, tool_format.CLOSE) == (OPEN, CLOSE)
    # What the generic format renders of a call is what the parser reads back.
    text = tool_format.call_text("get_weather", '{"city":"x"}')
    assert same_everywhere(text) == ("", [("get_weather", '{"city":"x"}')])
