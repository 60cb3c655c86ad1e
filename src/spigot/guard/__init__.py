"""Streaming guardrails: check and control text that has not finished arriving.

from spigot.guard import Policy, guard_stream
policy = Policy.from_file("guard.toml")
for chunk in guard_stream(client.chat.completions.create(..., stream=True), policy):
    ...
"""

from spigot.guard.chunks import aguard_stream, guard_stream
from spigot.guard.policy import Policy, PolicyError, Rule, RuleSet
from spigot.guard.stream import Released, TextGuard, Trip

__all__ = [
    "Policy",
    "PolicyError",
    "Released",
    "Rule",
    "RuleSet",
    "TextGuard",
    "Trip",
    "aguard_stream",
    "guard_stream",
]
