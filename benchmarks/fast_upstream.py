"""A minimal OpenAI-compatible streaming upstream, cheap enough that a gateway in
front of it is what a benchmark measures.

Raw asyncio, no framework: ``GET /v1/models`` and streamed ``POST
/v1/chat/completions`` (and ``/v1/completions``) answering ``max_tokens``
chunks of one word each, one every ``--token-ms`` milliseconds per stream
(a paced engine; 0 streams as fast as the socket takes them), then a usage
chunk and ``[DONE]``. Every chunk is rendered once at start-up.

    python -m benchmarks.fast_upstream --port 9100 --token-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

MODEL = "fast"
WORD = "tok "


def _chunk(obj: dict[str, object]) -> bytes:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _events(chat: bool) -> tuple[bytes, bytes, bytes]:
    head = {"id": "fast-1", "created": int(time.time()), "model": MODEL}
    if chat:
        head["object"] = "chat.completion.chunk"
        first = _chunk(
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
        token = _chunk(
            {**head, "choices": [{"index": 0, "delta": {"content": WORD}, "finish_reason": None}]}
        )
    else:
        head["object"] = "text_completion"
        first = b""
        token = _chunk({**head, "choices": [{"index": 0, "text": WORD, "finish_reason": None}]})
    return first, token, json.dumps(head).encode()


CHAT = _events(chat=True)
TEXT = _events(chat=False)
HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _finish(head: bytes, chat: bool, tokens: int, prompt: int) -> bytes:
    base = json.loads(head)
    choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
    choice.update({"delta": {}} if chat else {"text": ""})
    usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
    return (
        _chunk({**base, "choices": [choice]})
        + _chunk({**base, "choices": [], "usage": usage})
        + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    )


async def _stream(
    writer: asyncio.StreamWriter, body: dict[str, object], chat: bool, pace: float
) -> None:
    first, token, head = CHAT if chat else TEXT
    tokens = int(body.get("max_tokens") or 16)  # type: ignore[call-overload]
    prompt = len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4 + 1
    writer.write(HEADERS + first)
    for _ in range(tokens):
        if pace:
            await asyncio.sleep(pace)
        writer.write(token)
        await writer.drain()
    writer.write(_finish(head, chat, tokens, prompt))
    await writer.drain()


def _json(status: str, obj: object) -> bytes:
    data = json.dumps(obj).encode()
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status.encode(),
        len(data),
        data,
    )


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pace: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            raw = await reader.readexactly(length) if length else b""
            if method == "GET" and path.rstrip("/").endswith("/models"):
                writer.write(
                    _json(
                        "200 OK",
                        {
                            "object": "list",
                            "data": [{"id": MODEL, "object": "model", "max_model_len": 32768}],
                        },
                    )
                )
            elif method == "POST" and path.endswith(("/chat/completions", "/completions")):
                await _stream(writer, json.loads(raw), path.endswith("/chat/completions"), pace)
            else:
                writer.write(
                    _json(
                        "404 Not Found",
                        {
                            "error": {
                                "message": "not found",
                                "type": "invalid_request_error",
                                "param": None,
                                "code": None,
                            }
                        },
                    )
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, pace: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, pace), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--token-ms", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.token_ms / 1000))
