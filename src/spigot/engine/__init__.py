"""Generation engines: no HTTP, no pydantic."""
