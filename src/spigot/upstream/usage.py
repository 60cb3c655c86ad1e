"""Token counts for sequences whose upstream reports none, and prompt estimates.

Prompt estimate (what metering reserves before the upstream says the real
count): the contents of the messages (every string of a message but its
``role`` and part ``type`` names) in tokens of the model's ``tokenizer.json``
when one is configured, otherwise in UTF-8 bytes, plus 4 per message and 3
for the reply's start; a text prompt is its tokens (or bytes) plus 1. The byte
count is an upper bound for the contents: a token of a byte-level BPE covers at
least one byte. A chat template's own additions (a default system prompt) are
not known here; the upstream's usage corrects the estimate.

Counting, when a stream ends without usage (or is cut short), in this order:

1. the upstream's ``/tokenize``: vLLM's (``{"model", "prompt"}`` or
   ``{"model", "messages"}`` -> ``{"count"}``) or llama-server's (``{"content"}``
   -> ``{"tokens"}``), found out once per upstream; a server without one is
   remembered as such;
2. the configured ``tokenizer.json`` (``tokenizers``, run in a thread);
3. tiktoken for OpenAI model names, when the ``tiktoken`` package is installed;
4. otherwise the completion is the number of content events, and the prompt
   keeps its estimate.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from spigot.engine.types import Prompt

log = logging.getLogger(__name__)

PER_MESSAGE = 4
REPLY_PRIMING = 3
TEXT_START = 1
# Remote counting is a courtesy: it must not hold a finished stream for long.
COUNT_TIMEOUT = 5.0


def message_strings(messages: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Every string of the messages but role names and part types."""

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if key not in ("role", "type"):
                    yield from walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from walk(item)

    for message in messages:
        yield from walk(message)


class LocalTokenizer:
    """A model's ``tokenizer.json`` through the ``tokenizers`` library (thread-safe)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tokenizer = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: Sequence[str]) -> int:
        if not texts:
            return 0
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return sum(len(e.ids) for e in encodings)


def estimate_chat(
    messages: Sequence[Mapping[str, Any]], tokenizer: LocalTokenizer | None = None
) -> int:
    strings = list(message_strings(messages))
    if tokenizer is not None:
        contents = tokenizer.count_many(strings)
    else:
        contents = sum(len(s.encode("utf-8")) for s in strings)
    return contents + PER_MESSAGE * len(messages) + REPLY_PRIMING


def estimate_text(text: str, tokenizer: LocalTokenizer | None = None) -> int:
    contents = tokenizer.count(text) if tokenizer is not None else len(text.encode("utf-8"))
    return contents + TEXT_START


class TokenizeKind(enum.Enum):
    UNKNOWN = "unknown"
    VLLM = "vllm"  # POST /tokenize {"model", "prompt"|"messages"} -> {"count"}
    LLAMA = "llama"  # POST /tokenize {"content"} -> {"tokens"}
    NONE = "none"


class TokenizeEndpoint:
    """An upstream's ``/tokenize``, whichever kind it has (found out on first use)."""

    def __init__(self, root_url: str) -> None:
        self.url = root_url.rstrip("/") + "/tokenize"
        self.kind = TokenizeKind.UNKNOWN
        self._lock = asyncio.Lock()

    async def count_text(self, client: httpx.AsyncClient, model: str, text: str) -> int | None:
        """Tokens of ``text`` as the upstream's model sees them; None: not known."""
        if self.kind is TokenizeKind.UNKNOWN:
            async with self._lock:
                if self.kind is TokenizeKind.UNKNOWN:
                    return await self._discover(client, model, text)
        if self.kind is TokenizeKind.VLLM:
            body = await self._post(client, _vllm_text(model, text))
            return _count_of(body)
        if self.kind is TokenizeKind.LLAMA:
            body = await self._post(client, {"content": text})
            return _tokens_of(body)
        return None

    async def count_messages(
        self, client: httpx.AsyncClient, model: str, messages: Sequence[Mapping[str, Any]]
    ) -> int | None:
        """A conversation's prompt tokens, template included (vLLM only; None otherwise)."""
        if self.kind is TokenizeKind.UNKNOWN:
            await self.count_text(client, model, "")
        if self.kind is not TokenizeKind.VLLM:
            return None
        body = await self._post(client, {"model": model, "messages": [dict(m) for m in messages]})
        return _count_of(body)

    async def _discover(self, client: httpx.AsyncClient, model: str, text: str) -> int | None:
        try:
            response = await client.post(self.url, json=_vllm_text(model, text))
        except httpx.HTTPError as exc:
            log.debug("%s could not be asked: %s", self.url, exc)
            return None  # not known yet: ask again next time
        if response.status_code >= 500:
            return None
        body = _json(response)
        if response.status_code == 200 and _count_of(body) is not None:
            self.kind = TokenizeKind.VLLM
            return _count_of(body)
        if response.status_code == 200 and isinstance(body, Mapping) and "tokens" in body:
            # llama-server ignores the unknown "prompt" and tokenized nothing.
            self.kind = TokenizeKind.LLAMA
            return _tokens_of(await self._post(client, {"content": text}))
        log.info("%s: no /tokenize here (%d); counting locally", self.url, response.status_code)
        self.kind = TokenizeKind.NONE
        return None

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> Any:
        try:
            response = await client.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            log.debug("%s could not be asked: %s", self.url, exc)
            return None
        return _json(response) if response.status_code == 200 else None


def _vllm_text(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "prompt": text, "add_special_tokens": False}


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _count_of(body: Any) -> int | None:
    count = body.get("count") if isinstance(body, Mapping) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _tokens_of(body: Any) -> int | None:
    tokens = body.get("tokens") if isinstance(body, Mapping) else None
    return len(tokens) if isinstance(tokens, list) else None


def tiktoken_encoding(model: str) -> Any | None:
    """tiktoken's encoding for an OpenAI model name, when tiktoken is installed."""
    try:
        import tiktoken  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    try:
        return tiktoken.encoding_for_model(model)
    except Exception:  # not an OpenAI name, or its encoding cannot be loaded
        return None


class TokenCounter:
    """Counts one served model's tokens when its upstream reports none."""

    def __init__(self, tokenizer: LocalTokenizer | None = None) -> None:
        self.tokenizer = tokenizer
        self._tiktoken: dict[str, Any | None] = {}

    async def completion(
        self,
        client: httpx.AsyncClient | None,
        endpoint: TokenizeEndpoint | None,
        model: str,
        text: str,
        events: int,
    ) -> int:
        """Tokens of a completion's text; ``events``: its content events (the last resort)."""
        if not text:
            return 0
        counted = await self._count(client, endpoint, model, text)
        return events if counted is None else counted

    async def prompt(
        self,
        client: httpx.AsyncClient | None,
        endpoint: TokenizeEndpoint | None,
        model: str,
        prompt: Prompt,
    ) -> int:
        """A prompt's tokens when they can be counted better than its estimate."""
        if prompt.count_exact:
            return prompt.token_count
        if client is not None and endpoint is not None:
            counted: int | None = None
            try:
                async with asyncio.timeout(COUNT_TIMEOUT):
                    if prompt.messages is not None:
                        counted = await endpoint.count_messages(client, model, prompt.messages)
                        if counted is None and endpoint.kind is TokenizeKind.LLAMA:
                            counted = await self._chat_by_texts(client, endpoint, model, prompt)
                    elif prompt.text is not None:
                        remote = await endpoint.count_text(client, model, prompt.text)
                        counted = None if remote is None else remote + TEXT_START
            except TimeoutError:
                counted = None
            if counted is not None:
                return counted
        if self.tokenizer is None and (encoding := self._encoding(model)) is not None:
            return await asyncio.to_thread(_tiktoken_prompt, encoding, prompt)
        return prompt.token_count  # the estimate (already the tokenizer's, if configured)

    async def _chat_by_texts(
        self, client: httpx.AsyncClient, endpoint: TokenizeEndpoint, model: str, prompt: Prompt
    ) -> int | None:
        assert prompt.messages is not None
        total = PER_MESSAGE * len(prompt.messages) + REPLY_PRIMING
        for text in message_strings(prompt.messages):
            counted = await endpoint.count_text(client, model, text)
            if counted is None:
                return None
            total += counted
        return total

    async def _count(
        self,
        client: httpx.AsyncClient | None,
        endpoint: TokenizeEndpoint | None,
        model: str,
        text: str,
    ) -> int | None:
        if client is not None and endpoint is not None and endpoint.kind is not TokenizeKind.NONE:
            try:
                async with asyncio.timeout(COUNT_TIMEOUT):
                    counted = await endpoint.count_text(client, model, text)
            except TimeoutError:
                counted = None
            if counted is not None:
                return counted
        if self.tokenizer is not None:
            return await asyncio.to_thread(self.tokenizer.count, text)
        encoding = self._encoding(model)
        if encoding is not None:
            return len(await asyncio.to_thread(encoding.encode, text))
        return None

    def _encoding(self, model: str) -> Any | None:
        if model not in self._tiktoken:
            self._tiktoken[model] = tiktoken_encoding(model)
        return self._tiktoken[model]


def _tiktoken_prompt(encoding: Any, prompt: Prompt) -> int:
    if prompt.messages is not None:
        texts = list(message_strings(prompt.messages))
        contents = sum(len(encoding.encode(t)) for t in texts)
        return contents + PER_MESSAGE * len(prompt.messages) + REPLY_PRIMING
    return len(encoding.encode(prompt.text or "")) + TEXT_START
