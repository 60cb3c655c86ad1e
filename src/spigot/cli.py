"""The ``spigot`` command: serve, complete, chat, bench."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

import click

from spigot import __version__
from spigot.admin_cli import keys, usage
from spigot.bench.standard import standard as bench_standard


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spigot")
def main() -> None:
    """OpenAI-compatible streaming completions from local models."""


# -- serve ---------------------------------------------------------------------


@main.command()
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
def serve(
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
    verbose_llama: bool,
) -> None:
    """Serve models over the OpenAI API, streaming included."""
    from spigot.config import Settings
    from spigot.engine.async_engine import EngineOptions
    from spigot.models import (
        EMBEDDED_MODEL_ID,
        ModelNotFound,
        ModelSpec,
        embedded_model_path,
        parse_model_arg,
    )
    from spigot.server import run

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
        if not sep or target not in ids:
            raise click.UsageError(f"--alias {arg!r}: expected PATTERN=NAME with NAME one of {ids}")
        aliases.append((pattern, target))
    if require_auth and not metering:
        raise click.UsageError("--require-auth needs metering (keys live in --db)")
    detach_seconds = _parse_on_disconnect(on_disconnect)
    if redis_url is not None and detach_seconds is None:
        raise click.UsageError("--redis holds resumable streams: it needs --on-disconnect detach=N")
    from spigot.http_limits import ConnectionLimits

    settings = Settings(
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
        guard=_load_policy(guard_file) if guard_file is not None else None,
        db=db if metering else None,
        prices=_load_prices(prices_file),
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
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from spigot.metering import StoreError

    try:
        run(settings, verbose_llama=verbose_llama)
    except StoreError as exc:
        raise click.ClickException(f"--db: {exc}") from None


def _parse_on_disconnect(value: str) -> float | None:
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


def _load_prices(path: Path | None) -> Any:
    from spigot.metering.prices import PriceError, PriceTable

    if path is None:
        return PriceTable()
    try:
        return PriceTable.from_file(path)
    except PriceError as exc:
        raise click.ClickException(str(exc)) from None


def _load_policy(path: Path) -> Any:
    from spigot.guard import Policy, PolicyError

    try:
        return Policy.from_file(path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None


# -- keys and usage ------------------------------------------------------------

main.add_command(keys)
main.add_command(usage)


# -- guard ---------------------------------------------------------------------


@main.group()
def guard() -> None:
    """Guardrail policies: check them, and try them on text."""


@guard.command("check")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--import-plugins",
    is_flag=True,
    help="Also import the policy's plug-ins (this runs their code, as serving does).",
)
def guard_check(policy_file: Path, import_plugins: bool) -> None:
    """Check a policy and list its rules; exits 1 with the reason when it is invalid.

    Plug-ins are named, not imported, unless --import-plugins says so: checking a
    file must not run code from it.
    """
    from spigot.guard import PolicyError
    from spigot.guard.policy import rules_from_file

    if import_plugins:
        rules = list(_load_policy(policy_file).rules)
    else:
        try:
            rules = rules_from_file(policy_file)
        except PolicyError as exc:
            raise click.ClickException(str(exc)) from None
    for rule in rules:
        click.echo(f"{rule.id}\t{rule.kind}\t{rule.action}\t{','.join(sorted(rule.applies_to))}")
    plugins = sum(rule.kind == "plugin" for rule in rules)
    note = f" ({plugins} plug-in(s) not imported)" if plugins and not import_plugins else ""
    click.echo(f"{policy_file}: {len(rules)} rule(s), valid{note}", err=True)


@guard.command("test")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("text_file", type=click.File("r", encoding="utf-8"), default="-")
@click.option(
    "--direction",
    type=click.Choice(["output", "input"]),
    default="output",
    show_default=True,
    help="Apply the policy's output rules (a reply) or its input rules (a prompt).",
)
@click.option(
    "--split",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Feed the text in deltas of this many characters, as a stream would arrive.",
)
def guard_test(policy_file: Path, text_file: Any, direction: str, split: int) -> None:
    """Run a policy over text (a file, or stdin) and show what it would redact or block.

    The guarded text goes to stdout exactly as a client would receive it; what
    tripped, and the most characters held back at once, go to stderr.
    """
    policy = _load_policy(policy_file)
    text = text_file.read()
    rules = policy.output if direction == "output" else policy.input
    guard = rules.guard()
    trips = []
    most_held = 0
    for start in range(0, len(text), split):
        released = guard.feed(text[start : start + split])
        click.echo(released.text, nl=False)
        trips += released.trips
        most_held = max(most_held, released.held)
        if released.blocked is not None:
            break
    else:
        released = guard.finish()
        click.echo(released.text, nl=False)
        trips += released.trips
    click.echo()
    for trip in trips:
        matched = text[trip.start : trip.end]
        click.echo(
            f"{trip.action:>6}  {trip.rule_id}  chars {trip.start}-{trip.end}  {matched!r}",
            err=True,
        )
    if guard.blocked is not None:
        click.echo(f"blocked by {guard.blocked.rule_id} at char {guard.blocked.start}", err=True)
    click.echo(
        f"{len(trips)} trip(s); at most {most_held} character(s) held back at once", err=True
    )


# -- clients -------------------------------------------------------------------

_client_options = [
    click.option(
        "--base-url",
        default=None,
        help="Default: $SPIGOT_BASE_URL, $OPENAI_BASE_URL or http://127.0.0.1:8000/v1.",
    ),
    click.option("--api-key", default=None, envvar=["SPIGOT_API_KEY", "OPENAI_API_KEY"]),
    click.option("--model", default=None, help="Default: the server's first model."),
    click.option("--max-tokens", default=None, type=click.IntRange(1)),
    click.option("--temperature", default=None, type=click.FloatRange(0, 2)),
]


def client_options(fn: Any) -> Any:
    for option in reversed(_client_options):
        fn = option(fn)
    return fn


def _first_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=10)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise click.ClickException(f"could not list models at {base_url}: {exc}") from None


def _sampling(max_tokens: int | None, temperature: float | None) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if temperature is not None:
        payload["temperature"] = temperature
    return payload


@main.command()
@click.argument("prompt")
@client_options
def complete(
    prompt: str,
    base_url: str | None,
    api_key: str | None,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
) -> None:
    """Stream a text completion of PROMPT to stdout as it arrives."""
    from spigot.client import APIError, StreamingClient, default_base_url

    base_url = base_url or default_base_url()
    model = model or _first_model(base_url, api_key)
    payload = {"model": model, "prompt": prompt, **_sampling(max_tokens or 256, temperature)}
    with StreamingClient(base_url, api_key) as client:
        try:
            for event in client.stream("/completions", payload):
                for choice in event.get("choices", []):
                    sys.stdout.write(choice.get("text") or "")
                    sys.stdout.flush()
        except APIError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            pass
    sys.stdout.write("\n")


@main.command()
@click.option("--system", default=None, help="A system message to start the conversation with.")
@client_options
def chat(
    system: str | None,
    base_url: str | None,
    api_key: str | None,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
) -> None:
    """Interactive chat that streams each reply. Ctrl-C stops a reply; Ctrl-D quits."""
    from spigot.client import APIError, StreamingClient, default_base_url

    base_url = base_url or default_base_url()
    model = model or _first_model(base_url, api_key)
    history: list[dict[str, str]] = []
    if system:
        history.append({"role": "system", "content": system})
    click.echo(f"spigot chat with {model} at {base_url}. Ctrl-C stops a reply, Ctrl-D quits.")
    with StreamingClient(base_url, api_key) as client:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            payload = {"model": model, "messages": history, **_sampling(max_tokens, temperature)}
            reply: list[str] = []
            try:
                for event in client.stream("/chat/completions", payload):
                    for choice in event.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        reply.append(piece)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                sys.stdout.write("\n")
            except KeyboardInterrupt:
                # Leaving the stream closes the connection: the server stops generating.
                sys.stdout.write(" [stopped]\n")
            except APIError as exc:
                click.echo(f"error: {exc}", err=True)
                history.pop()
                continue
            history.append({"role": "assistant", "content": "".join(reply)})


# -- bench ---------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Benchmark OpenAI-compatible streaming servers (spigot, vLLM, llama.cpp, ...)."""


bench.add_command(bench_standard)


def _positive_ints(value: str, expected: str) -> tuple[int, ...]:
    """Comma-separated positive integers, or a usage error saying ``expected``."""
    try:
        numbers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(expected)
    return numbers


def _levels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    levels = _positive_ints(value, "expected positive integers such as 1,2,4,8")
    return tuple(dict.fromkeys(levels))  # each level once, in the order given


def _request_counts(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    counts = _positive_ints(value, "expected a positive integer, or one per level such as 10,16")
    return counts[0] if len(counts) == 1 else counts


def _url_name(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


@bench.command("run")
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="The server's OpenAI base URL. Default: $SPIGOT_BASE_URL, $OPENAI_BASE_URL or "
    "http://127.0.0.1:8000/v1.",
)
@click.option("--model", default=None, help="Model to request. Default: the first one listed.")
@click.option("--api-key", default=None, envvar=["SPIGOT_API_KEY", "OPENAI_API_KEY"])
@click.option("--name", default=None, help="The server's name in tables. Default: host:port.")
@click.option(
    "--concurrency",
    "-c",
    default="1,2,4,8",
    show_default=True,
    callback=_levels,
    help="Comma-separated levels: that many workers send requests back to back.",
)
@click.option(
    "--requests",
    "-n",
    default=None,
    callback=_request_counts,
    help="Requests per level: one count, or one per level (-c 1,8 -n 10,16). "
    "Default: 4 per worker (unless --duration).",
)
@click.option(
    "--duration",
    "-d",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds per level instead of a request count; requests started in time finish.",
)
@click.option(
    "--workload",
    type=click.Choice(["mixed", "long", "shared-prefix"]),
    default="mixed",
    show_default=True,
    help="mixed: the shipped prompt set (short questions to multi-paragraph tasks); "
    "long: synthetic 1,000-2,000-token reports; shared-prefix: one ~1,000-token system "
    "prompt and short questions.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A JSON prompt set ([{id, prompt, system?}] or {prompts: [...]}) instead of --workload.",
)
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--exact-tokens/--no-exact-tokens",
    default=True,
    show_default=True,
    help="Send ignore_eos and min_tokens = max_tokens so every request generates max_tokens "
    "(spigot, vLLM and llama.cpp honour them; OpenAI itself rejects them).",
)
@click.option(
    "--unique-prompts/--repeat-prompts",
    default=False,
    show_default=True,
    help="Open each request's first message with its own tag, so that no server answers a "
    "prompt of the set from a cache of its earlier use (the set repeats every few dozen "
    "requests). Not for --workload shared-prefix.",
)
@click.option(
    "--endpoint",
    type=click.Choice(["chat", "completions"]),
    default="chat",
    show_default=True,
    help="/chat/completions or /completions (the prompt then is system + user text).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds one request may take from send to [DONE]; later ones count as timeouts.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffles the prompt order.")
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Repeat every level; throughputs are the median of the rounds.",
)
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Untimed requests sent to each server first.",
)
@click.option(
    "--compare",
    "compare_url",
    default=None,
    metavar="URL",
    help="A second server, run interleaved level by level with the first.",
)
@click.option("--compare-name", default=None, help="The second server's name. Default: host:port.")
@click.option("--compare-model", default=None, help="Default: the second server's first model.")
@click.option("--compare-api-key", default=None, help="Default: --api-key.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the results as JSON here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG: throughput and TTFT against concurrency, one line per server.",
)
@click.option("--raw", is_flag=True, help="Also keep every request's timings in the JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def bench_run(
    url: str | None,
    model: str | None,
    api_key: str | None,
    name: str | None,
    concurrency: tuple[int, ...],
    requests: int | tuple[int, ...] | None,
    duration: float | None,
    workload: str,
    prompts_file: Path | None,
    max_tokens: int,
    exact_tokens: bool,
    unique_prompts: bool,
    endpoint: str,
    timeout: float,
    seed: int,
    rounds: int,
    warmup: int,
    compare_url: str | None,
    compare_name: str | None,
    compare_model: str | None,
    compare_api_key: str | None,
    out: Path | None,
    plot_path: Path | None,
    raw: bool,
    quiet: bool,
) -> None:
    """Stream load at each concurrency level and report TTFT, ITL, TPOT and throughput.

    Every request streams (with include_usage), greedy. Per level: TTFT
    p50/p90/p99, inter-token latency p50/p99, time per output token,
    end-to-end latency, output tokens/s and requests/s over the level's wall
    time, and errors by kind (HTTP status, in-band error event, timeout,
    connection, protocol). A markdown table is printed at the end; --out and
    --plot write JSON and PNG.

    \b
      spigot bench run -c 1,2,4,8 -n 32 --out results.json --plot results.png
      spigot bench run --workload long -d 60 --compare http://127.0.0.1:8080/v1

    Exit status: 0 when every request succeeded, 1 when any failed (the
    results are still printed and written).
    """
    import asyncio
    import json

    from spigot.bench.load import BenchConfig, Target, run_bench
    from spigot.bench.plot import plot
    from spigot.bench.progress import Progress
    from spigot.bench.report import markdown
    from spigot.bench.results import error_kinds, error_totals
    from spigot.client import default_base_url

    if requests is not None and duration is not None:
        raise click.UsageError("give --requests or --duration, not both")
    if isinstance(requests, tuple) and len(requests) != len(concurrency):
        raise click.UsageError(
            f"--requests gives {len(requests)} counts for {len(concurrency)} levels"
        )
    if compare_url is None and (compare_name or compare_model or compare_api_key):
        raise click.UsageError("--compare-name/--compare-model/--compare-api-key need --compare")
    url = url or default_base_url()
    targets = [Target(name or _url_name(url), url, model, api_key)]
    if compare_url:
        other = compare_name or _url_name(compare_url)
        if other == targets[0].name:
            raise click.UsageError("the two servers need different names (--name, --compare-name)")
        targets.append(Target(other, compare_url, compare_model, compare_api_key or api_key))
    config = BenchConfig(
        targets=tuple(targets),
        concurrency=concurrency,
        requests=requests,
        duration=duration,
        workload=workload,
        prompts_file=prompts_file,
        max_tokens=max_tokens,
        endpoint=endpoint,  # type: ignore[arg-type]
        timeout=timeout,
        seed=seed,
        rounds=rounds,
        warmup=warmup,
        exact_tokens=exact_tokens,
        unique_prompts=unique_prompts,
        raw=raw,
    )
    try:
        results = asyncio.run(run_bench(config, Progress(enabled=not quiet)))
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; no results written") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")
    if plot_path:
        plot(results, plot_path)
    click.echo(markdown(results))
    failed = False
    for server, (errors, total) in error_totals(results).items():
        if errors:
            failed = True
            kinds = error_kinds(results, server)
            click.echo(f"{server}: {errors} of {total} requests failed ({kinds})", err=True)
    if failed:
        sys.exit(1)


@bench.command("report")
@click.argument("results_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the PNG plot.",
)
def bench_report(results_file: Path, plot_path: Path | None) -> None:
    """Print the markdown tables of a results JSON written by `bench run --out`."""
    import json

    from spigot.bench.plot import plot
    from spigot.bench.report import markdown

    results = json.loads(results_file.read_text())
    if plot_path:
        plot(results, plot_path)
    click.echo(markdown(results))
