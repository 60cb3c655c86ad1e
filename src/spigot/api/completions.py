"""POST /v1/completions (legacy text completions)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spigot.api import unsupported
from spigot.api.generation import JobContext, Prepared, serve_generation
from spigot.api.guarding import guard_inputs
from spigot.api.holdback import OutputStage
from spigot.api.schemas import CompletionRequest
from spigot.api.state import resolve_max_tokens
from spigot.api.streaming import finish_reason_of, with_extras
from spigot.api.wire_events import ChunkEvents
from spigot.engine.protocol import Engine, OutputStream, PromptError
from spigot.engine.types import GenOutput, GenRequest, Prompt, TokenLogprob
from spigot.errors import InvalidRequest

router = APIRouter()


@dataclass(slots=True)
class _Prompt:
    prompt: Prompt
    text: str | None  # what the model sees (after input rules), and what echo sends


class LogprobsWriter:
    """Legacy ``logprobs`` objects; ``text_offset`` runs over each choice's whole text."""

    def __init__(self, choices: int) -> None:
        self._offsets = [0] * choices

    def build(self, choice: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        at = self._offsets[choice]
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        self._offsets[choice] = at
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tok: lp for tok, _, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


class CompletionChunks:
    """text_completion chunk shapes for one response."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        logprobs: LogprobsWriter | None,
    ) -> None:
        self._head = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
        }
        self._logprobs = logprobs

    def _chunk(self, choice: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        return {
            **self._head,
            "choices": [
                {"text": text, "index": choice, "logprobs": logprobs, "finish_reason": reason}
            ],
            "usage": None,
        }

    def opening(self, choice: int) -> dict[str, Any] | None:
        return None  # an echoed prompt is sent as the first text (see ``StreamedRequest``)

    def content(self, output: GenOutput) -> dict[str, Any]:
        logprobs = None
        if self._logprobs is not None:
            logprobs = self._logprobs.build(output.choice_index, output.logprobs)
        chunk = self._chunk(output.choice_index, output.text, logprobs, None)
        return with_extras(chunk, chunk["choices"][0], output)

    def finish(self, output: GenOutput) -> dict[str, Any]:
        assert output.finish_reason is not None
        return self._chunk(output.choice_index, "", None, output.finish_reason.value)

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}


def _prepare_prompts(body: CompletionRequest, engine: Engine, context: JobContext) -> list[_Prompt]:
    """Each prompt as the engine will see it, after the input rules.

    Token-id prompts are shown to the input rules as their text where the
    engine tokenizes here; where it does not, they cannot be checked, so a
    server with input rules refuses them rather than let them pass unseen.
    """
    state = context.state
    given: list[Prompt | None] = []
    texts: list[str | None] = []
    for i, p in enumerate(body.prompts()):
        if isinstance(p, str):
            given.append(None)
            texts.append(p)
            continue
        if not p:
            raise InvalidRequest(f"Prompt {i} is empty.", param="prompt")
        try:
            prompt = engine.prepare_token_ids(p)
        except PromptError as exc:
            message = str(exc).rstrip(".")
            raise InvalidRequest(f"{message} in 'prompt'.", param="prompt") from None
        given.append(prompt)
        texts.append(engine.detokenize(p) if engine.tokenizes_locally else None)
    if None in texts and (body.echo or (state.guard is not None and state.guard.input)):
        raise InvalidRequest(
            "Token-id prompts cannot be echoed or checked by this server's input rules on "
            f"model '{engine.model_id}'; send the prompt as text.",
            param="prompt",
        )
    checked = iter(
        guard_inputs(
            state.guard,
            state.guard_counters,
            context.request_id,
            [t for t in texts if t is not None],
            param="prompt",
        )
    )
    prompts: list[_Prompt] = []
    for ids, text in zip(given, texts, strict=True):
        seen = None if text is None else next(checked)
        if ids is not None and (seen is None or seen == text):
            prompts.append(_Prompt(ids, seen))
            continue
        # A string, or tokens an input rule rewrote.
        assert seen is not None
        try:
            prompts.append(_Prompt(engine.prepare_text(seen), seen))
        except PromptError as exc:
            raise InvalidRequest(str(exc), param="prompt") from None
    return prompts


class CompletionJob:
    """POST /v1/completions over the shared pipeline (``generation.py``)."""

    endpoint = "completions"
    id_prefix = "cmpl"

    def __init__(self, body: CompletionRequest, engine: Engine, context: JobContext) -> None:
        self._body = body
        self._engine = engine
        self._context = context
        self.n = body.choices
        self.sequences = self.n * len(body.prompts())
        self.wants_logprobs = body.logprobs is not None
        self._prompts: list[_Prompt] = []

    def prepare(self) -> Prepared:
        body, engine, n = self._body, self._engine, self.n
        self._prompts = _prepare_prompts(body, engine, self._context)
        requests: list[GenRequest] = []
        max_completion_tokens = 0
        for p_index, prompt in enumerate(self._prompts):
            max_tokens, given = resolve_max_tokens(
                engine, prompt.prompt, body.requested_max_tokens, param="prompt"
            )
            max_completion_tokens += max_tokens * n
            for i in range(n):
                params = body.to_sampling_params(
                    max_tokens=max_tokens,
                    max_tokens_given=given,
                    vocab_size=engine.vocab_size,
                    logprobs=body.logprobs,
                    choice=i,
                )
                requests.append(
                    GenRequest(
                        engine.new_request_id(),
                        prompt.prompt,
                        params,
                        p_index * n + i,
                        cache_scope=self._context.cache_scope,
                        trace_id=self._context.request_id,
                    )
                )
        counts = tuple(p.prompt.token_count for p in self._prompts)
        return Prepared(requests, counts, max_completion_tokens)

    def preamble(self) -> Sequence[GenOutput]:
        # An echoed prompt is completion text like any other: output rules see it too.
        if not self._body.echo:
            return ()
        n = self.n
        return [GenOutput(c, self._prompts[c // n].text or "") for c in range(self.sequences)]

    def output_stages(self, stream: OutputStream) -> Sequence[OutputStage]:
        return ()

    def events(
        self, completion_id: str, created: int, model: str, include_usage: bool
    ) -> ChunkEvents:
        logprobs = LogprobsWriter(self.sequences) if self.wants_logprobs else None
        chunks = CompletionChunks(completion_id, created, model, logprobs)
        return ChunkEvents(chunks, self.sequences, include_usage)

    async def body(
        self,
        per_choice: list[list[GenOutput]],
        completion_id: str,
        created: int,
        model: str,
        usage: dict[str, Any],
    ) -> dict[str, Any]:
        choices = []
        for i, outputs in enumerate(per_choice):
            entries = [e for o in outputs for e in o.logprobs]
            choices.append(
                {
                    "text": "".join(o.text for o in outputs),
                    "index": i,
                    "logprobs": LogprobsWriter(1).build(0, entries)
                    if self.wants_logprobs
                    else None,
                    "finish_reason": finish_reason_of(outputs),
                }
            )
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
        }


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    return await serve_generation(
        request, CompletionRequest, unsupported.COMPLETIONS, CompletionJob
    )
