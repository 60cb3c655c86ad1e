"""llama.cpp through llama-cpp-python's low-level API. The only module that imports llama_cpp.

``LlamaCppModel`` owns one model and one context. Only the engine thread may
call ``decode``, ``sample`` or change KV; tokenizing and the vocabulary tables
are read-only and safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import llama_cpp as ll
import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer

from spigot.engine.llamacpp.prompt_tokens import SpecialToken
from spigot.engine.types import SamplingParams

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


# ggml's log levels (ggml.h); CONT continues the previous line.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_native_log = logging.getLogger("spigot.llama_cpp")
_native_state = {"verbose": False, "level": logging.INFO}


def _log_native_line(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    py_level = _native_state["level"] if level == 5 else _GGML_LEVELS.get(level, logging.INFO)
    _native_state["level"] = py_level
    if _native_state["verbose"] or py_level >= logging.WARNING:
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            _native_log.log(max(py_level, logging.INFO), line)


# The C callback; referenced here for as long as llama.cpp may call it.
_forward_native_log = ll.llama_log_callback(_log_native_line)


def set_native_logging(verbose: bool) -> None:
    """llama.cpp's own log lines go to logging: all when verbose, else warnings and errors."""
    _native_state["verbose"] = verbose
    ll.llama_log_set(_forward_native_log, ctypes.c_void_p(0))


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            ll.llama_log_set(_forward_native_log, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _backend_ready = True


# Matched as special tokens only with parse_special (llama-vocab.cpp).
_CONTROL = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class ContextOptions:
    n_ctx: int
    n_seq_max: int
    n_batch: int
    n_threads: int


class Batch:
    """A ``llama_batch`` whose arrays are numpy-owned, so a step fills it with slices.

    Every token belongs to exactly one sequence, which is all the engine needs.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to its own seq id.
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)()
        base = self.seq.ctypes.data
        for i in range(capacity):
            self._seq_ptrs[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32))
        # Fields by keyword: llama_cpp annotates these pointer fields as arrays.
        self.struct = ll.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(ll.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(ll.llama_seq_id))),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(
        self, seq_id: int, tokens: list[int] | tuple[int, ...], start_pos: int, want_logits: bool
    ) -> int:
        """Append a run of one sequence's tokens; returns the batch index of the last one."""
        n = len(tokens)
        a, b = self.n_tokens, self.n_tokens + n
        if b > self.capacity:
            raise ValueError("batch overflow")
        self.token[a:b] = tokens
        self.pos[a:b] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.seq[a:b] = seq_id
        self.logits[a:b] = 0
        if want_logits:
            self.logits[b - 1] = 1
        self.n_tokens = b
        return b - 1


class Sampler:
    """One llama.cpp sampler chain: the sampling state of one sequence."""

    __slots__ = ("_chain", "_model")

    def __init__(self, model: LlamaCppModel, chain: ll.llama_sampler_p) -> None:
        self._model = model
        self._chain: ll.llama_sampler_p | None = chain  # None once freed

    def sample(self, batch_index: int) -> int:
        if self._chain is None:
            raise RuntimeError("the sampler is closed")
        return int(ll.llama_sampler_sample(self._chain, self._model.ctx, batch_index))

    def accept(self, token: int) -> None:
        if self._chain is None:
            raise RuntimeError("the sampler is closed")
        ll.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain is not None:
            ll.llama_sampler_free(self._chain)
            self._chain = None


class ArgmaxSampler:
    """Plain greedy decoding without a llama.cpp chain: argmax over the logits row.

    The common case for benchmarks and deterministic use; it skips building a
    candidate array of the whole vocabulary for every token.
    """

    __slots__ = ("_banned", "_model")

    def __init__(self, model: LlamaCppModel, banned: npt.NDArray[np.int64] | None) -> None:
        self._model = model
        self._banned = banned

    def sample(self, batch_index: int) -> int:
        row = self._model.logits_row(batch_index)
        token = int(row.argmax())
        if self._banned is not None and token in self._model.eog_ids:
            row = row.copy()
            row[self._banned] = -np.inf
            token = int(row.argmax())
        return token

    def accept(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


class LlamaCppModel:
    def __init__(self, path: Path, options: ContextOptions) -> None:
        _init_backend()
        self.path = path
        mparams = ll.llama_model_default_params()
        # ggml's AMX repacking path crashes on the first decode on CPUs that
        # report AMX; plain CPU buffers avoid it at no cost for small models.
        mparams.use_extra_bufts = False
        model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"could not load GGUF model from {path}")
        # llama_cpp's functions are untyped (Any): the types are declared here.
        self.model: ll.llama_model_p | None = model
        self.vocab: ll.llama_vocab_p = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(model))

        cparams = ll.llama_context_default_params()
        cparams.n_ctx = options.n_ctx
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        cparams.n_seq_max = options.n_seq_max
        cparams.n_threads = options.n_threads
        cparams.n_threads_batch = options.n_threads
        # One KV pool shared by all sequences: any one may use the whole context.
        cparams.kv_unified = True
        cparams.no_perf = True
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            ll.llama_model_free(model)
            raise ModelLoadError(f"could not create a context for {path}")
        self.ctx: ll.llama_context_p | None = ctx
        self.n_ctx = int(ll.llama_n_ctx(ctx))
        self.memory: ll.llama_memory_t = ll.llama_get_memory(ctx)
        self.batch = Batch(options.n_batch)
        self._decoding_thread: int | None = None  # the one thread that decodes

        self.pieces: list[bytes] = [self._piece(t) for t in range(self.n_vocab)]
        self.eog_ids: frozenset[int] = frozenset(
            t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t)
        )
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(ll.llama_vocab_get_add_eos(self.vocab))
        self.bos_id = int(ll.llama_vocab_bos(self.vocab))
        self.eos_id = int(ll.llama_vocab_eos(self.vocab))

    # -- metadata and tokens (any thread) ----------------------------------

    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def token_text(self, token: int) -> str:
        """A token as text for display, special tokens included."""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def special_tokens(self) -> list[SpecialToken]:
        """The tokens llama.cpp matches as whole texts before it tokenizes the rest.

        The same set as llama.cpp's own (control, user-defined and unknown
        tokens), with their raw texts.
        """
        found = []
        for token in range(self.n_vocab):
            attr = ll.llama_vocab_get_attr(self.vocab, token)
            if not attr & (_CONTROL | ll.LLAMA_TOKEN_ATTR_USER_DEFINED):
                continue
            raw = ll.llama_vocab_get_text(self.vocab, token) or b""
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # cannot occur in a str prompt
            if text:
                found.append(
                    SpecialToken(
                        token,
                        text,
                        control=bool(attr & _CONTROL),
                        lstrip=bool(attr & ll.LLAMA_TOKEN_ATTR_LSTRIP),
                        rstrip=bool(attr & ll.LLAMA_TOKEN_ATTR_RSTRIP),
                    )
                )
        return found

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's tokenizer; any thread (it reads the vocabulary, the buffer is per call).

        With ``parse_special`` it is quadratic in the number of special tokens
        in ``text``: prompts go through ``PromptTokenizer`` instead.
        """
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def grammar_tokenizer(self) -> LLTokenizer:
        """An llguidance tokenizer of this vocabulary (any thread: it reads the
        vocabulary; its tokenizing calls ``llama_tokenize``, which only reads too).

        What ``llguidance.llamacpp.lltokenizer_from_vocab`` does, but that calls
        llama_cpp's deprecated ``llama_token_get_attr``: one DeprecationWarning per
        token, and silencing them would take the process-wide warnings filter
        from whatever thread builds this.
        """
        tokens: list[bytes] = []
        for token in range(self.n_vocab):
            raw = self._piece(token, special=True)
            attr = ll.llama_vocab_get_attr(self.vocab, token)
            # llguidance's mark of a special token: a leading 0xff byte, which no
            # UTF-8 text has (so a grammar's text never matches one by accident).
            if attr & ll.LLAMA_TOKEN_ATTR_CONTROL or (
                attr & ll.LLAMA_TOKEN_ATTR_USER_DEFINED
                and raw.startswith(b"<")
                and raw.endswith(b">")
            ):
                raw = b"\xff" + raw
            tokens.append(raw)
        # llguidance tokenizes text (a lazy grammar's trigger) with llama.cpp's
        # own tokenizer, called natively through this pointer.
        tokenize = ctypes.cast(ll.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        from_llamacpp = getattr(LLTokenizer, "from_llamacpp")  # noqa: B009 (not in its stubs)
        return cast(
            LLTokenizer,
            from_llamacpp(
                tokens=tokens,
                vocab_ptr=self.vocab,
                tokenize_fptr=tokenize,
                # Every end-of-generation token: the mask allows ending on any of them.
                eos_token=sorted(self.eog_ids),
                slices=None,
            ),
        )

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    # -- engine thread only -------------------------------------------------

    @property
    def decoding_thread(self) -> int | None:
        """The ident of the thread that decodes on this context, once one has."""
        return self._decoding_thread

    def decode(self) -> int:
        """Decode the current batch. 0 = ok, 1 = no KV space, other = failure.

        Only the first thread that decodes on this context may decode on it.
        llama.cpp's CPU backend runs each graph as an OpenMP parallel region,
        and libgomp keeps a team of worker threads for every thread that ever
        ran one, for as long as that thread lives. Once a process holds more
        of them than cores, libgomp stops spinning at barriers, so each of the
        hundreds of barriers in a decode puts a thread to sleep and wakes it:
        on 2 cores, one stream decoded at 78 instead of 136 tok/s once another
        thread had decoded a token (``python -m benchmarks.omp_teams``).
        """
        thread = threading.get_ident()
        if self._decoding_thread is None:
            self._decoding_thread = thread
        elif thread != self._decoding_thread:
            raise RuntimeError("a context decodes on one thread only (see LlamaCppModel.decode)")
        self.batch.struct.n_tokens = self.batch.n_tokens
        return int(ll.llama_decode(self.ctx, self.batch.struct))

    def logits_row(self, batch_index: int) -> npt.NDArray[np.float32]:
        ptr = ll.llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def remove_sequence(self, seq_id: int, keep: int = 0) -> None:
        """Drop a sequence's KV from position ``keep`` on (all of it by default)."""
        ll.llama_memory_seq_rm(self.memory, seq_id, keep if keep > 0 else -1, -1)

    def clear_memory(self) -> None:
        ll.llama_memory_clear(self.memory, True)

    def save_sequence(self, seq_id: int) -> mmap.mmap | None:
        """A copy of a sequence's KV in host memory (None if llama.cpp wrote none).

        Each copy is its own anonymous mapping, so freeing it returns the
        memory to the system at once instead of leaving holes in the heap.
        """
        size = ll.llama_state_seq_get_size(self.ctx, seq_id)
        if size <= 0:
            return None
        # Populated up front: faulting the pages in one by one costs more.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        data = mmap.mmap(-1, size, flags=flags)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = ll.llama_state_seq_get_data(self.ctx, view, size, seq_id)
        del view  # the mapping cannot be closed while a ctypes view exports it
        if written != size:
            data.close()
            return None
        return data

    def load_sequence(self, seq_id: int, data: mmap.mmap) -> bool:
        """Replace a sequence's KV with a saved copy; False if it did not fit."""
        view = (ctypes.c_uint8 * len(data)).from_buffer(data)
        try:
            return int(ll.llama_state_seq_set_data(self.ctx, view, len(data), seq_id)) > 0
        finally:
            del view

    def kv_bytes_per_token(self) -> int:
        """Host memory a saved sequence takes per token, measured on this context."""
        sizes: list[int] = []
        for n in (1, 2):
            self.batch.clear()
            self.batch.add(0, [self.bos_id if self.bos_id >= 0 else 0] * n, 0, False)
            if self.decode() != 0:
                raise ModelLoadError("could not decode a probe batch")
            sizes.append(int(ll.llama_state_seq_get_size(self.ctx, 0)))
            self.remove_sequence(0)
        self.batch.clear()
        return max(sizes[1] - sizes[0], 1)

    def new_sampler(self, params: SamplingParams, *, suppress_eog: bool) -> Sampler | ArgmaxSampler:
        if (
            params.greedy
            and not params.logit_bias
            and not params.presence_penalty
            and not params.frequency_penalty
        ):
            banned = np.fromiter(self.eog_ids, dtype=np.int64) if suppress_eog else None
            return ArgmaxSampler(self, banned)
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        bias = dict(params.logit_bias)
        if suppress_eog:
            for t in self.eog_ids:
                bias[t] = -math.inf
        if bias:
            arr = (ll.llama_logit_bias * len(bias))(
                *(ll.llama_logit_bias(token=tok, bias=b) for tok, b in bias.items())
            )
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr)
            )
        if params.presence_penalty or params.frequency_penalty:
            # OpenAI's penalties count every generated token so far.
            window = min(params.max_tokens, 4096)
            ll.llama_sampler_chain_add(
                chain,
                ll.llama_sampler_init_penalties(
                    self.n_vocab,
                    window,
                    1.0,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.greedy:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            if params.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            seed = ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return Sampler(self, chain)

    def close(self) -> None:
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None
