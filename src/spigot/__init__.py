"""spigot: OpenAI-compatible streaming completions from local models."""

__version__ = "0.1.0"
