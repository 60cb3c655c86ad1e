"""``spigot complete`` and ``spigot chat``: streaming clients of any OpenAI-compatible server."""

from __future__ import annotations

import sys
from typing import Any

import click

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


@click.command("complete")
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


@click.command("chat")
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
