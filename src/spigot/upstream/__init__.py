"""Gateway mode: models that live on other OpenAI-compatible servers, as engines.

config     UpstreamConfig, Target, ModelRoute (plain frozen data)
upstream   Upstream: one server's pool, load, health check, circuit breaker
routing    Router: power of two choices among eligible targets
payload    the upstream request of one sequence
chunks     upstream chunks -> GenOutputs, quirks normalised
sequence   one sequence: tries and failover until the first event, then its stream
usage      prompt estimates; counting when an upstream reports no usage
engine     UpstreamEngine: the Engine protocol over all of that
"""

from spigot.upstream.config import ModelRoute, Target, UpstreamConfig
from spigot.upstream.engine import UpstreamEngine
from spigot.upstream.upstream import RemoteModel, Upstream, discover_routes, list_models

__all__ = [
    "ModelRoute",
    "RemoteModel",
    "Target",
    "Upstream",
    "UpstreamConfig",
    "UpstreamEngine",
    "discover_routes",
    "list_models",
]
