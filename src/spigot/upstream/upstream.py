"""One upstream server: its connection pool, load, health and circuit breaker.

Several served models may share one upstream (``--upstream URL`` serves every
model it lists): they share this object, so its in-flight count, breaker and
pool cover all of them. Engines ``open`` and ``close`` it; the last ``close``
stops the health check and closes the pool.

Circuit breaker: ``breaker_failures`` failures in a row (refused or timed-out
connections, 408/429/5xx answers, streams that never sent a first event or
broke) open it for ``breaker_open_s``; then one request is let through as a
probe (half-open): its first event closes the breaker, its failure opens it
again. A 4xx answer other than 408 and 429 is the request's fault, not the
server's: it counts neither way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from spigot.upstream.config import ModelRoute, Target, UpstreamConfig
from spigot.upstream.usage import TokenizeEndpoint

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed, open for a while after repeated failures, then one probe at a time."""

    def __init__(self, failures: int, open_s: float, clock: Clock = time.monotonic) -> None:
        self._threshold = failures
        self._open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._open_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    @property
    def failures(self) -> int:
        """Failures in a row."""
        return self._failures

    def allows(self) -> bool:
        """Whether a request may be sent now (half-open: only while no probe runs)."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probing
        )

    def take(self) -> bool:
        """Let one request through; True when it is the half-open probe."""
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        if self._opened_at is not None:
            log.info("circuit breaker closed again")
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self._threshold):
            self._opened_at = self._clock()
            self._probing = False

    def release_probe(self) -> None:
        """The probe ended without telling (a 4xx, an abort): let another one through."""
        self._probing = False

    def reopens_in(self) -> float:
        """Seconds until a probe may go through (0: it may now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._open_s - self._clock())


class Availability(enum.Enum):
    OK = "ok"
    FULL = "full"  # healthy, but as many sequences in flight as allowed
    DOWN = "down"  # unhealthy, breaker open, or asked us to back off


@dataclass(frozen=True, slots=True)
class RemoteModel:
    """A model an upstream lists on ``/models``."""

    id: str
    max_context: int | None = None


@dataclass(slots=True)
class Slot:
    """One sequence's place on an upstream, from routing until its attempt ends."""

    upstream: Upstream
    probe: bool
    settled: bool = False
    released: bool = False


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def parse_models(body: Any) -> list[RemoteModel]:
    """``GET /models``'s answer: ids, and the context length where the server says it."""
    models: list[RemoteModel] = []
    data = body.get("data") if isinstance(body, Mapping) else None
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            continue
        context = None
        for key in ("max_model_len", "context_length", "max_context_length"):
            value = entry.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                context = value
                break
        models.append(RemoteModel(entry["id"], context))
    return models


async def list_models(
    base_url: str, api_key: str | None = None, *, http_timeout: float = 10.0
) -> list[RemoteModel]:
    """The models an upstream serves (for a ``--upstream URL`` that serves them all).

    Raises ``httpx.HTTPError`` when the server cannot be asked or answers an error.
    """
    async with httpx.AsyncClient(timeout=http_timeout, headers=auth_headers(api_key)) as client:
        response = await client.get(base_url.rstrip("/") + "/models")
        response.raise_for_status()
        return parse_models(response.json())


async def discover_routes(config: UpstreamConfig) -> list[ModelRoute]:
    """One served model per model the upstream lists, under the same name (``--upstream URL``)."""
    models = await list_models(
        config.base_url, config.api_key, http_timeout=config.connect_timeout + 5
    )
    return [
        ModelRoute(m.id, (Target(config.name, m.id),), max_context=m.max_context) for m in models
    ]


class Upstream:
    """One server: a shared connection pool sized to ``max_in_flight``, load and health."""

    def __init__(self, config: UpstreamConfig, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_open_s, clock)
        self.tokenize = TokenizeEndpoint(config.root_url)
        self.in_flight = 0
        self.healthy = True
        self._clock = clock
        self._not_before = 0.0
        self._models: list[RemoteModel] | None = None
        self._client: httpx.AsyncClient | None = None
        self._users = 0
        self._health_task: asyncio.Task[None] | None = None
        self._first_check: asyncio.Future[bool] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"upstream {self.name} is not open")
        return self._client

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Start using it: the first user creates the pool, asks for the models once and
        starts the health check. A server that is down is logged, not fatal."""
        self._users += 1
        if self._users > 1:
            if self._first_check is not None:
                await asyncio.shield(self._first_check)  # another engine opened it
            return
        config = self.config
        # A few connections beyond the streams' for health checks and /tokenize.
        size = config.max_in_flight + 4
        self._client = httpx.AsyncClient(
            headers={**auth_headers(config.api_key), "User-Agent": "spigot-gateway"},
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            timeout=httpx.Timeout(
                connect=config.connect_timeout,
                read=config.idle_timeout,
                write=config.idle_timeout,
                pool=config.connect_timeout,
            ),
        )
        self._first_check = asyncio.ensure_future(self.check())
        await asyncio.shield(self._first_check)
        self._health_task = asyncio.create_task(
            self._health_loop(), name=f"upstream-health-{self.name}"
        )

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users:
            return
        self._first_check = None
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- health ----------------------------------------------------------------

    def models(self) -> list[RemoteModel] | None:
        """What ``/models`` listed at the last successful check (None: never answered)."""
        return self._models

    async def check(self) -> bool:
        """Ask ``/models`` once; the answer sets ``healthy``."""
        timeout = self.config.connect_timeout + 5.0
        try:
            response = await self.client.get(
                self.config.base_url.rstrip("/") + "/models", timeout=timeout
            )
            response.raise_for_status()
            self._models = parse_models(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            if self.healthy:
                log.warning("upstream %s is unhealthy: %s", self.name, _describe(exc))
            self.healthy = False
            return False
        if not self.healthy:
            log.info("upstream %s is healthy again", self.name)
        self.healthy = True
        return True

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.check()
            except Exception:
                log.exception("health check of upstream %s failed", self.name)

    # -- load ------------------------------------------------------------------

    def availability(self) -> Availability:
        if not self.healthy or self._clock() < self._not_before or not self.breaker.allows():
            return Availability.DOWN
        if self.in_flight >= self.config.max_in_flight:
            return Availability.FULL
        return Availability.OK

    def free(self) -> int:
        """Sequences it may take now."""
        if self.availability() is not Availability.OK:
            return 0
        if self.breaker.state is BreakerState.HALF_OPEN:
            return 1
        return self.config.max_in_flight - self.in_flight

    @property
    def load(self) -> float:
        return self.in_flight / max(1, self.config.max_in_flight)

    def available_in(self) -> float:
        """Seconds until it is worth trying again (a guess for ``Retry-After``)."""
        wait = max(self._not_before - self._clock(), self.breaker.reopens_in(), 0.0)
        if not self.healthy:
            wait = max(wait, self.config.health_interval)
        return wait

    def acquire(self) -> Slot | None:
        if self.availability() is not Availability.OK:
            return None
        self.in_flight += 1
        return Slot(self, probe=self.breaker.take())

    def succeeded(self, slot: Slot) -> None:
        """The first event arrived: the server works."""
        slot.settled = True
        self.breaker.success()
        self.healthy = True

    def failed(self, slot: Slot) -> None:
        slot.settled = True
        before = self.breaker.state
        self.breaker.failure()
        if self.breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
            log.warning(
                "upstream %s: circuit breaker open for %.0f s after %d failures",
                self.name,
                self.config.breaker_open_s,
                self.breaker.failures,
            )

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.in_flight -= 1
        if slot.probe and not slot.settled:
            self.breaker.release_probe()

    def back_off(self, seconds: float) -> None:
        """The server asked for a pause (``Retry-After``): route elsewhere meanwhile."""
        self._not_before = max(self._not_before, self._clock() + seconds)

    def stats(self) -> dict[str, int | float | None]:
        prefix = f"upstream.{self.name}."
        return {
            prefix + "in_flight": self.in_flight,
            prefix + "healthy": int(self.healthy),
            prefix + "breaker_open": int(self.breaker.state is not BreakerState.CLOSED),
            prefix + "failures": self.breaker.failures,
        }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
