"""spigot: OpenAI-compatible streaming completions from local models and other engines."""

__version__ = "0.1.0"
