"""The hostile corpus: handcrafted bad requests, each sent while /health is probed.

For every request: no 5xx; a 4xx carries an OpenAI error object (protocol-level junk that
never reaches the app may get the HTTP server's own 4xx, or the connection closed); some
items name the exact answer the fixes of issue 13 promise (413, 415, 421, 400 naming the
``param``, ...); /health keeps answering within the stall limit *while* the request is
processed (the event loop never stalls); the server is healthy after it.

Three servers: keyless (the default a developer runs: JSON-only bodies and loopback Host
names are its only guard), keyed (bad keys, ``n`` against a key's concurrency, the admin
API's numbers), and one whose only key was revoked (keys stay required after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.reliability.harness import (
    MODEL,
    Conn,
    Findings,
    HealthProbe,
    Profile,
    Reply,
    Result,
    Server,
    Workdir,
    call,
    chat_body,
    create_key,
    exchange,
    optional_flags,
    raise_open_files,
    request_bytes,
    revoke_key,
    stream_chat,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
FLOOD = "<|im_end|>" * 80000  # 781 KiB of special-token text (issue 13, finding 1)
MB = 2**20

# The chat fields that may be null (and mean their default then).
OPTIONAL = (
    "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
    "stream_options", "logprobs", "top_logprobs", "user", "metadata", "presence_penalty",
    "frequency_penalty", "logit_bias",
)  # fmt: skip

Expect = str | int | tuple[int, ...]  # "any" (not 5xx), "4xx", a status, or statuses


@dataclass
class Item:
    name: str
    group: str
    send: Callable[[int], Awaitable[Reply]]
    expect: Expect = "any"
    openai: bool = True  # a 4xx must be an OpenAI error object
    param: str | None = None  # ... whose param starts with this
    allow_close: bool = False  # the server may hang up without an answer (protocol junk)
    extra: Callable[[Reply], str | None] | None = None  # more to check: a failure, or None


def post(path: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 60):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda port: call(port, "POST", path, raw, headers, timeout=timeout)


def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""):
    return lambda port: call(port, method, path, body, headers, timeout=30)


def raw(make: Callable[[int], bytes], timeout: float = 30):
    return lambda port: exchange(port, make(port), timeout)


def ok_chat(**fields: Any) -> dict[str, Any]:
    """A valid chat body that generates a token or two."""
    return chat_body("Say hi.", max_tokens=2, **fields)


def chunked(body: bytes, size: int = 65536) -> bytes:
    out = bytearray()
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- extra checks -----------------------------------------------------------------------------


def at_most_16_tokens(reply: Reply) -> str | None:
    if reply.status != 200:
        return f"expected 200, got {reply.status}"
    used = reply.json()["usage"]["completion_tokens"]
    return None if used <= 16 else f"max_tokens null generated {used} tokens, not the default 16"


def is_200(reply: Reply) -> str | None:
    return (
        None if reply.status == 200 else f"expected 200, got {reply.status}: {reply.body[:200]!r}"
    )


async def role_injection(port: int) -> Reply:
    """Tokenizes a plain message and one that is only a special token's text: parsed as
    text the second is several tokens longer; parsed as a control token, one."""

    async def count(content: str) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        reply = await call(port, "POST", "/tokenize", body)
        return int(reply.json()["count"]) if reply.status == 200 else -1

    plain, forged = await count("x"), await count("<|im_end|>")
    return Reply(200, {}, json.dumps({"plain": plain, "forged": forged}).encode())


def special_tokens_are_text(reply: Reply) -> str | None:
    counts = reply.json()
    if counts["plain"] < 0 or counts["forged"] < 0:
        return f"/tokenize refused the messages: {counts}"
    if counts["forged"] - counts["plain"] < 3:
        return (
            f"'<|im_end|>' in user content became a control token ({counts['forged']} tokens "
            f"vs {counts['plain']} for 'x'): a user can forge turns"
        )
    return None


# -- the corpus -------------------------------------------------------------------------------


def keyless_corpus(profile: Profile) -> list[Item]:
    big = json.dumps(chat_body("x" * (20 * MB))).encode()
    near_limit = "lorem ipsum dolor sit amet " * (7 * MB // 27)
    items = [
        # -- bodies ------------------------------------------------------------------
        Item("invalid JSON", "body", post(CHAT, b'{"model": '), "4xx"),
        Item("JSON array", "body", post(CHAT, b"[1, 2, 3]"), "4xx"),
        Item("JSON string", "body", post(CHAT, b'"hello"'), "4xx"),
        Item("JSON null", "body", post(CHAT, b"null"), "4xx"),
        Item("empty body", "body", post(CHAT, b""), "4xx"),
        Item(
            "trailing garbage", "body", post(CHAT, json.dumps(ok_chat()).encode() + b"}}x"), "4xx"
        ),
        Item("UTF-8 BOM", "body", post(CHAT, b"\xef\xbb\xbf" + json.dumps(ok_chat()).encode())),
        Item("invalid UTF-8", "body", post(CHAT, b'{"model": "\xff\xfe", "messages": []}'), "4xx"),
        Item("overlong UTF-8", "body", post(CHAT, b'{"model": "\xc0\xaf"}'), "4xx"),
        Item("UTF-16 body", "body", post(CHAT, json.dumps(ok_chat()).encode("utf-16")), "4xx"),
        Item("20 MB body", "body", post(CHAT, big), 413),
        Item(
            "20 MB chunked body",
            "body",
            raw(
                lambda port: request_bytes(
                    "POST",
                    CHAT,
                    chunked(big),
                    {"transfer-encoding": "chunked", "content-length": "\0"},
                    port=port,
                )
            ),
            413,
        ),
        Item(
            "Content-Length larger than the body",
            "body",
            raw(
                lambda port: request_bytes(
                    "POST", CHAT, b'{"model"', {"content-length": "1000"}, port=port
                ),
                timeout=12,
            ),
            "4xx",
            openai=False,
            allow_close=True,
        ),
        Item(
            "Content-Length smaller than the body",
            "body",
            raw(
                lambda port: request_bytes(
                    "POST", CHAT, json.dumps(ok_chat()).encode(), {"content-length": "5"}, port=port
                )
            ),
            "4xx",
            openai=False,
            allow_close=True,
        ),
        Item(
            "negative Content-Length",
            "body",
            raw(
                lambda port: request_bytes("POST", CHAT, b"{}", {"content-length": "-1"}, port=port)
            ),
            "4xx",
            openai=False,
            allow_close=True,
        ),
        Item(
            "Content-Length and Transfer-Encoding",
            "body",
            raw(
                lambda port: request_bytes(
                    "POST",
                    CHAT,
                    chunked(json.dumps(ok_chat()).encode()),
                    {"transfer-encoding": "chunked", "content-length": "7"},
                    port=port,
                )
            ),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item(
            "JSON nested 100,000 deep",
            "body",
            post(CHAT, b'{"model": "' + MODEL.encode() + b'", "x": ' + nested(100_000) + b"}"),
            "4xx",
        ),
        Item(
            "content nested 5,000 deep",
            "body",
            post(
                CHAT,
                b'{"model": "'
                + MODEL.encode()
                + b'", "messages": [{"role": "user", "content": '
                + nested(5000)
                + b"}]}",
            ),
            "4xx",
        ),
        Item(
            "100,000 unknown fields",
            "body",
            post(CHAT, {**{f"f{i}": i for i in range(100_000)}, **ok_chat()}),
        ),
        Item("7 MB unknown field", "body", post(CHAT, {**ok_chat(), "junk": "x" * (7 * MB)})),
        # -- messages ----------------------------------------------------------------
        Item(
            "100,000 messages",
            "messages",
            post(
                CHAT,
                {
                    "model": MODEL,
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}] * 100_000,
                },
            ),
            "4xx",
            param="messages",
        ),
        Item(
            "2,000 messages",
            "messages",
            post(
                CHAT,
                {
                    "model": MODEL,
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hello there"}] * 2000,
                },
            ),
        ),
        Item("special-token flood (chat)", "messages", post(CHAT, chat_body(FLOOD, max_tokens=1))),
        Item(
            "special-token flood (/tokenize)",
            "messages",
            post("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": FLOOD}]}),
        ),
        Item(
            "special tokens in content stay text",
            "messages",
            role_injection,
            200,
            extra=special_tokens_are_text,
        ),
        Item("no messages", "messages", post(CHAT, {"model": MODEL, "messages": []}), "4xx"),
        Item(
            "messages [null]", "messages", post(CHAT, {"model": MODEL, "messages": [None]}), "4xx"
        ),
        Item("messages [1]", "messages", post(CHAT, {"model": MODEL, "messages": [1]}), "4xx"),
        Item("messages [{}]", "messages", post(CHAT, {"model": MODEL, "messages": [{}]}), "4xx"),
        Item(
            "message without content",
            "messages",
            post(CHAT, {"model": MODEL, "messages": [{"role": "user"}]}),
            "4xx",
        ),
        Item(
            "unknown role",
            "messages",
            post(CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            "4xx",
        ),
        Item(
            "image_url part",
            "messages",
            post(
                CHAT,
                chat_body(
                    [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],  # type: ignore[arg-type]
                    max_tokens=1,
                ),
            ),
            "4xx",
            param="messages[0].content[0]",
        ),
        Item(
            "10,000 text parts",
            "messages",
            post(CHAT, chat_body([{"type": "text", "text": "a"}] * 10_000, max_tokens=1)),  # type: ignore[arg-type]
        ),
        # -- wrong types and nulls -------------------------------------------------------
        Item("model 123", "types", post(CHAT, {**ok_chat(), "model": 123}), "4xx", param="model"),
        Item("model null", "types", post(CHAT, {**ok_chat(), "model": None}), "4xx"),
        Item("model 100 KB", "types", post(CHAT, {**ok_chat(), "model": "m" * 100_000}), "4xx"),
        Item("model path", "types", post(CHAT, {**ok_chat(), "model": "../../etc/passwd"}), "4xx"),
        Item("messages a string", "types", post(CHAT, {"model": MODEL, "messages": "hi"}), "4xx"),
        Item("temperature 'hot'", "types", post(CHAT, ok_chat(temperature="hot")), "4xx"),
        Item("max_tokens '5'", "types", post(CHAT, ok_chat() | {"max_tokens": "5"}), "4xx"),
        Item("stream 'yes'", "types", post(CHAT, ok_chat(stream="yes")), "4xx"),
        Item("n 1.5", "types", post(CHAT, ok_chat(n=1.5)), "4xx"),
        Item("stop {}", "types", post(CHAT, ok_chat(stop={})), "4xx"),
        Item("stop [1, 2]", "types", post(CHAT, ok_chat(stop=[1, 2])), "4xx"),
        Item("5 stops", "types", post(CHAT, ok_chat(stop=["a", "b", "c", "d", "e"])), "4xx"),
        Item("logit_bias []", "types", post(CHAT, ok_chat(logit_bias=[])), "4xx"),
        Item("logit_bias bad key", "types", post(CHAT, ok_chat(logit_bias={"abc": 1})), "4xx"),
        Item(
            "logit_bias huge id", "types", post(CHAT, ok_chat(logit_bias={"99999999999": 1})), "4xx"
        ),
        Item("stream_options alone", "types", post(CHAT, ok_chat(stream_options={})), "4xx"),
        Item("top_logprobs alone", "types", post(CHAT, ok_chat(top_logprobs=2)), "4xx"),
        Item(
            "every field null",
            "types",
            post(
                CHAT,
                dict.fromkeys(("model", "messages", "max_tokens", *OPTIONAL)),
            ),
            "4xx",
        ),
        Item(
            "every optional field null",
            "types",
            post(
                CHAT,
                {
                    **dict.fromkeys(OPTIONAL),
                    **ok_chat(),
                },
            ),
            200,
        ),
        Item(
            "completions max_tokens null",
            "types",
            post(COMPLETIONS, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": None}),
            200,
            extra=at_most_16_tokens,
        ),
        Item(
            "completions echo null",
            "types",
            post(COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "echo": None}),
            200,
        ),
        # -- numbers -----------------------------------------------------------------
        *[
            Item(f"max_tokens {v}", "numbers", post(CHAT, ok_chat() | {"max_tokens": v}), "4xx")
            for v in (-1, 0, 2**31, 2**63, 2**64, 10**30, 1e308, 1.5)
        ],
        Item(
            "max_tokens beyond the context",
            "numbers",
            post(CHAT, ok_chat() | {"max_tokens": 100_000}),
            "4xx",
        ),
        *[
            Item(f"temperature {v}", "numbers", post(CHAT, ok_chat(temperature=v)), "4xx")
            for v in (-1, 3, 1e308)
        ],
        Item(
            "temperature 1e400",
            "numbers",
            post(CHAT, json.dumps(ok_chat()).encode()[:-1] + b', "temperature": 1e400}'),
            "4xx",
        ),
        Item(
            "temperature NaN",
            "numbers",
            post(CHAT, json.dumps(ok_chat()).encode()[:-1] + b', "temperature": NaN}'),
            "4xx",
        ),
        *[Item(f"n {v}", "numbers", post(CHAT, ok_chat(n=v)), "4xx") for v in (0, -1, 129, 10**6)],
        *[
            Item(f"seed {v}", "numbers", post(CHAT, ok_chat(seed=v)))
            for v in (2**64, -(2**63) - 1, 10**40)
        ],
        Item("logit_bias 1e10", "numbers", post(CHAT, ok_chat(logit_bias={"1": 1e10})), "4xx"),
        Item(
            "top_logprobs 21", "numbers", post(CHAT, ok_chat(logprobs=True, top_logprobs=21)), "4xx"
        ),
        Item(
            "presence_penalty 1e308", "numbers", post(CHAT, ok_chat(presence_penalty=1e308)), "4xx"
        ),
        Item("min_tokens 10**9", "numbers", post(CHAT, ok_chat(min_tokens=10**9))),
        Item(
            "completions logprobs 6",
            "numbers",
            post(COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 1, "logprobs": 6}),
            "4xx",
        ),
        # -- unknown and unsupported parameters --------------------------------------------
        Item("unknown parameter", "params", post(CHAT, ok_chat(frobnicate=True)), 200),
        *[
            Item(
                f"unsupported {name}",
                "params",
                post(CHAT, ok_chat(**{name: value})),
                400,
                param=name,
            )
            for name, value in (
                ("functions", [{"name": "f", "parameters": {}}]),
                ("audio", {"voice": "alloy", "format": "wav"}),
                ("modalities", ["text", "audio"]),
            )
        ],
        # Supported: served when well formed, a 400 naming the field when not.
        Item(
            "response_format json_object",
            "params",
            post(CHAT, ok_chat(response_format={"type": "json_object"})),
            200,
        ),
        Item(
            "tools",
            "params",
            post(
                CHAT,
                ok_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            ),
            200,
        ),
        Item(
            "response_format sound",
            "params",
            post(CHAT, ok_chat(response_format={"type": "sound"})),
            400,
            param="response_format",
        ),
        Item(
            "tool_choice without tools",
            "params",
            post(CHAT, ok_chat(tool_choice="required")),
            400,
            param="tool_choice",
        ),
        *[
            Item(
                f"responses: unsupported {name}",
                "params",
                post(
                    RESPONSES,
                    {
                        "model": MODEL,
                        "input": "a",
                        "max_output_tokens": 16,
                        "store": False,
                        name: value,
                    },
                ),
                400,
                param=param,
            )
            for name, value, param in (
                ("conversation", "conv_1", "conversation"),
                ("tools", [{"type": "web_search"}], "tools[0].type"),
                ("background", True, "background"),
            )
        ],
        Item(
            "suffix",
            "params",
            post(COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 1, "suffix": "z"}),
            400,
            param="suffix",
        ),
        # -- unicode -----------------------------------------------------------------
        *[
            Item(f"content {label}", "unicode", post(CHAT, chat_body(text, max_tokens=2)))
            for label, text in (
                ("lone high surrogate", "a\ud800b"),
                ("lone low surrogate", "\udfff"),
                ("reversed surrogates", "\udc00\ud800"),
                ("NUL", "before\u0000after"),
                ("noncharacters", "\uffff\ufffe\U0010ffff"),
                ("RTL override", "\u202etxt.exe"),
                ("10,000 combining marks", "a" + "\u0301" * 10_000),
                ("50,000 emoji", "\U0001f469\u200d\U0001f4bb" * 50_000),
            )
        ],
        Item(
            "raw NUL in a JSON string",
            "unicode",
            post(CHAT, b'{"model": "' + MODEL.encode() + b'\x00"}'),
            "4xx",
        ),
        Item(
            "unicode model name",
            "unicode",
            post(CHAT, {**ok_chat(), "model": "m\u00f6del\u2603"}),
            "4xx",
        ),
        # -- media types and Host (keyless) ---------------------------------------------
        Item(
            "text/plain body",
            "http",
            post(CHAT, json.dumps(ok_chat()).encode(), {"content-type": "text/plain"}),
            415,
        ),
        Item(
            "form body",
            "http",
            post(CHAT, b"model=x", {"content-type": "application/x-www-form-urlencoded"}),
            415,
        ),
        Item(
            "no Content-Type",
            "http",
            post(CHAT, json.dumps(ok_chat()).encode(), {"content-type": "\0"}),
            415,
        ),
        Item("Host evil.example", "http", post(CHAT, ok_chat(), {"host": "evil.example"}), 421),
        Item(
            "Host rebinding name with port",
            "http",
            post(CHAT, ok_chat(), {"host": "attacker.test:8000"}),
            421,
        ),
        Item("Host localhost", "http", post(CHAT, ok_chat(), {"host": "localhost"}), 200),
        Item("Host 10 KB", "http", post(CHAT, ok_chat(), {"host": "h" * 10_000})),
        Item(
            "Host with userinfo", "http", post(CHAT, ok_chat(), {"host": "127.0.0.1:1@evil.test"})
        ),
        Item("no Host", "http", post(CHAT, ok_chat(), {"host": "\0"}), "any", openai=False),
        Item(
            "header of 100 KB",
            "http",
            post(CHAT, ok_chat(), {"x-junk": "a" * 100_000}),
            "4xx",
            openai=False,
            allow_close=True,
        ),
        Item(
            "1,000 headers",
            "http",
            post(CHAT, ok_chat(), {f"x-h{i}": "v" * 40 for i in range(1000)}),
            "4xx",
            openai=False,
            allow_close=True,
        ),
        Item("16 KB cookie", "http", post(CHAT, ok_chat(), {"cookie": "c=" + "a" * 16_000})),
        Item(
            "request line of 64 KB",
            "http",
            request("GET", "/v1/models?" + "a" * 65_536),
            "4xx",
            openai=False,
            allow_close=True,
        ),
        Item(
            "CR in a header value",
            "http",
            raw(
                lambda port: request_bytes("GET", "/health", port=port)[:-2] + b"X-A: b\rc\r\n\r\n"
            ),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item(
            "HTTP/2 preface",
            "http",
            raw(lambda port: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item(
            "TLS ClientHello",
            "http",
            raw(lambda port: bytes.fromhex("16030100a5010000a10303") + b"\x00" * 160),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item(
            "random bytes",
            "http",
            raw(lambda port: bytes(range(256)) * 16),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item(
            "absolute-form target",
            "http",
            raw(lambda port: b"GET http://evil.test/health HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item(
            "HTTP/1.0 without Host",
            "http",
            raw(lambda port: b"GET /v1/models HTTP/1.0\r\n\r\n"),
            "any",
            openai=False,
            allow_close=True,
        ),
        Item("PUT chat", "http", request("PUT", CHAT, body=b"{}"), 405),
        Item("GET chat", "http", request("GET", CHAT), 405),
        Item("TRACE /health", "http", request("TRACE", "/health"), "4xx"),
        Item("OPTIONS chat", "http", request("OPTIONS", CHAT), "any"),
        Item("dot-dot path", "http", request("GET", "/v1/../admin/keys"), "4xx"),
        Item("NUL in path", "http", request("GET", "/v1/models/%00"), "4xx"),
        Item("invalid percent-encoding", "http", request("GET", "/v1/models/%ff%fe%zz"), "4xx"),
        # -- keys sent to a keyless server ------------------------------------------------
        *[
            Item(f"Authorization {label}", "auth", post(CHAT, ok_chat(), {"authorization": value}))
            for label, value in (
                ("'Bearer' alone", "Bearer"),
                ("Basic", "Basic Zm9vOmJhcg=="),
                ("10 KB key", "Bearer " + "k" * 10_000),
                ("latin-1 bytes", "Bearer k\u00e9y"),
                ("three words", "Bearer a b c"),
            )
        ],
        # -- work that grows with the input ------------------------------------------------
        Item(
            "/tokenize 7 MB prompt",
            "size",
            post("/tokenize", {"model": MODEL, "prompt": near_limit}),
        ),
        Item(
            "/tokenize flood prompt", "size", post("/tokenize", {"model": MODEL, "prompt": FLOOD})
        ),
        Item(
            "/detokenize 1M tokens",
            "size",
            post("/detokenize", {"model": MODEL, "tokens": [1] * 1_000_000}),
        ),
        Item(
            "/detokenize bad ids",
            "size",
            post("/detokenize", {"model": MODEL, "tokens": [-1, 2**63]}),
            "4xx",
        ),
        Item(
            "completions 7 MB prompt",
            "size",
            post(COMPLETIONS, {"model": MODEL, "prompt": near_limit, "max_tokens": 1}),
            "4xx",
        ),
        Item(
            "completions 1M token ids",
            "size",
            post(COMPLETIONS, {"model": MODEL, "prompt": [1] * 1_000_000, "max_tokens": 1}),
            "4xx",
        ),
        *[
            Item(
                f"completions prompt {label}",
                "size",
                post(COMPLETIONS, {"model": MODEL, "prompt": prompt, "max_tokens": 1}),
                "4xx",
            )
            for label, prompt in (
                ("[]", []),
                ("[[]]", [[]]),
                ("[[-1]]", [[-1]]),
                ("[[10**9]]", [[10**9]]),
            )
        ],
        Item("chat 7 MB content", "size", post(CHAT, chat_body(near_limit, max_tokens=1)), "4xx"),
    ]
    return items


def keyed_corpus(admin: str, limited: str, revoked: str) -> list[Item]:
    def auth(secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"}

    def stream_n(port: int) -> Awaitable[Reply]:
        async def go() -> Reply:
            out = await stream_chat(
                port, chat_body("Hi.", n=4, stream=True, max_tokens=4), auth(limited), timeout=60
            )
            return Reply(out.status, {}, json.dumps({"error": out.error}).encode())

        return go()

    admin_items = []
    for label, body in (
        ("budget_usd 1e308", {"name": "a1", "budget_usd": 1e308}),
        ("budget_usd '1e999'", {"name": "a2", "budget_usd": "1e999"}),
        ("budget_usd 10**30", {"name": "a3", "budget_usd": 10**30}),
        ("budget_usd -5", {"name": "a4", "budget_usd": -5}),
        ("budget_usd 'NaN'", {"name": "a5", "budget_usd": "NaN"}),
        ("rpm 2**70", {"name": "a6", "rpm": 2**70}),
        ("tpm 2**63", {"name": "a7", "tpm": 2**63}),
        ("max_concurrent 2**64", {"name": "a8", "max_concurrent": 2**64}),
        ("expires_in 10**12 days", {"name": "a9", "expires_in": "999999999999d"}),
        ("expires_at year 99999", {"name": "a10", "expires_at": "99999-01-01T00:00:00Z"}),
        ("name of digits", {"name": "12345"}),
        ("name 100 KB", {"name": "n" * 100_000}),
        ("name with NUL", {"name": "a\u0000b"}),
        ("unknown field", {"name": "a11", "colour": "red"}),
    ):
        admin_items.append(
            Item(f"admin create {label}", "admin", post("/admin/keys", body, auth(admin)), "any")
        )
    return [
        Item("no key", "keys", post(CHAT, ok_chat()), 401),
        Item("'Bearer' alone", "keys", post(CHAT, ok_chat(), {"authorization": "Bearer"}), 401),
        Item("Basic auth", "keys", post(CHAT, ok_chat(), {"authorization": "Basic YTpi"}), 401),
        Item("wrong key", "keys", post(CHAT, ok_chat(), auth("sk-spigot-" + "x" * 43)), 401),
        Item("10 KB key", "keys", post(CHAT, ok_chat(), auth("k" * 10_000)), 401),
        Item("latin-1 key", "keys", post(CHAT, ok_chat(), auth("k\u00e9y")), 401),
        Item("revoked key", "keys", post(CHAT, ok_chat(), auth(revoked)), 401),
        Item("user key on /admin", "keys", request("GET", "/admin/keys", auth(limited)), 403),
        Item("valid key", "keys", post(CHAT, ok_chat(), auth(limited)), 200),
        Item("n=4 on a key limited to 1 at a time", "keys", stream_n, "4xx"),
        *admin_items,
        *[
            Item(
                f"admin usage {label}",
                "admin",
                request("GET", f"/admin/usage?{query}", auth(admin)),
            )
            for label, query in (
                ("since huge", "since=99999999999999999999"),
                ("since -1", "since=-1"),
                ("by junk", "by=%00%ff"),
                ("key 10 KB", "key=" + "k" * 10_000),
            )
        ],
        Item(
            "admin get id 10**20",
            "admin",
            request("GET", "/admin/keys/" + "9" * 20, auth(admin)),
            404,
        ),
        Item(
            "admin patch NUL",
            "admin",
            lambda port: call(port, "PATCH", "/admin/keys/%00", {"rpm": 1}, auth(admin)),
            404,
        ),
    ]


# -- running it -------------------------------------------------------------------------------


def judge(item: Item, reply: Reply) -> list[str]:
    """What is wrong with this answer."""
    problems: list[str] = []
    status = reply.status
    if status == -1:
        return [f"no answer within the timeout ({reply.seconds:.0f} s)"]
    if status == 0:
        if not item.allow_close:
            problems.append("the server closed the connection without an answer")
        return problems
    if status >= 500:
        problems.append(f"answered {status}: {reply.body[:200]!r}")
        return problems
    expect = item.expect
    if expect == "4xx" and not 400 <= status < 500:
        problems.append(f"expected a 4xx, got {status}")
    elif isinstance(expect, int) and status != expect:
        problems.append(f"expected {expect}, got {status}: {reply.body[:160]!r}")
    elif isinstance(expect, tuple) and status not in expect:
        problems.append(f"expected one of {expect}, got {status}")
    if 400 <= status < 500 and item.openai:
        error = reply.error()
        if error is None:
            problems.append(f"{status} without an OpenAI error object: {reply.body[:160]!r}")
        elif item.param is not None and not str(error.get("param") or "").startswith(item.param):
            problems.append(f"error param is {error.get('param')!r}, not {item.param!r}")
    if item.extra is not None and not problems:
        extra = item.extra(reply)
        if extra:
            problems.append(extra)
    return problems


async def run_items(
    srv: Server,
    items: list[Item],
    probe: HealthProbe,
    found: Findings,
    stall: float,
    counted: dict[str, Any],
) -> None:
    """Sends each item in turn, judging its answer and /health meanwhile; ``counted``
    keeps the tally (items, statuses, the worst /health wait and during what)."""
    statuses: dict[int, int] = counted.setdefault("statuses", {})
    for item in items:
        started = time.monotonic()
        try:
            reply = await item.send(srv.port)
        except Exception as exc:  # a client-side surprise is a finding, not a crash
            reply = Reply(0, {}, repr(exc).encode())
            found.expect(False, f"[{item.group}] {item.name}: client error {exc!r}")
        ended = time.monotonic()
        counted["items"] = counted.get("items", 0) + 1
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        for problem in judge(item, reply):
            found.expect(False, f"[{item.group}] {item.name}: {problem}")
        slowest = await asyncio.to_thread(probe.worst_between, started, ended)
        if slowest > counted.get("worst_health_s", 0.0):
            counted["worst_health_s"] = round(slowest, 3)
            counted["worst_item"] = item.name
        found.expect(
            slowest < stall,
            f"[{item.group}] {item.name}: /health took {slowest:.2f} s while it ran "
            f"(limit {stall:.1f} s; request took {ended - started:.1f} s)",
        )
        if not srv.healthy(within=60):
            if srv.alive():
                found.expect(False, f"[{item.group}] {item.name}: server unhealthy 60 s later")
            else:
                found.expect(False, f"server died on {item.name!r}; log tail: {srv.log()[-800:]}")
            # A fresh server for the rest: one wedged request must not fail every later one.
            raise ServerDied(item.name)


class ServerDied(Exception):
    """The server died or stayed unhealthy after the item named: the run goes on with a
    new one."""


async def idle_sockets(srv: Server, found: Findings, count: int, slow: int, stall: float) -> None:
    """``count`` connections that never send a byte and ``slow`` that send a header byte a
    second (slowloris): /health must answer meanwhile, and the server must close them."""
    raise_open_files()
    conns: list[Conn] = []
    for _ in range(count + slow):
        with contextlib.suppress(OSError):
            conns.append(await Conn.open(srv.port))
    found.numbers["idle_opened"] = len(conns)

    async def dribble(conn: Conn) -> None:
        data = request_bytes("GET", "/v1/models", port=srv.port)
        with contextlib.suppress(OSError, ConnectionError):
            for byte in data:
                await conn.send(bytes([byte]))
                await asyncio.sleep(1.0)

    drips = [asyncio.create_task(dribble(conn)) for conn in conns[count:]]
    with HealthProbe(srv.url) as probe:
        await asyncio.sleep(2.0)
    # Past the connection cap a new client gets 503 at once: refused, not locked out.
    refused = sum(1 for _, _, status in probe.samples if status == 503)
    broken = sum(1 for _, _, status in probe.samples if status not in (200, 503))
    found.numbers["idle_probe_503"] = refused
    found.expect(
        probe.worst() < stall and broken == 0,
        f"/health with {len(conns)} idle/slow sockets open: worst {probe.worst():.2f} s, "
        f"{broken} probe(s) unanswered",
    )

    async def closed_by_server(conn: Conn) -> bool:
        try:
            while await conn.reader.read(4096):
                pass
            return True
        except (ConnectionError, OSError):
            return True

    waits = [asyncio.create_task(closed_by_server(conn)) for conn in conns]
    _, pending = await asyncio.wait(waits, timeout=20)
    closed = len(conns) - len(pending)
    found.numbers["idle_closed_by_server_within_20s"] = closed
    found.expect(
        closed == len(conns),
        f"{len(conns) - closed} of {len(conns)} idle/slowloris connections still open after 20 s "
        "(no header/idle timeout)",
    )
    for task in [*pending, *drips]:
        task.cancel()
    for conn in conns:
        conn.writer.transport.abort()
    found.expect(srv.healthy(10), "server unhealthy after the idle sockets")


async def big_bodies(srv: Server, found: Findings) -> None:
    """Four 200 MB bodies at once: each refused (413) before it is read, and the process
    does not grow by their size."""
    body = b'{"model": "x", "junk": "' + b"x" * (200 * MB) + b'"}'
    head = request_bytes("POST", CHAT, b"", {"content-length": str(len(body))}, port=srv.port)
    before = srv.rss_mb()
    replies = await asyncio.gather(*[exchange(srv.port, [head, body], 120) for _ in range(4)])
    after = srv.rss_mb()
    found.numbers["rss_before_4x200MB"] = round(before)
    found.numbers["rss_after_4x200MB"] = round(after)
    found.expect(
        all(r.status == 413 for r in replies), f"4 x 200 MB: {[r.status for r in replies]}"
    )
    found.expect(after - before < 256, f"RSS grew {after - before:.0f} MB on four 200 MB bodies")


def check_hostile(work: Workdir, profile: Profile, stall: float) -> Result:
    found = Findings("hostile")
    timeouts = optional_flags(header_timeout=3, idle_timeout=3, body_timeout=5)
    counted: dict[str, Any] = {"items": 0, "statuses": {}, "servers": 0}

    # 1. keyless: the developer default. A server that dies or wedges is replaced, and
    # the corpus goes on from the next item.
    db = work.db("hostile")
    remaining = keyless_corpus(profile)
    while remaining:
        srv = Server.start("--parallel", "4", "--ctx-size", "4096", *timeouts, db=db)
        counted["servers"] += 1
        try:
            with HealthProbe(srv.url) as probe:
                try:
                    asyncio.run(run_items(srv, remaining, probe, found, stall, counted))
                except ServerDied as died:
                    names = [i.name for i in remaining]
                    remaining = remaining[names.index(str(died)) + 1 :]
                    continue
                remaining = []
                asyncio.run(
                    idle_sockets(srv, found, 1100 if profile.hostile_big else 200, 20, stall)
                )
                if profile.hostile_big:
                    asyncio.run(big_bodies(srv, found))
            stats = srv.wait_idle(30)
            found.expect(stats.get("in_flight") == 0, f"engine not idle after the corpus: {stats}")
        finally:
            tracebacks = srv.tracebacks()
            found.expect(not tracebacks, f"keyless server logged errors: {tracebacks[:3]}")
            srv.stop()

    # 2. keyed: bad keys, n against a key's concurrency, the admin API's numbers.
    db = work.db("hostile-keys")
    admin = create_key(db, "admin", "--admin")
    limited = create_key(db, "limited", "--max-concurrent", "1")
    revoked = create_key(db, "gone")
    revoke_key(db, "gone")
    srv = Server.start("--parallel", "4", "--ctx-size", "2048", db=db)
    try:
        keyed = keyed_corpus(admin, limited, revoked)
        with HealthProbe(srv.url) as probe, contextlib.suppress(ServerDied):
            asyncio.run(run_items(srv, keyed, probe, found, stall, counted))
        tracebacks = srv.tracebacks()
        found.expect(not tracebacks, f"keyed server logged errors: {tracebacks[:3]}")
    finally:
        srv.stop()

    # 3. the only key revoked, then a restart: keys are still required.
    db = work.db("hostile-revoked")
    secret = create_key(db, "only")
    revoke_key(db, "only")
    srv = Server.start("--parallel", "2", "--ctx-size", "1024", db=db)
    try:
        anonymous = asyncio.run(call(srv.port, "POST", CHAT, ok_chat()))
        old = asyncio.run(
            call(srv.port, "POST", CHAT, ok_chat(), {"authorization": f"Bearer {secret}"})
        )
        counted["items"] += 2
        found.expect(
            anonymous.status == 401,
            f"[keys] revoked-only key, restarted: a request without a key got {anonymous.status}",
        )
        found.expect(
            old.status == 401,
            f"[keys] revoked-only key, restarted: the revoked key got {old.status}",
        )
    finally:
        srv.stop()

    found.numbers.update(counted)
    statuses = counted["statuses"]
    fives = sum(n for status, n in statuses.items() if status >= 500)
    found.numbers["5xx"] = fives
    return found.result(
        f"{counted['items']} hostile requests, {fives} 5xx, {len(found.failures)} failure(s), "
        f"worst /health {counted.get('worst_health_s', 0):.2f} s "
        f"(during {counted.get('worst_item', '-')!r})"
    )
