"""The ``spigot`` command: serve, complete, chat."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from spigot import __version__


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
    help="Most prompt tokens processed per step, so long prompts do not stall running streams.",
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
    settings = Settings(
        models=specs,
        engine=EngineOptions(
            n_ctx=ctx_size,
            parallel=parallel,
            max_queue=max_queue,
            threads=threads,
            batch_tokens=max(batch_tokens, parallel),
            prefill_chunk=prefill_chunk,
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
    run(settings, verbose_llama=verbose_llama)


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
