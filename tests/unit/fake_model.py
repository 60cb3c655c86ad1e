"""A deterministic stand-in for LlamaCppModel: scripted tokens, injectable faults.

For unit tests and fault injection only; every feature is also tested on the
real model end to end. It is a ``ModelProtocol`` (checked by mypy below, and
by ``isinstance`` in ``test_compute_thread.py``).

Constrained decoding: ``grammar_tokenizer`` gives llguidance the fake
vocabulary (letters, space, the two bytes of "é", and EOS). Each step's logits
rows are zeros that a grammar may mask; the sampler follows its script
regardless (a token the grammar refuses is how a matcher error is injected),
unless ``obey_masks``: then a scripted token that is masked (or held back
end of generation) gives way to the first allowed one, and a row that allows
nothing fails the step, where llama.cpp would sample garbage.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer
from llguidance._tokenizer import TokenizerWrapper

from spigot.engine.llamacpp.model import Batch
from spigot.engine.llamacpp.prompt_tokens import SpecialToken
from spigot.engine.types import SamplingParams

EOS = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz "
# Token 1..27 are letters and space; 28 and 29 are the two bytes of "é".
PIECES = [b"", *(c.encode() for c in LETTERS), b"\xc3", b"\xa9"]
E_ACUTE = (28, 29)


def token_of(ch: str) -> int:
    return LETTERS.index(ch) + 1


@dataclass
class FakeSampler:
    model: FakeModel
    suppress_eog: bool
    position: int = 0

    def sample(self, batch_index: int) -> int:
        while True:
            token = self.model.script[self.position % len(self.model.script)]
            self.position += 1
            if not (self.suppress_eog and token == EOS):
                break
        row = self.model.logits_row(batch_index)
        self.model.sampled_rows.append(row.copy())
        if not self.model.obey_masks:
            return token
        allowed = row.copy()
        if self.suppress_eog:
            allowed[EOS] = -np.inf  # as llama.cpp's logit bias does
        if not np.isfinite(allowed).any():
            raise RuntimeError("sampling from a distribution without any token")
        if allowed[token] == -np.inf:
            return int(np.argmax(allowed))  # the first token the mask allows
        return token

    def accept(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FakeModel:
    script: list[int] = field(default_factory=lambda: [token_of(c) for c in "hello world"] + [EOS])
    n_ctx: int = 1024
    n_ctx_train: int = 1024
    fail_at_step: int | None = None  # decode returns -1 on this step (1-based)
    full_at_step: int | None = None  # decode returns 1 (no KV room) on this step
    steps: int = 0
    removed: list[tuple[int, int]] = field(default_factory=list)  # (slot, keep)
    saved: list[int] = field(default_factory=list)  # slots copied out, in order
    loaded: list[int] = field(default_factory=list)  # slots a copy was loaded into
    fail_loads: bool = False  # load_sequence finds no room
    # Simulated time: each decode advances ``now`` by step_seconds(tokens in the batch).
    step_seconds: Callable[[int], float] | None = None
    now: float = 0.0
    obey_masks: bool = False  # the sampler avoids tokens a grammar masked
    # The logits rows the sampler read, as it read them (masks applied).
    sampled_rows: list[npt.NDArray[np.float32]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pieces: list[bytes] = PIECES
        self.n_vocab: int = len(PIECES)
        self.eog_ids: frozenset[int] = frozenset({EOS})
        self.bos_id: int = -1
        self.eos_id: int = EOS
        self.add_bos: bool = False
        self.add_eos: bool = False
        self.batch: Batch = Batch(64)
        self._rows: dict[int, npt.NDArray[np.float32]] = {}
        self.tokenizers_built = 0

    def metadata(self, key: str) -> str | None:
        return None

    def token_text(self, token: int) -> str:
        return PIECES[token].decode(errors="replace")

    def special_tokens(self) -> list[SpecialToken]:
        return []

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [token_of(c) if c in LETTERS else token_of(" ") for c in text]

    def grammar_tokenizer(self) -> LLTokenizer:
        self.tokenizers_built += 1
        return fake_grammar_tokenizer()

    def clock(self) -> float:
        return self.now

    def decode(self) -> int:
        self.steps += 1
        self._rows.clear()  # fresh logits every step, as llama.cpp's
        if self.step_seconds is not None:
            self.now += self.step_seconds(self.batch.n_tokens)
        if self.fail_at_step is not None and self.steps == self.fail_at_step:
            return -1
        if self.full_at_step is not None and self.steps == self.full_at_step:
            return 1
        return 0

    def logits_row(self, batch_index: int) -> npt.NDArray[np.float32]:
        # One array per row and step, so a mask written into it stays, as in
        # llama.cpp's logits buffer.
        row = self._rows.get(batch_index)
        if row is None:
            row = self._rows[batch_index] = np.zeros(self.n_vocab, dtype=np.float32)
        return row

    def remove_sequence(self, seq_id: int, keep: int = 0) -> None:
        self.removed.append((seq_id, keep))

    def clear_memory(self) -> None:
        pass

    def save_sequence(self, seq_id: int) -> mmap.mmap:
        self.saved.append(seq_id)
        data = mmap.mmap(-1, 16)
        data.write(seq_id.to_bytes(16, "little"))
        return data

    def load_sequence(self, seq_id: int, data: mmap.mmap) -> bool:
        if self.fail_loads:
            return False
        self.loaded.append(seq_id)
        return True

    def kv_bytes_per_token(self) -> int:
        return 1024

    def new_sampler(self, params: SamplingParams, *, suppress_eog: bool) -> FakeSampler:
        return FakeSampler(self, suppress_eog)

    def close(self) -> None:
        pass


class _FakeTokenizer:
    """What ``TokenizerWrapper`` reads: the tokens' bytes and a tokenize function."""

    eos_token_id = EOS
    bos_token_id = None
    # llguidance marks special tokens with a leading 0xff byte (its llama.cpp bridge does too).
    tokens: ClassVar[list[bytes]] = [b"\xff<eos>", *PIECES[1:]]
    special_token_ids: ClassVar[list[int]] = [EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        raw = text if isinstance(text, bytes) else text.encode()
        out: list[int] = []
        for ch in raw.decode(errors="ignore"):
            out += list(E_ACUTE) if ch == "é" else [token_of(ch if ch in LETTERS else " ")]
        return out


def fake_grammar_tokenizer() -> LLTokenizer:
    """llguidance's tokenizer of the fake vocabulary, EOS its end of generation."""
    return LLTokenizer(TokenizerWrapper(_FakeTokenizer()))


if TYPE_CHECKING:
    from spigot.engine.llamacpp.model_protocol import ModelProtocol

    # mypy: the fake has every member of the protocol, with compatible types.
    _fake_is_a_model: ModelProtocol = FakeModel()
