"""A scripted OpenAI-compatible server for gateway tests: a real HTTP server process.

Run it as ``python -m tests.scripted_upstream --port N [--model NAME[:MAX_LEN]]...``;
tests drive it through ``ScriptedUpstream`` (``start_scripted_upstream``).

Control endpoints:

    POST /_script    {"scripts": [...]}: queued; each /v1/chat/completions or
                     /v1/completions request takes the first script whose "model"
                     (if any) is its model; with none queued it streams normally
    GET  /_requests  every generation request: path, model, body, headers, when it
                     came, and when the client closed it early (client_closed_at,
                     null when the response completed first)
    POST /_config    {"models": {"m": 4096}, "tokenize": "vllm"|"llama"|"none",
                     "models_status": 200}
    POST /_reset     scripts and records cleared, configuration back to the start

A script is one of:

    {"status": 503, "body": {...} or "text", "headers": {...}, "delay_headers": s}
    {"raw": ["data: ...\\n\\n", {"sleep": 0.1}, ...], "end": "close"|"reset"}
    a normal stream with quirks (all optional):
      words            the content pieces (default: "You said: <last user message>",
                       or "Continuing: <prompt>", in whitespace-led words)
      finish_reason    "stop" (or "length" when max_tokens cut the words)
      usage            "separate" (a chunk of its own, when the request asked for
                       usage) | "every" (cumulative, on every chunk) | "finish"
                       (in the finishing chunk) | "none"
      cached_tokens, prompt_tokens   reported in usage
      role_every_chunk, no_role      the role in every delta / never
      pings            a ": ping" comment before every event
      event_field      an "event: <name>" line in every event
      crlf             CRLF line endings
      done             false: no [DONE]
      chunk_extra, delta_extra, choice_extra   fields merged into every content chunk
      delay_first, delay   seconds before the first event / between events
      chunk_size       write the body in pieces of this many bytes
      die_after N      after N content events, drop the connection (no finish)
      eof_after N      after N content events, end the body cleanly (no finish)
      error_after N    after N content events, an error event, then end
      stall_after N    after N content events, send nothing until the client leaves
      pings_after N    after N content events, ": ping" every 50 ms until the client leaves
      error_first      an error object (or true) as the first event, then end
      ping_only        ": ping" every 50 ms until the client leaves
      end              "close" (default) | "reset": how the body ends
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.e2e.server import free_port

ROOT = Path(__file__).resolve().parents[1]
WORD = re.compile(r"\s*\S+")


class DropConnection(Exception):
    """Raised after the response started: uvicorn then closes the connection abruptly."""


@dataclass
class State:
    models: dict[str, int | None]
    initial_models: dict[str, int | None]
    tokenize: str = "none"
    models_status: int = 200
    scripts: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    tokenize_calls: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.models = dict(self.initial_models)
        self.tokenize = "none"
        self.models_status = 200
        self.scripts.clear()
        self.records.clear()
        self.tokenize_calls.clear()

    def take_script(self, model: str) -> dict[str, Any]:
        for i, script in enumerate(self.scripts):
            if script.get("model") in (None, model):
                return self.scripts.pop(i)
        return {}


def words_of(text: str) -> list[str]:
    return WORD.findall(text)


def prompt_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return " ".join(str(t) for t in prompt)
    return str(prompt or "")


# -- the normal stream ----------------------------------------------------------


class Stream:
    """The events of one scripted 200 response (bytes, or control items)."""

    def __init__(self, body: dict[str, Any], script: dict[str, Any], serial: int) -> None:
        self.body = body
        self.script = script
        self.chat = "messages" in body
        self.model = body.get("model", "")
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-scripted-{serial}"
        self.newline = "\r\n" if script.get("crlf") else "\n"
        prompt = prompt_text(body)
        if "words" in script:
            words = list(script["words"])
        else:
            words = words_of(("You said: " if self.chat else "Continuing: ") + prompt)
        self.finish = script.get("finish_reason", "stop")
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens < len(words):
            words = words[:max_tokens]
            self.finish = script.get("finish_reason", "length")
        self.words = words
        self.prompt_tokens = script.get("prompt_tokens", len(words_of(prompt)))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        self.usage_mode = script.get("usage", "separate" if include else "none")
        self.sent = 0

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.sent,
            "total_tokens": self.prompt_tokens + self.sent,
        }
        if "cached_tokens" in self.script:
            usage["prompt_tokens_details"] = {"cached_tokens": self.script["cached_tokens"]}
        return usage

    def frame(self, data: Any, *, ping: bool = True) -> bytes:
        nl = self.newline
        out = ""
        if ping and self.script.get("pings"):
            out += f": ping{nl}{nl}"
        if self.script.get("event_field"):
            out += f"event: {self.script['event_field']}{nl}"
        payload = data if isinstance(data, str) else orjson.dumps(data).decode()
        return (out + f"data: {payload}{nl}{nl}").encode()

    def chunk(self, piece: str | None, finish: str | None, *, role: bool = False) -> bytes:
        script = self.script
        logprobs = self.logprobs(piece) if piece else None
        if self.chat:
            delta: dict[str, Any] = {}
            if role or script.get("role_every_chunk"):
                delta["role"] = "assistant"
            if piece is not None:
                delta["content"] = piece
                delta.update(script.get("delta_extra", {}))
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": logprobs}
            if piece is not None:
                choice.update(script.get("delta_extra", {}))
        choice["finish_reason"] = finish
        if piece is not None:
            choice.update(script.get("choice_extra", {}))
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": 1700000000,
            "model": self.model,
            "choices": [choice],
        }
        if piece is not None:
            chunk.update(script.get("chunk_extra", {}))
        if self.usage_mode == "every" or (self.usage_mode == "finish" and finish is not None):
            chunk["usage"] = self.usage()
        return self.frame(chunk)

    def logprobs(self, piece: str) -> dict[str, Any] | None:
        requested = self.body.get("logprobs")
        if not requested:
            return None
        if self.chat:
            k = int(self.body.get("top_logprobs") or 0)
            top = [
                {"token": piece, "logprob": -0.5, "bytes": list(piece.encode())},
                {"token": "x", "logprob": -2.0, "bytes": [120]},
            ][:k]
            entry = {
                "token": piece,
                "logprob": -0.5,
                "bytes": list(piece.encode()),
                "top_logprobs": top,
            }
            return {"content": [entry]}
        alternatives = dict(list({"x": -2.0, piece: -0.5}.items())[: int(requested)])
        return {
            "tokens": [piece],
            "token_logprobs": [-0.5],
            "top_logprobs": [alternatives],
            "text_offset": [0],
        }

    def error_event(self, error: Any) -> bytes:
        if not isinstance(error, dict):
            error = {
                "error": {
                    "message": "scripted failure",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        return self.frame(error)

    async def events(self) -> AsyncIterator[Any]:
        script = self.script
        if script.get("delay_first"):
            yield ("sleep", script["delay_first"])
        if script.get("ping_only"):
            yield ("pings_forever",)
            return
        if script.get("error_first"):
            yield self.error_event(script["error_first"])
            return
        if self.chat and not script.get("no_role"):
            yield self.chunk(None, None, role=True)
        for piece in self.words:
            for key, action in (
                ("die_after", ("reset",)),
                ("eof_after", ("end",)),
                ("error_after", ("error",)),
                ("stall_after", ("stall",)),
                ("pings_after", ("pings_forever",)),
            ):
                if script.get(key) == self.sent:
                    if action == ("error",):
                        yield self.error_event(script.get("error"))
                        yield ("end",)
                    else:
                        yield action
                    return
            if script.get("delay"):
                yield ("sleep", script["delay"])
            self.sent += 1
            yield self.chunk(piece, None)
        if script.get("delay"):
            yield ("sleep", script["delay"])
        yield self.chunk(None, self.finish)
        if self.usage_mode == "separate":
            yield self.frame(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": 1700000000,
                    "model": self.model,
                    "choices": [],
                    "usage": self.usage(),
                }
            )
        if script.get("done", True):
            yield self.frame("[DONE]", ping=False)


async def raw_events(script: dict[str, Any]) -> AsyncIterator[Any]:
    for item in script["raw"]:
        if isinstance(item, dict) and "sleep" in item:
            yield ("sleep", item["sleep"])
        else:
            yield str(item).encode()


# -- the ASGI app ---------------------------------------------------------------


class ScriptedApp:
    def __init__(self, state: State) -> None:
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path = scope["method"], scope["path"]
        if path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            await self.generate(scope, orjson.loads(body or b"{}"), receive, send)
        elif path == "/v1/models" and method == "GET":
            await self.models(send)
        elif path == "/tokenize" and method == "POST":
            await self.tokenize(orjson.loads(body or b"{}"), send)
        elif path == "/_script" and method == "POST":
            self.state.scripts.extend(orjson.loads(body)["scripts"])
            await respond(send, 200, {"queued": len(self.state.scripts)})
        elif path == "/_requests" and method == "GET":
            await respond(
                send,
                200,
                {"requests": self.state.records, "tokenize": self.state.tokenize_calls},
            )
        elif path == "/_config" and method == "POST":
            config = orjson.loads(body)
            if "models" in config:
                self.state.models = config["models"]
            self.state.tokenize = config.get("tokenize", self.state.tokenize)
            self.state.models_status = config.get("models_status", self.state.models_status)
            await respond(send, 200, {"ok": True})
        elif path == "/_reset" and method == "POST":
            self.state.reset()
            await respond(send, 200, {"ok": True})
        else:
            await respond(send, 404, {"error": {"message": f"no route {path}"}})

    async def models(self, send: Any) -> None:
        if self.state.models_status != 200:
            await respond(send, self.state.models_status, {"error": {"message": "down"}})
            return
        data = []
        for name, max_len in self.state.models.items():
            entry: dict[str, Any] = {"id": name, "object": "model", "owned_by": "scripted"}
            if max_len is not None:
                entry["max_model_len"] = max_len
            data.append(entry)
        await respond(send, 200, {"object": "list", "data": data})

    async def tokenize(self, body: dict[str, Any], send: Any) -> None:
        mode = self.state.tokenize
        self.state.tokenize_calls.append(body)
        if mode == "vllm":
            if "messages" in body:
                count = sum(len(words_of(str(m.get("content", "")))) for m in body["messages"])
                count += 10  # the scripted "template"
            else:
                count = len(words_of(str(body.get("prompt", ""))))
            await respond(send, 200, {"count": count, "tokens": list(range(count))})
        elif mode == "llama":
            count = len(words_of(str(body.get("content", ""))))
            await respond(send, 200, {"tokens": list(range(count))})
        else:
            await respond(send, 404, {"detail": "Not Found"})

    async def generate(
        self, scope: dict[str, Any], body: dict[str, Any], receive: Any, send: Any
    ) -> None:
        state = self.state
        model = str(body.get("model", ""))
        script = state.take_script(model)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        record: dict[str, Any] = {
            "serial": len(state.records),
            "path": scope["path"],
            "model": model,
            "body": body,
            "headers": headers,
            "received_at": time.time(),
            "client_closed_at": None,
            "completed_at": None,
        }
        state.records.append(record)
        if script.get("delay_headers"):
            await asyncio.sleep(script["delay_headers"])
        if "status" in script:
            content = script.get("body", {"error": {"message": "scripted"}})
            await respond(send, script["status"], content, script.get("headers", {}))
            record["completed_at"] = time.time()
            return
        events = raw_events(script) if "raw" in script else Stream(body, script, record["serial"])
        items = events if not isinstance(events, Stream) else events.events()
        sender = asyncio.ensure_future(self.send_stream(items, script, record, send))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if record["completed_at"] is None:
                        record["client_closed_at"] = time.time()
                    return

        watcher = asyncio.ensure_future(watch())
        await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not sender.done():
            sender.cancel()
        watcher.cancel()
        for task in (sender, watcher):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def send_stream(
        self,
        items: AsyncIterator[Any],
        script: dict[str, Any],
        record: dict[str, Any],
        send: Any,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        size = script.get("chunk_size")
        async for item in items:
            if isinstance(item, bytes):
                pieces = [item[i : i + size] for i in range(0, len(item), size)] if size else [item]
                for piece in pieces:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    if size:
                        await asyncio.sleep(0.002)
            elif item[0] == "sleep":
                await asyncio.sleep(item[1])
            elif item[0] == "pings_forever":
                while True:
                    await send(
                        {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}
                    )
                    await asyncio.sleep(0.05)
            elif item[0] == "stall":
                await asyncio.sleep(3600)
            elif item[0] == "reset":
                raise DropConnection("scripted connection drop")
            elif item[0] == "end":
                break
        if script.get("end") == "reset":
            raise DropConnection("scripted connection drop")
        record["completed_at"] = time.time()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def respond(
    send: Any, status: int, content: Any, headers: dict[str, str] | None = None
) -> None:
    if isinstance(content, str):
        raw, kind = content.encode(), b"text/plain; charset=utf-8"
    else:
        raw, kind = orjson.dumps(content), b"application/json"
    header_list = [(b"content-type", kind), (b"content-length", str(len(raw)).encode())]
    header_list += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


def parse_models(specs: list[str]) -> dict[str, int | None]:
    models: dict[str, int | None] = {}
    for spec in specs:
        name, _, max_len = spec.partition(":")
        models[name] = int(max_len) if max_len else None
    return models


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[])
    args = parser.parse_args(argv)
    models = parse_models(args.model or ["scripted-model:4096"])
    state = State(models=dict(models), initial_models=dict(models))
    uvicorn.run(
        ScriptedApp(state),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


# -- what tests use -------------------------------------------------------------


@dataclass
class ScriptedUpstream:
    """A running scripted server, and its control endpoints."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def script(self, *scripts: dict[str, Any]) -> None:
        httpx.post(f"{self.root_url}/_script", json={"scripts": list(scripts)}).raise_for_status()

    def configure(self, **config: Any) -> None:
        httpx.post(f"{self.root_url}/_config", json=config).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.root_url}/_reset").raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.root_url}/_requests")
        response.raise_for_status()
        return list(response.json()["requests"])

    def tokenize_calls(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.root_url}/_requests").json()["tokenize"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_scripted_upstream(*models: str, timeout: float = 30.0) -> ScriptedUpstream:
    """Start ``python -m tests.scripted_upstream`` on a free port; wait until it answers."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="scripted-upstream-", suffix=".log")[1])
    args = [arg for model in models for arg in ("--model", model)]
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.scripted_upstream", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ScriptedUpstream(process, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"scripted upstream exited:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/models", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"scripted upstream did not start:\n{server.log()}")


if __name__ == "__main__":
    main()
