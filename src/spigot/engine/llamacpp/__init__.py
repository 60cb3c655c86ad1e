"""A local GGUF model on llama.cpp, with continuous batching: the in-process engine."""

from spigot.engine.llamacpp.engine import EngineOptions, LlamaCppEngine
from spigot.engine.llamacpp.model import ContextOptions, LlamaCppModel, set_native_logging

__all__ = [
    "ContextOptions",
    "EngineOptions",
    "LlamaCppEngine",
    "LlamaCppModel",
    "set_native_logging",
]
