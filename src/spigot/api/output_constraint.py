"""What a generation request's output must be, for chat and the Responses API alike.

Tool calls and a JSON format both become one ``Constraint`` compiled by the
engine in the prep pool, and tool calls are parsed out of the text by the same
stage. With tools that must be called (``required``, a named function) the
calls are the whole reply: the format would apply to text there is none of,
so the tool grammar wins and an engine elsewhere is told both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from spigot.api.holdback import OutputStage
from spigot.api.structured import ResponseFormat, TextFormat, format_constraint
from spigot.api.tool_calls import ToolCallStage
from spigot.api.tools import ToolRequest, tool_constraint
from spigot.engine.protocol import Engine, PromptError, Unsupported
from spigot.engine.types import Constraint
from spigot.errors import InvalidRequest, UnsupportedParameter


def output_constraint(
    engine: Engine,
    tools: ToolRequest | None,
    fmt: ResponseFormat | TextFormat | None,
    *,
    format_param: str,
) -> Constraint | None:
    """The request's grammar, compiled by ``engine`` (CPU work: run in the prep pool);
    a 400 naming the field the engine cannot enforce."""
    constraint, param = None, format_param
    if tools is not None and tools.constrained:
        constraint, param = tool_constraint(tools), "tools"
        if fmt is not None and constraint is not None:
            extra = (format_constraint(fmt) or Constraint("")).openai
            constraint = replace(constraint, openai={**extra, **constraint.openai})
    elif fmt is not None:
        constraint = format_constraint(fmt)
        if constraint is not None and tools is not None:
            constraint = replace(constraint, openai={**constraint.openai, **tools.openai()})
    if constraint is None:
        return None
    try:
        return engine.prepare_constraint(constraint)
    except Unsupported as exc:
        raise UnsupportedParameter(str(exc), param=param) from None
    except PromptError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def tool_call_stages(
    engine: Engine, tools: ToolRequest | None, choices: int
) -> Sequence[OutputStage]:
    """The stage that parses tool calls out of each choice's text, when calls may come."""
    if tools is None or not tools.constrained:
        return ()  # "none": the reply is text, whatever it spells
    # An engine that tokenizes here enforced the grammar: arguments can stream.
    # One elsewhere did not: each call is checked whole before it is sent.
    return (ToolCallStage(choices, tools.names, stream_arguments=engine.tokenizes_locally),)
