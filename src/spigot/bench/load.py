"""``spigot bench run``: streamed load against one or two OpenAI-compatible servers.

At each concurrency level, N workers send requests back to back until the
level's request count or duration is reached. With two servers the levels are
interleaved (level 1 on A, level 1 on B, level 2 on A, ...; the order flips
every round) so machine noise hits both alike. After each level the output
tokens of requests are counted (usage chunk, else the server's ``/tokenize``,
else content chunks) outside the timed window.

Where the rest lives: one request in ``request.py``, its SSE parsing in
``spigot.sse_parser``, workloads in ``workloads.py``, the figures in ``stats.py``, the JSON
in ``results.py``, tables in ``report.py``, plots in ``plot.py``, the bar in
``progress.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from spigot.bench.progress import Progress
from spigot.bench.request import (
    ENDPOINT_PATHS,
    Endpoint,
    RequestResult,
    request_body,
    send_request,
)
from spigot.bench.results import assemble, machine_info, server_entry
from spigot.bench.stats import LevelRun
from spigot.bench.workloads import Prompt, load_prompt_file, load_workload, tagged
from spigot.models import EMBEDDED_MODEL_ID

_PROBE_TIMEOUT_S = 10.0
_RETRY_PAUSE_S = 0.05


@dataclass(frozen=True)
class Target:
    """A server to benchmark. ``model`` None: the first one its ``/models`` lists."""

    name: str
    base_url: str
    model: str | None = None
    api_key: str | None = None

    @property
    def root_url(self) -> str:
        """The server's root, where ``/tokenize`` and ``/health`` live (not under /v1)."""
        url = self.base_url.rstrip("/")
        return url.removesuffix("/v1")


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[Target, ...]
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    # Per level: a request count (one for all levels, or one per level), or a
    # duration in seconds. Neither: 4 per worker. Counts give two compared
    # servers the very same requests; with a duration the faster one sends
    # more prompts of the set, and meets them warm at the next level.
    requests: int | tuple[int, ...] | None = None
    duration: float | None = None
    workload: str = "mixed"
    prompts_file: Path | None = None
    max_tokens: int = 128
    endpoint: Endpoint = "chat"
    timeout: float = 300.0
    seed: int = 0
    rounds: int = 1
    warmup: int = 1
    exact_tokens: bool = True
    # Each request's first message starts with its own tag, so no server can
    # answer a repeated prompt from a cache of an earlier one.
    unique_prompts: bool = False
    raw: bool = False

    def __post_init__(self) -> None:
        if not self.targets or len(self.targets) > 2:
            raise ValueError("one server, or two to compare")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels are positive integers")
        if self.requests is not None and self.duration is not None:
            raise ValueError("give a request count or a duration per level, not both")
        if isinstance(self.requests, tuple) and len(self.requests) != len(self.concurrency):
            raise ValueError("one request count for all levels, or one per level")

    def requests_for(self, concurrency: int) -> int | None:
        if self.duration is not None:
            return None
        if self.requests is None:
            return 4 * concurrency
        if isinstance(self.requests, int):
            return self.requests
        return self.requests[self.concurrency.index(concurrency)]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # Never write credentials into a results file.
        data["targets"] = [
            {"name": t.name, "url": t.base_url, "model": t.model, "api_key": bool(t.api_key)}
            for t in self.targets
        ]
        data["prompts_file"] = str(self.prompts_file) if self.prompts_file else None
        data["concurrency"] = list(self.concurrency)
        return data


@dataclass
class _ServerState:
    """What the run learns about one server, and its level runs so far."""

    target: Target
    client: httpx.AsyncClient
    model: str = ""
    model_source: str = "given"
    info: dict[str, Any] = field(default_factory=dict)
    # None: not tried yet; False: the server has no usable /tokenize.
    tokenize: bool | None = None
    runs: dict[int, list[LevelRun]] = field(default_factory=dict)


# -- running -------------------------------------------------------------------


async def run_bench(
    config: BenchConfig,
    progress: Progress | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Run every level against every server; the results, ready for JSON.

    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``).
    """
    progress = progress or Progress(enabled=False)
    prompts = (
        load_prompt_file(config.prompts_file)
        if config.prompts_file
        else load_workload(config.workload)
    )
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    machine = machine_info()
    limits = httpx.Limits(max_connections=max(config.concurrency) + 4)
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for target in config.targets:
            headers = {"accept": "text/event-stream"}
            if target.api_key:
                headers["authorization"] = f"Bearer {target.api_key}"
            client = httpx.AsyncClient(
                base_url=target.base_url.rstrip("/"),
                headers=headers,
                timeout=httpx.Timeout(config.timeout),
                limits=limits,
                transport=transport,
            )
            await stack.enter_async_context(client)
            server = _ServerState(target, client)
            await _probe(server)
            servers.append(server)
        for server in servers:
            await _warm_up(server, config, prompts, progress)
        for round_no in range(config.rounds):
            # Flip the order every round so neither server always goes first.
            order = servers if round_no % 2 == 0 else servers[::-1]
            for concurrency in config.concurrency:
                for server in order:
                    run = await _run_level(server, config, prompts, concurrency, round_no, progress)
                    server.runs.setdefault(concurrency, []).append(run)
    entries = [
        server_entry(
            name=server.target.name,
            url=server.target.base_url,
            model=server.model,
            model_source=server.model_source,
            endpoint=config.endpoint,
            info=server.info,
            runs={c: server.runs[c] for c in config.concurrency},
            raw=config.raw,
        )
        for server in servers
    ]
    return assemble(config.to_json(), machine, entries, started, time.perf_counter() - t0)


async def _probe(server: _ServerState) -> None:
    """Learn the model (unless given) and what the server says about itself."""
    target, client = server.target, server.client
    models: list[str] = []
    try:
        response = await client.get("/models", timeout=_PROBE_TIMEOUT_S)
        response.raise_for_status()
        models = [str(m["id"]) for m in response.json()["data"]]
        server.info["models"] = models
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        server.info["models_error"] = f"{type(exc).__name__}: {exc}"
    try:
        response = await client.get(f"{target.root_url}/health", timeout=_PROBE_TIMEOUT_S)
        health = response.json() if response.status_code == 200 else None
        if isinstance(health, dict):
            server.info["health"] = health
    except (httpx.HTTPError, ValueError):
        pass
    if target.model:
        server.model, server.model_source = target.model, "given"
    elif models:
        server.model, server.model_source = models[0], "listed"
    else:
        # Nothing listed (or unreachable): name spigot's own model and let the
        # requests tell what is wrong.
        server.model, server.model_source = EMBEDDED_MODEL_ID, "default"


async def _warm_up(
    server: _ServerState, config: BenchConfig, prompts: list[Prompt], progress: Progress
) -> None:
    path = ENDPOINT_PATHS[config.endpoint]
    for i in range(config.warmup):
        prompt = prompts[i % len(prompts)]
        body = request_body(
            config.endpoint, server.model, prompt, min(config.max_tokens, 16), config.exact_tokens
        )
        result = await send_request(server.client, path, body, prompt.id, config.timeout)
        if not result.ok:
            progress.note(
                f"{server.target.name}: warm-up request failed ({result.error_label}: "
                f"{result.error})"
            )
            return


def _prompt_order(prompts: list[Prompt], seed: int, concurrency: int, round_no: int) -> list[int]:
    # A string seed hashes the same in every process: both servers, and a
    # rerun with the same --seed, send the same prompts in the same order.
    order = list(range(len(prompts)))
    random.Random(f"{seed}/{concurrency}/{round_no}").shuffle(order)
    return order


async def _run_level(
    server: _ServerState,
    config: BenchConfig,
    prompts: list[Prompt],
    concurrency: int,
    round_no: int,
    progress: Progress,
) -> LevelRun:
    total = config.requests_for(concurrency)
    order = _prompt_order(prompts, config.seed, concurrency, round_no)
    path = ENDPOINT_PATHS[config.endpoint]
    results: list[RequestResult] = []
    issued = 0
    label = f"{server.target.name} c={concurrency}"
    if config.rounds > 1:
        label += f" round {round_no + 1}"
    progress.start(label, total=total, duration=config.duration)
    start = time.perf_counter()
    deadline = start + config.duration if config.duration is not None else None

    async def worker() -> None:
        nonlocal issued
        while True:
            if total is not None and issued >= total:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            prompt = prompts[order[issued % len(order)]]
            if config.unique_prompts:
                # The same tags for every server: they see the same texts.
                prompt = tagged(prompt, f"[{concurrency}.{round_no}.{issued}]")
            issued += 1
            body = request_body(
                config.endpoint, server.model, prompt, config.max_tokens, config.exact_tokens
            )
            result = await send_request(server.client, path, body, prompt.id, config.timeout)
            results.append(result)
            progress.advance(result.ok)
            if deadline is not None and result.error_kind == "connection":
                # A server that refuses connections fails in microseconds: do
                # not spin through a whole duration's worth of failures.
                await asyncio.sleep(_RETRY_PAUSE_S)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    # Requests started before a duration's deadline finish; they count.
    run = LevelRun(concurrency, time.perf_counter() - start, results)
    await _count_tokens(server, run)
    progress.finish(
        f"{run.output_tokens_per_s:.1f} tok/s, {run.requests_per_s:.2f} req/s"
        if run.ok
        else _error_digest(run.results)
    )
    return run


def _error_digest(results: list[RequestResult]) -> str:
    first = next((r for r in results if not r.ok), None)
    return f"all failed, e.g. {first.error_label}: {first.error}" if first else "no requests"


async def _count_tokens(server: _ServerState, run: LevelRun) -> None:
    """Each result's output token count: usage, else /tokenize, else content chunks."""
    for result in run.results:
        if result.usage_tokens is not None:
            result.output_tokens, result.token_source = result.usage_tokens, "usage"
        else:
            result.output_tokens, result.token_source = len(result.chunk_times), "chunks"
    if server.tokenize is False:
        return
    for result in run.ok:
        if result.usage_tokens is not None:
            continue
        count = await _tokenize_count(server, result.text)
        if count is None:
            server.tokenize = False
            return
        server.tokenize = True
        result.output_tokens, result.token_source = count, "tokenize"


async def _tokenize_count(server: _ServerState, text: str) -> int | None:
    body = {"model": server.model, "prompt": text, "add_special_tokens": False}
    try:
        response = await server.client.post(
            f"{server.target.root_url}/tokenize", json=body, timeout=_PROBE_TIMEOUT_S
        )
        if response.status_code != 200:
            return None
        data = response.json()
        count = data.get("count")
        if not isinstance(count, int):
            tokens = data.get("tokens")
            count = len(tokens) if isinstance(tokens, list) else None
        return count
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
