"""OpenAI parameters this server knows but does not honour yet: refused, never ignored.

A client that asks for something (legacy ``functions``, audio) and gets a 200
with free prose mis-parses it; a 400 naming the parameter tells it at once.
Each entry says which values are harmless (the parameter's "off" values) so
that clients which always send them keep working. Parameters not
listed and not in the wire model are unknown: accepted and logged
(``spigot.api.body``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spigot.errors import UnsupportedParameter


@dataclass(frozen=True, slots=True)
class Unsupported:
    harmless: Callable[[Any, Mapping[str, Any]], bool]  # (value, whole body) -> accept?
    what: str  # what the parameter asks for, for the message


def _off(value: Any, body: Mapping[str, Any]) -> bool:
    return value is None or value is False or value == [] or value == {}


def _text_format(value: Any, body: Mapping[str, Any]) -> bool:
    return value is None or value == {"type": "text"}


def _text_modalities(value: Any, body: Mapping[str, Any]) -> bool:
    return value is None or value == ["text"]


def _no_function_call(value: Any, body: Mapping[str, Any]) -> bool:
    return value in (None, "none") or (value == "auto" and not body.get("functions"))


def _standard_tier(value: Any, body: Mapping[str, Any]) -> bool:
    return value in (None, "auto", "default")


CHAT: dict[str, Unsupported] = {
    # The legacy forms of tools: send 'tools' and 'tool_choice' instead.
    "functions": Unsupported(_off, "legacy function calling: use 'tools'"),
    "function_call": Unsupported(_no_function_call, "legacy function calling: use 'tool_choice'"),
    "audio": Unsupported(_off, "audio output"),
    "modalities": Unsupported(_text_modalities, "output modalities other than text"),
    "prediction": Unsupported(_off, "predicted outputs"),
    "reasoning_effort": Unsupported(_off, "reasoning effort"),
    "verbosity": Unsupported(_off, "verbosity control"),
    "web_search_options": Unsupported(_off, "web search"),
    "store": Unsupported(_off, "stored completions"),
    "service_tier": Unsupported(_standard_tier, "service tiers"),
}

COMPLETIONS: dict[str, Unsupported] = {
    "service_tier": Unsupported(_standard_tier, "service tiers"),
}


def refuse_unsupported(body: Mapping[str, Any], table: Mapping[str, Unsupported]) -> None:
    for name, entry in table.items():
        if name in body and not entry.harmless(body[name], body):
            raise UnsupportedParameter(
                f"Unsupported parameter: '{name}' ({entry.what}) is not supported by this "
                "server yet. Remove it, or send its default.",
                param=name,
            )
