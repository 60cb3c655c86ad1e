"""The Responses API's ``Job``: its request through the shared pipeline (``generation.py``).

Admission, input rules, the context check, the reservation, metering, output
rules, key scoping and the gateway are chat's, unchanged: the input becomes
chat messages (``items.py``) and is prepared with ``Engine.prepare_chat``, so
a Responses request and a chat request of the same messages cost the same
tokens. What is the Responses API's own: the conversation may continue a
stored one (``previous_response_id``), the output is items and named events,
and the response is stored before the client sees its end (``store``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from spigot.api.generation import JobContext, Prepared
from spigot.api.guarding import guard_messages
from spigot.api.holdback import OutputStage
from spigot.api.output_constraint import output_constraint, tool_call_stages
from spigot.api.responses_api.events import OutputItems, ResponseEvents, ResponseShape
from spigot.api.responses_api.items import chat_messages, settings_echo
from spigot.api.responses_api.wire import ResponsesRequest
from spigot.api.state import resolve_max_tokens
from spigot.api.tools import (
    FunctionDefinition,
    ToolDefinition,
    ToolRequest,
    check_history,
    tool_request,
)
from spigot.engine.protocol import Engine, OutputStream, PromptError
from spigot.engine.types import GenOutput, GenRequest, SamplingParams
from spigot.errors import InvalidRequest
from spigot.metering import Store, StoreError
from spigot.metering.stored_responses import ChainBroken, StoredResponse

log = logging.getLogger(__name__)


def previous_not_found(response_id: str) -> InvalidRequest:
    # OpenAI answers an unknown previous_response_id with a 400 naming the field.
    return InvalidRequest(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def response_store(context: JobContext) -> Store | None:
    metering = context.state.metering
    return None if metering is None else metering.store


def responses_tools(body: ResponsesRequest) -> ToolRequest | None:
    """The flat Responses tools and choice in chat's nested shape, checked by chat's
    ``tool_request`` (``strict`` defaults to true here, as OpenAI's Responses API has it)."""
    definitions = [
        ToolDefinition(
            type=tool.type,
            function=FunctionDefinition(
                name=tool.name or "",
                description=tool.description,
                parameters=tool.parameters,
                strict=True if tool.strict is None else tool.strict,
            ),
        )
        for tool in body.tools or ()
    ]
    choice: str | dict[str, Any] | None
    if body.tool_choice is None or isinstance(body.tool_choice, str):
        choice = body.tool_choice
    else:
        choice = {"type": "function", "function": {"name": body.tool_choice.name}}
    with flat_tool_params():
        return tool_request(definitions, choice, body.parallel_tool_calls)


@contextmanager
def flat_tool_params() -> Iterator[None]:
    """Chat's tool checks name chat's fields: ``tools[0].function.parameters`` is
    ``tools[0].parameters`` here; a message's index counts the stored conversation and
    the instructions too, so a history mistake names ``input`` as a whole."""
    try:
        yield
    except InvalidRequest as exc:
        if exc.param is not None:
            if exc.param.startswith("messages"):
                exc.param = "input"
            exc.param = exc.param.replace(".function.", ".")
            exc.message = exc.message.replace(".function.", ".")
        raise


class ResponsesJob:
    endpoint = "responses"
    id_prefix = "resp_"
    n = 1
    sequences = 1
    wants_logprobs = False

    def __init__(self, body: ResponsesRequest, engine: Engine, context: JobContext) -> None:
        self._body = body
        self._engine = engine
        self._context = context
        self._store = response_store(context)
        if self._store is None:
            # --no-metering: no database to keep responses in. Asked for, that is a
            # mistake to report; by default the response is simply not stored.
            if body.store:
                raise InvalidRequest(
                    "'store' is not available: this server runs without a database "
                    "(--no-metering). Send 'store': false.",
                    param="store",
                )
            if body.previous_response_id is not None:
                raise previous_not_found(body.previous_response_id)
        self.stored = self._store is not None and body.store is not False
        self._tools = responses_tools(body)
        # The request's own items, kept with the stored response (instructions apart).
        self._new_items = [item.stored() for item in body.items]

    def prepare(self) -> Prepared:
        body, engine, context = self._body, self._engine, self._context
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            history = self._history(body.previous_response_id)
        messages = chat_messages([*history, *self._new_items])
        if body.instructions is not None:
            messages.insert(0, {"role": "system", "content": body.instructions})
        state = context.state
        guard_messages(
            state.guard, state.guard_counters, context.request_id, messages, param="input"
        )
        tools = self._tools
        with flat_tool_params():
            check_history(messages)
            text_format = body.text.format if body.text is not None else None
            constraint = output_constraint(engine, tools, text_format, format_param="text.format")
        try:
            prompt = engine.prepare_chat(messages, tools.tools if tools else None)
        except PromptError as exc:
            raise InvalidRequest(str(exc), param="input") from None
        max_tokens, given = resolve_max_tokens(
            engine, prompt, body.max_output_tokens, param="input"
        )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens_given=given,
            defaulted=frozenset(
                name for name in ("temperature", "top_p") if getattr(body, name) is None
            ),
            constraint=constraint,
        )
        request = GenRequest(
            engine.new_request_id(),
            prompt,
            params,
            0,
            cache_scope=context.cache_scope,
            trace_id=context.request_id,
        )
        return Prepared([request], (prompt.token_count,), max_tokens)

    def _history(self, previous_id: str) -> list[dict[str, Any]]:
        """The stored conversation before this request: each response's input items and
        output items, oldest first. Runs in the prep pool: the store is synchronous."""
        assert self._store is not None
        try:
            chain = self._store.response_chain(self._context.cache_scope, previous_id)
        except ChainBroken as exc:
            raise previous_not_found(exc.response_id) from None
        items: list[dict[str, Any]] = []
        for stored in chain:
            items += stored.input_items
            items += stored.output_items
        return items

    def preamble(self) -> Sequence[GenOutput]:
        return ()

    def output_stages(self, stream: OutputStream) -> Sequence[OutputStage]:
        return tool_call_stages(self._engine, self._tools, self.sequences)

    def _shape(self, response_id: str, created: int, model: str) -> ResponseShape:
        return ResponseShape(
            response_id, created, model, settings_echo(self._body, stored=self.stored)
        )

    def events(
        self, completion_id: str, created: int, model: str, include_usage: bool
    ) -> ResponseEvents:
        return ResponseEvents(self._shape(completion_id, created, model), self._keep)

    async def body(
        self,
        per_choice: list[list[GenOutput]],
        completion_id: str,
        created: int,
        model: str,
        usage: dict[str, Any],
    ) -> dict[str, Any]:
        items = OutputItems()
        for output in per_choice[0]:
            items.feed(output)
        final = self._shape(completion_id, created, model).final(items, usage)
        await self._keep(final)
        return final

    async def _keep(self, final: dict[str, Any]) -> None:
        """Store the finished response before the client sees it end, so that a client
        may continue from it (``previous_response_id``) the moment it has it."""
        if not self.stored or self._store is None:
            return
        stored = StoredResponse(
            id=final["id"],
            owner=self._context.cache_scope,
            previous_id=self._body.previous_response_id,
            created_at=float(final["created_at"]),
            input_items=self._new_items,
            response=final,
        )
        try:
            await asyncio.to_thread(self._store.save_response, stored)
        except StoreError as exc:
            # The response is generated and billed: the client still gets it.
            log.error("%s: response %s not stored: %s", self._context.request_id, final["id"], exc)
