"""The stages between an engine's outputs and the client, each holding back what is undecided.

Text reaches the client through one chain, per choice:

    engine   UTF-8 assembly     a character split across tokens waits for its
                                last byte (at most 3 bytes)
             stop strings       a tail that could grow into a stop string waits
                                (at most the longest stop string less one)
    api      output rules       text a rule may still match waits (the guard's
                                window, ``spigot.guard``)
             tool calls         a tail that could open a tool call waits, and a
                                call's name until it is complete
                                (``spigot.api.tool_calls``)

The engine's two stages work on its bytes before any text exists (an engine
elsewhere applies its own stop strings); the API's run in ``OutputStages``
order, so output rules see all the model's text, tool-call arguments included,
before anything is parsed out of it. What a choice holds at any moment is the
sum of the stages' bounds (docs/guard.md for the rules' window, docs/tools.md
"What is held back" for the parser's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from spigot.engine.types import GenOutput


class OutputStage(Protocol):
    def apply(self, output: GenOutput) -> GenOutput | None:
        """What of ``output`` goes on to the next stage; None when nothing of it does
        yet. A stage that ends a choice early aborts it on the engine itself."""


class OutputStages:
    """A request's stages, in order."""

    def __init__(self, stages: Sequence[OutputStage]) -> None:
        self._stages = tuple(stages)

    def __bool__(self) -> bool:
        return bool(self._stages)

    def apply(self, output: GenOutput) -> GenOutput | None:
        current: GenOutput | None = output
        for stage in self._stages:
            if current is None:
                return None
            current = stage.apply(current)
        return current
