"""Which target a sequence goes to.

Eligible targets are those whose upstream is healthy, has not asked us to
back off, has its breaker closed (or half-open with no probe out) and runs
fewer than ``max_in_flight`` sequences. Among them: power of two choices, the
one with the lower load (in flight / max_in_flight) of two picked at random;
on a tie the one listed first, so an idle gateway is deterministic and the
first target acts as the primary.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

from spigot.engine.protocol import QueueFull
from spigot.upstream.config import Target
from spigot.upstream.upstream import Availability, Slot, Upstream


class Router:
    """The targets of one served model over the (shared) upstreams."""

    def __init__(
        self,
        targets: Sequence[Target],
        upstreams: Mapping[str, Upstream],
        rng: random.Random | None = None,
    ) -> None:
        missing = sorted({t.upstream for t in targets} - set(upstreams))
        if missing:
            raise ValueError(f"unknown upstreams: {', '.join(missing)}")
        if not targets:
            raise ValueError("a served model needs at least one target")
        self.targets = tuple(targets)
        self.upstreams = upstreams
        self._rng = rng or random.Random()

    def upstream(self, target: Target) -> Upstream:
        return self.upstreams[target.upstream]

    def eligible(self, exclude: Collection[Target] = ()) -> list[Target]:
        return [
            t
            for t in self.targets
            if t not in exclude and self.upstream(t).availability() is Availability.OK
        ]

    def pick(self, candidates: Sequence[Target]) -> Target | None:
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = sorted(
            self._rng.sample(range(len(candidates)), 2)
        )  # listed order breaks ties
        a, b = candidates[first], candidates[second]
        return a if self.upstream(a).load <= self.upstream(b).load else b

    def acquire(
        self, *, avoid: Target | None = None, tried: Collection[Target] = ()
    ) -> tuple[Target, Slot] | None:
        """A target other than ``avoid``, preferring ones not ``tried``, with a slot held."""
        candidates = self.eligible(exclude=() if avoid is None else (avoid,))
        fresh = [t for t in candidates if t not in tried]
        target = self.pick(fresh or candidates)
        if target is None:
            return None
        slot = self.upstream(target).acquire()
        return None if slot is None else (target, slot)

    def acquire_same(self, target: Target) -> Slot | None:
        return self.upstream(target).acquire()

    def place(self, count: int) -> list[tuple[Target, Slot]] | None:
        """Slots for ``count`` new sequences, all or none.

        Raises ``QueueFull`` when the targets that work are busy; None when none works.
        """
        distinct = {self.upstream(t).name: self.upstream(t) for t in self.targets}.values()
        states = [u.availability() for u in distinct]
        if all(s is Availability.DOWN for s in states):
            return None
        free = sum(u.free() for u in distinct)
        if free < count:
            raise QueueFull(
                f"{sum(u.in_flight for u in distinct)} sequences are in flight on the "
                f"upstreams of this model; {free} more can start now"
            )
        placed: list[tuple[Target, Slot]] = []
        for _ in range(count):
            got = self.acquire()
            if got is None:
                for _, slot in placed:
                    slot.upstream.release(slot)
                raise QueueFull("the upstreams of this model are busy")
            placed.append(got)
        return placed

    def retry_after(self) -> float | None:
        """When a target may be worth trying again (None: no idea)."""
        waits = [self.upstream(t).available_in() for t in self.targets]
        wait = min(waits) if waits else 0.0
        return wait if wait > 0 else None
