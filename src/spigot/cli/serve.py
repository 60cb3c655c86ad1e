"""``spigot serve``: its options, and the ``Settings`` they make.

Every serve option is declared here, and ``build_settings`` is the one place
that turns them into ``spigot.config.Settings``. Nothing heavy is imported at
module level: llama.cpp, FastAPI and uvicorn load when the command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from spigot.cli.guard import load_policy

if TYPE_CHECKING:
    from spigot.config import Settings


@click.command("serve")
@click.option(
    "--model",
    "model_args",
    multiple=True,
    envvar="SPIGOT_MODEL",
    metavar="[NAME=]PATH.gguf",
    help="A GGUF model to serve (repeatable). Default: the embedded SmolLM2-135M-Instruct.",
)
@click.option(
    "--alias",
    "alias_args",
    multiple=True,
    envvar="SPIGOT_ALIAS",
    metavar="PATTERN=NAME",
    help="Route requested model names matching PATTERN (fnmatch) to a served model (repeatable).",
)
@click.option(
    "--openai-aliases/--no-openai-aliases",
    default=True,
    envvar="SPIGOT_OPENAI_ALIASES",
    show_default=True,
    help="Route OpenAI model names (gpt-*, text-*, code-*, ...) to the first model.",
)
@click.option("--host", default="127.0.0.1", envvar="SPIGOT_HOST", show_default=True)
@click.option("--port", default=8000, type=int, envvar="SPIGOT_PORT", show_default=True)
@click.option(
    "--threads", default=2, type=click.IntRange(1), envvar="SPIGOT_THREADS", show_default=True
)
@click.option(
    "--ctx-size",
    default=8192,
    type=click.IntRange(256),
    envvar="SPIGOT_CTX_SIZE",
    show_default=True,
    help="Tokens in the KV pool shared by all running sequences (also each one's limit).",
)
@click.option(
    "--parallel",
    default=8,
    type=click.IntRange(1, 256),
    envvar="SPIGOT_PARALLEL",
    show_default=True,
    help="Sequences decoded together; more wait in the queue.",
)
@click.option(
    "--max-queue",
    default=64,
    type=click.IntRange(0),
    envvar="SPIGOT_MAX_QUEUE",
    show_default=True,
    help="Sequences allowed to wait; beyond that requests get 503.",
)
@click.option(
    "--batch-tokens",
    default=512,
    type=click.IntRange(1),
    envvar="SPIGOT_BATCH_TOKENS",
    show_default=True,
    help="Most tokens in one decode step.",
)
@click.option(
    "--prefill-chunk",
    default=256,
    type=click.IntRange(1),
    envvar="SPIGOT_PREFILL_CHUNK",
    show_default=True,
    help="Most prompt tokens processed per step while no other sequence is decoding.",
)
@click.option(
    "--prefill-chunk-decoding",
    default=256,
    type=click.IntRange(1),
    envvar="SPIGOT_PREFILL_CHUNK_DECODING",
    show_default=True,
    help="Most prompt tokens per step while other sequences decode.",
)
@click.option(
    "--prefill-slowdown",
    default=3.0,
    type=click.FloatRange(min=0),
    envvar="SPIGOT_PREFILL_SLOWDOWN",
    show_default=True,
    help="While streams decode, prompt tokens join a step until it takes about this many "
    "times a decode-only step (timed as the server runs), so their streams stay smooth; "
    "0 turns the time budget off.",
)
@click.option(
    "--prefix-cache/--no-prefix-cache",
    default=True,
    envvar="SPIGOT_PREFIX_CACHE",
    show_default=True,
    help="Reuse the KV of a shared prompt prefix across requests (reported as cached_tokens).",
)
@click.option(
    "--prefix-cache-tokens",
    default=0,
    type=click.IntRange(0),
    envvar="SPIGOT_PREFIX_CACHE_TOKENS",
    show_default=True,
    help="KV tokens that cached prefixes may hold beyond the newest finished sequence's. "
    "Each decode step attends over them, so more keeps more distinct prefixes warm at a "
    "cost in speed.",
)
@click.option(
    "--prefix-cache-ram",
    default=96,
    type=click.IntRange(0),
    envvar="SPIGOT_PREFIX_CACHE_RAM",
    show_default=True,
    metavar="MIB",
    help="Host memory for prefixes evicted from the KV pool: a later prompt that starts "
    "the same way copies its KV back instead of computing it. 0 turns it off.",
)
@click.option(
    "--prefix-cache-scope",
    default="key",
    type=click.Choice(["key", "shared"]),
    envvar="SPIGOT_PREFIX_CACHE_SCOPE",
    show_default=True,
    help="key: a request reuses only prefixes sent with its own API key (keyless requests "
    "share one scope), so cached_tokens and time to first token reveal nothing about "
    "other keys' prompts. shared: reuse across keys, for single-tenant deployments.",
)
@click.option(
    "--special-tokens-in-content",
    is_flag=True,
    envvar="SPIGOT_SPECIAL_TOKENS_IN_CONTENT",
    help="Let special-token text in chat messages ('<|im_end|>') become special tokens. "
    "Off: it is plain text, so a user cannot forge system or assistant turns. Only for "
    "trusted clients.",
)
@click.option(
    "--guard",
    "guard_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPIGOT_GUARD",
    metavar="FILE.toml",
    help="Guardrail policy for prompts and replies (see docs/guard.md).",
)
@click.option(
    "--db",
    default="spigot.db",
    envvar="SPIGOT_DB",
    show_default=True,
    metavar="PATH|postgresql://...",
    help="Where API keys, the usage ledger and rate limits live: a SQLite file, or PostgreSQL "
    "shared by several servers.",
)
@click.option(
    "--metering/--no-metering",
    default=True,
    envvar="SPIGOT_METERING",
    show_default=True,
    help="Keys, ledger, budgets and rate limits. Off: no database, no keys, nothing recorded.",
)
@click.option(
    "--prices",
    "prices_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPIGOT_PRICES",
    metavar="FILE.toml",
    help="Price per million prompt, cached and completion tokens, per model (docs/metering.md).",
)
@click.option(
    "--require-auth",
    is_flag=True,
    envvar="SPIGOT_REQUIRE_AUTH",
    help="Refuse requests without a valid key even before any key exists.",
)
@click.option(
    "--max-body-size",
    default=8,
    type=click.IntRange(1, 1024),
    envvar="SPIGOT_MAX_BODY_SIZE",
    show_default=True,
    metavar="MIB",
    help="Largest request body read; larger ones get 413 before the rest arrives.",
)
@click.option(
    "--max-messages",
    default=2048,
    type=click.IntRange(1),
    envvar="SPIGOT_MAX_MESSAGES",
    show_default=True,
    help="Most messages in one chat request.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    envvar="SPIGOT_CORS_ORIGIN",
    metavar="ORIGIN",
    help="A browser origin (https://app.example) allowed to call the API (repeatable; "
    "'*' for any). Default: none, browsers on other origins cannot read responses.",
)
@click.option(
    "--shutdown-grace",
    default=30.0,
    type=click.FloatRange(0),
    envvar="SPIGOT_SHUTDOWN_GRACE",
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM, running streams get this long to finish; then each ends with an error "
    "event and is billed for what it used, and the server exits.",
)
@click.option(
    "--on-disconnect",
    default="cancel",
    envvar="SPIGOT_ON_DISCONNECT",
    show_default=True,
    metavar="cancel|detach=SECONDS",
    help="When a streaming client vanishes: cancel its generation, or keep it running for "
    "SECONDS so the same key can resume it with Last-Event-ID (docs/resume.md).",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    envvar="SPIGOT_REDIS",
    metavar="redis://HOST:PORT/DB",
    help="Keep resumable streams' events in Redis, so a client may resume on any replica. "
    "Default: in this process's memory.",
)
@click.option(
    "--max-connections",
    default=1000,
    type=click.IntRange(1),
    envvar="SPIGOT_MAX_CONNECTIONS",
    show_default=True,
    help="Open client connections; beyond it new ones get 503 at once and are closed. "
    "Kept below the open-file limit (raised to its hard limit at startup).",
)
@click.option(
    "--header-timeout",
    default=10.0,
    type=click.FloatRange(0, min_open=True),
    envvar="SPIGOT_HEADER_TIMEOUT",
    show_default=True,
    metavar="SECONDS",
    help="A request's whole head must arrive within this of connecting or of the previous "
    "response (slowloris); else 408 and closed.",
)
@click.option(
    "--idle-timeout",
    default=5.0,
    type=click.FloatRange(0, min_open=True),
    envvar="SPIGOT_IDLE_TIMEOUT",
    show_default=True,
    metavar="SECONDS",
    help="A connection silent this long, after connecting or after a response, is closed.",
)
@click.option(
    "--body-timeout",
    default=30.0,
    type=click.FloatRange(0, min_open=True),
    envvar="SPIGOT_BODY_TIMEOUT",
    show_default=True,
    metavar="SECONDS",
    help="A request's whole body must arrive within this of its head; else 408 and closed.",
)
@click.option(
    "--max-header-size",
    default=32,
    type=click.IntRange(1, 1024),
    envvar="SPIGOT_MAX_HEADER_SIZE",
    show_default=True,
    metavar="KIB",
    help="Largest request line and headers together; larger ones get 431.",
)
@click.option("--log-level", default="info", envvar="SPIGOT_LOG_LEVEL", show_default=True)
@click.option(
    "--verbose-llama", is_flag=True, envvar="SPIGOT_VERBOSE_LLAMA", help="Show llama.cpp logs."
)
@click.option(
    "--upstream",
    "upstream_args",
    multiple=True,
    envvar="SPIGOT_UPSTREAM",
    metavar="[NAME=]URL",
    help="An OpenAI-compatible server (vLLM, llama-server, another spigot): every model it "
    "lists is served under its own name (repeatable). See docs/gateway.md.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPIGOT_CONFIG",
    metavar="FILE.toml",
    help="Upstreams, models and any of these options, from a TOML file (flags win). "
    "See docs/gateway.md.",
)
def serve(
    verbose_llama: bool,
    upstream_args: tuple[str, ...],
    config_path: Path | None,
    **options: Any,
) -> None:
    """Serve models over the OpenAI API, streaming included."""
    from spigot.cli.serve_config import read_gateway, with_gateway

    try:
        from spigot.server import run
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"spigot serve needs the server's packages ({exc.name} is missing): "
            "pip install 'spigot[serve]'"
        ) from None

    gateway = read_gateway(click.get_current_context(), config_path, upstream_args, options)
    settings = build_settings(**options, gateway_models=gateway.model_names())
    settings = with_gateway(settings, gateway, model_flags=bool(options["model_args"]))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from spigot.config_file import ConfigError
    from spigot.metering import StoreError

    try:
        run(settings, verbose_llama=verbose_llama)
    except StoreError as exc:
        raise click.ClickException(f"--db: {exc}") from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def build_settings(
    *,
    model_args: tuple[str, ...],
    alias_args: tuple[str, ...],
    openai_aliases: bool,
    host: str,
    port: int,
    threads: int,
    ctx_size: int,
    parallel: int,
    max_queue: int,
    batch_tokens: int,
    prefill_chunk: int,
    prefill_chunk_decoding: int,
    prefill_slowdown: float,
    prefix_cache: bool,
    prefix_cache_tokens: int,
    prefix_cache_ram: int,
    prefix_cache_scope: Literal["key", "shared"],
    special_tokens_in_content: bool,
    guard_file: Path | None,
    db: str,
    metering: bool,
    prices_file: Path | None,
    require_auth: bool,
    max_body_size: int,
    max_messages: int,
    cors_origins: tuple[str, ...],
    shutdown_grace: float,
    on_disconnect: str,
    redis_url: str | None,
    max_connections: int,
    header_timeout: float,
    idle_timeout: float,
    body_timeout: float,
    max_header_size: int,
    log_level: str,
    gateway_models: tuple[str, ...] = (),
) -> Settings:
    """The server's settings from serve's options (all but ``--verbose-llama``).

    Raises a click usage error, naming the option, for what is inconsistent.
    """
    from spigot.config import Settings
    from spigot.engine.llamacpp.engine import EngineOptions
    from spigot.models import (
        EMBEDDED_MODEL_ID,
        ModelNotFound,
        ModelSpec,
        embedded_model_path,
        parse_model_arg,
    )

    try:
        if model_args:
            specs = tuple(parse_model_arg(m) for m in model_args)
        else:
            specs = (ModelSpec(EMBEDDED_MODEL_ID, embedded_model_path()),)
    except ModelNotFound as exc:
        raise click.UsageError(str(exc)) from None
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise click.UsageError(f"model names must be unique, got {ids}")
    aliases: list[tuple[str, str]] = []
    for arg in alias_args:
        pattern, sep, target = arg.partition("=")
        served = [*ids, *gateway_models] if gateway_models else ids
        if not sep or target not in served:
            raise click.UsageError(
                f"--alias {arg!r}: expected PATTERN=NAME with NAME one of {served}"
            )
        aliases.append((pattern, target))
    if require_auth and not metering:
        raise click.UsageError("--require-auth needs metering (keys live in --db)")
    detach_seconds = parse_on_disconnect(on_disconnect)
    if redis_url is not None and detach_seconds is None:
        raise click.UsageError("--redis holds resumable streams: it needs --on-disconnect detach=N")
    from spigot.http_limits import ConnectionLimits

    return Settings(
        connections=ConnectionLimits(
            max_connections=max_connections,
            header_timeout=header_timeout,
            idle_timeout=idle_timeout,
            body_timeout=body_timeout,
            max_header_bytes=max_header_size * 1024,
        ),
        max_body_bytes=max_body_size * 2**20,
        max_messages=max_messages,
        cors_origins=cors_origins,
        shutdown_grace=shutdown_grace,
        detach_seconds=detach_seconds,
        redis_url=redis_url,
        guard=load_policy(guard_file) if guard_file is not None else None,
        db=db if metering else None,
        prices=load_prices(prices_file),
        require_auth=require_auth,
        models=specs,
        engine=EngineOptions(
            n_ctx=ctx_size,
            parallel=parallel,
            max_queue=max_queue,
            threads=threads,
            batch_tokens=max(batch_tokens, parallel),
            prefill_chunk=prefill_chunk,
            prefill_chunk_decoding=prefill_chunk_decoding,
            prefill_slowdown=prefill_slowdown,
            prefix_cache=prefix_cache,
            prefix_cache_tokens=prefix_cache_tokens,
            prefix_cache_ram_mb=prefix_cache_ram,
            prefix_cache_scope=prefix_cache_scope,
            special_tokens_in_content=special_tokens_in_content,
        ),
        host=host,
        port=port,
        openai_aliases=openai_aliases,
        aliases=tuple(aliases),
        log_level=log_level,
    )


def parse_on_disconnect(value: str) -> float | None:
    """``cancel`` -> None; ``detach=SECONDS`` -> SECONDS (0 < SECONDS <= 3600)."""
    if value == "cancel":
        return None
    name, _, seconds = value.partition("=")
    try:
        detach = float(seconds)
    except ValueError:
        detach = -1.0
    if name != "detach" or not 0 < detach <= 3600:
        raise click.BadParameter(
            f"{value!r}: expected 'cancel' or 'detach=SECONDS' (0 < SECONDS <= 3600)",
            param_hint="--on-disconnect",
        )
    return detach


def load_prices(path: Path | None) -> Any:
    from spigot.metering.prices import PriceError, PriceTable

    if path is None:
        return PriceTable()
    try:
        return PriceTable.from_file(path)
    except PriceError as exc:
        raise click.ClickException(str(exc)) from None
