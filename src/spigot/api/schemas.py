"""OpenAI wire models for requests, validated with pydantic.

Unknown fields are accepted and dropped as they are read (and their names
logged, ``spigot.api.body``), as OpenAI-compatible servers do; known but
unsupported ones are refused (``spigot.api.unsupported``).
Conversion to the engine's own types happens here and only here
(``to_sampling_params``). Responses are built as plain dicts in the route
modules: they are on the hot path and their shape is fixed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from spigot.api.structured import ResponseFormat, check_constrained_sampling
from spigot.api.tools import ToolChoice, ToolDefinition, ToolRequest, check_history, tool_request
from spigot.engine.types import Constraint, SamplingParams
from spigot.errors import InvalidRequest, UnsupportedParameter

MAX_STOP_SEQUENCES = 4
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' max_tokens when absent or null

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Wire(BaseModel):
    # strict: "stream": "yes" or "temperature": "0.5" is a mistake to report,
    # not to guess at (ints are still accepted where a float is expected).
    # extra="ignore": an unknown field is not kept, however large it is.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Wire):
    include_usage: bool = False


class ContentPart(_Wire):
    # Any type parses, so that an image or audio part is refused by name
    # (``ChatCompletionRequest.check``) rather than as "not a text part".
    type: str
    text: str | None = None


class FunctionCall(_Wire):
    name: str
    arguments: str


class AssistantToolCall(_Wire):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this answers

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role not in ("assistant", "function"):
            raise PydanticCustomError(
                "content_required", "a {role} message needs 'content'", {"role": self.role}
            )
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def plain(self) -> dict[str, Any]:
        """The message for an engine: its role as sent, its text parts joined."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class SamplingRequest(_Wire):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM and llama.cpp accept the same names): generate exactly
    # as many tokens as asked, for benchmarks.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check(self) -> None:
        """Rules across fields (pydantic checks each field): 400 on a violation."""
        self.check_common()

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences are allowed, "
                f"got {len(self.stop)}.",
                param="stop",
            )

    def logit_bias_ids(self, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias); ids checked here unless ``vocab_size`` is
        None (an engine elsewhere knows its vocabulary and checks them)."""
        if not self.logit_bias:
            return ()
        out: list[tuple[int, float]] = []
        for key, bias in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidRequest(
                    f"Invalid key in 'logit_bias': {key!r} is not a token id.", param="logit_bias"
                ) from None
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                size = "" if vocab_size is None else f" (the vocabulary has {vocab_size} tokens)"
                raise InvalidRequest(
                    f"Invalid key in 'logit_bias': token id {token} is out of range{size}.",
                    param="logit_bias",
                )
            out.append((token, bias))
        return tuple(out)

    def to_sampling_params(
        self,
        *,
        max_tokens: int,
        max_tokens_given: bool = True,
        vocab_size: int | None,
        logprobs: int | None,
        choice: int,
        constraint: Constraint | None = None,
    ) -> SamplingParams:
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias_ids(vocab_size),
            stop=self.stop_list(),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            max_tokens_given=max_tokens_given,
            constraint=constraint,
            defaulted=frozenset(
                name for name in ("temperature", "top_p") if getattr(self, name) is None
            ),
        )


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Accepted and without effect here (no stored completions).
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check(self) -> None:
        self.check_common()
        for i, message in enumerate(self.messages):
            if not isinstance(message.content, list):
                continue
            for j, part in enumerate(message.content):
                if part.type != "text":
                    raise UnsupportedParameter(
                        f"Content parts of type '{part.type}' are not supported by this "
                        "model; only 'text' parts are.",
                        param=f"messages[{i}].content[{j}].type",
                    )
                if part.text is None:
                    raise InvalidRequest(
                        f"Missing required parameter: 'messages[{i}].content[{j}].text'.",
                        param=f"messages[{i}].content[{j}].text",
                    )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "Invalid 'top_logprobs': 'logprobs' must be set to true when "
                "'top_logprobs' is used.",
                param="top_logprobs",
            )
        check_history([m.plain() for m in self.messages])
        tools = self.tool_request()
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted or (tools is not None and tools.constrained):
            check_constrained_sampling(ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)
        if formatted and tools is not None and tools.choice == "auto":
            # Free text or a call, where the text must match a schema: two grammars at
            # once, lazily, which this server does not combine (yet).
            raise InvalidRequest(
                "'response_format' cannot be used with 'tool_choice': 'auto'; use "
                "'required', a named function, or 'none'.",
                param="response_format",
            )

    def tool_request(self) -> ToolRequest | None:
        """The request's tools and how they may be called (400 on a bad field);
        None without tools."""
        return tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def logprobs_count(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    # null means the default (16) here, as for every other optional field.
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.best_of is not None and self.best_of != self.choices:
            if self.stream:
                raise InvalidRequest("'best_of' cannot be used when streaming.", param="best_of")
            raise InvalidRequest(
                "'best_of' other than 'n' is not supported by this server.", param="best_of"
            )
        if self.suffix:
            raise InvalidRequest("'suffix' is not supported by this model.", param="suffix")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest(
                "'echo' together with 'logprobs' (prompt logprobs) is not supported.",
                param="logprobs",
            )
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequest("'prompt' must not be empty.", param="prompt")

    @property
    def requested_max_tokens(self) -> int:
        return DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: a string, or a list of token ids, each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Wire):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(_Wire):
    model: str
    tokens: list[int]
