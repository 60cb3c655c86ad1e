"""What the engine uses of a model, declared: every member, typed.

``EngineCore`` (the engine thread) and ``LlamaCppEngine`` (its asyncio side)
use a model only through ``ModelProtocol``. ``LlamaCppModel`` (``model.py``,
llama.cpp) is one; the tests' scripted ``FakeModel`` is another, which is how
faults are injected without a GGUF file. A member either of them needs that
is not here is a type error under ``mypy --strict``.

Two kinds of member, as in ``LlamaCppModel``: the vocabulary and the model's
metadata are read-only and safe from any thread (the API tokenizes beside the
engine thread's decoding); everything that touches the context (the batch,
decoding, sampling, the sequences' KV) belongs to the engine thread alone
(``LlamaCppModel.decode`` says why).

No llama.cpp here (``tests/unit/test_layering.py``): the batch and the
samplers are protocols too.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from spigot.engine.llamacpp.prompt_tokens import SpecialToken
from spigot.engine.types import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLTokenizer


class BatchProtocol(Protocol):
    """The one batch a step fills: runs of tokens, each run one sequence's."""

    @property
    def n_tokens(self) -> int: ...

    def clear(self) -> None: ...

    def add(
        self, seq_id: int, tokens: list[int] | tuple[int, ...], start_pos: int, want_logits: bool
    ) -> int:
        """Append a run of one sequence's tokens; returns the batch index of the last one."""
        ...


class TokenSampler(Protocol):
    """The sampling state of one sequence."""

    def sample(self, batch_index: int) -> int:
        """A token from the logits of the last decode's row ``batch_index``."""
        ...

    def accept(self, token: int) -> None:
        """Record a token as generated (penalties count it), without sampling."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ModelProtocol(Protocol):
    """One loaded model and its one context."""

    # -- vocabulary and metadata: read-only, any thread ------------------------

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int:
        """Cells in the context's KV pool, shared by all sequences."""
        ...

    @property
    def n_ctx_train(self) -> int:
        """The context the model was trained for (0: unknown)."""
        ...

    @property
    def bos_id(self) -> int:
        """Beginning of sequence (-1: none)."""
        ...

    @property
    def eos_id(self) -> int:
        """End of sequence (-1: none)."""
        ...

    @property
    def add_bos(self) -> bool:
        """Whether a raw prompt starts with ``bos_id``."""
        ...

    @property
    def add_eos(self) -> bool:
        """Whether a raw prompt ends with ``eos_id``."""
        ...

    @property
    def pieces(self) -> Sequence[bytes]:
        """Every token's bytes, by id: what its text adds to a generation."""
        ...

    @property
    def eog_ids(self) -> frozenset[int]:
        """The tokens that end a generation."""
        ...

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value (``tokenizer.chat_template``), None if absent."""
        ...

    def token_text(self, token: int) -> str:
        """A token as text for display, special tokens included."""
        ...

    def special_tokens(self) -> list[SpecialToken]:
        """The tokens matched as whole texts before the rest is tokenized."""
        ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def grammar_tokenizer(self) -> LLTokenizer:
        """A new llguidance tokenizer of this vocabulary, its EOS tokens ``eog_ids``
        (for constrained decoding, ``constraint.py``). Slow (0.2 s for 49,152 tokens):
        build it once, off the engine thread."""
        ...

    # -- the context: the engine thread only -------------------------------------

    @property
    def batch(self) -> BatchProtocol: ...

    def decode(self) -> int:
        """Decode the batch: 0 ok, 1 no room in the KV pool (nothing written), else failed."""
        ...

    def logits_row(self, batch_index: int) -> npt.NDArray[np.float32]:
        """The last decode's logits for batch row ``batch_index`` (a view: copy to keep)."""
        ...

    def new_sampler(self, params: SamplingParams, *, suppress_eog: bool) -> TokenSampler:
        """A sequence's sampler; ``suppress_eog``: end-of-generation tokens are never sampled."""
        ...

    def remove_sequence(self, seq_id: int, keep: int = 0) -> None:
        """Drop a sequence's KV from position ``keep`` on (all of it by default)."""
        ...

    def clear_memory(self) -> None:
        """Drop every sequence's KV."""
        ...

    def save_sequence(self, seq_id: int) -> mmap.mmap | None:
        """A copy of a sequence's KV in host memory (None if there is none)."""
        ...

    def load_sequence(self, seq_id: int, data: mmap.mmap) -> bool:
        """Replace a sequence's KV with a saved copy; False if it did not fit."""
        ...

    def kv_bytes_per_token(self) -> int:
        """Host memory a saved sequence takes per token (may decode: engine thread)."""
        ...

    def close(self) -> None:
        """Free the context and the model; nothing may be used afterwards."""
        ...
