"""pydantic validation errors, told the way OpenAI tells them."""

from __future__ import annotations

from pydantic import ValidationError

from spigot.errors import InvalidRequest

# Names pydantic adds to a location for union members ("stop.str",
# "messages.0.content.list[TextPart]"); a client acts on the field path alone.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "none"}


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or "[" in part or part[:1].isupper() or part.startswith("function-")


def _param(loc: tuple[int | str, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    param = _param(tuple(first["loc"]))
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    value = first.get("input")
    shown = type(value).__name__ if isinstance(value, (dict, list)) else repr(value)
    return InvalidRequest(
        f"Invalid value for '{param}': {first['msg']} (got {shown}).", param=param
    )
