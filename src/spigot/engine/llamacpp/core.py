"""The engine thread: the one owner of llama.cpp.

Each step it drains its inbox (new requests, aborts), asks the scheduler for
one batch, decodes it, samples the sequences that completed, turns their
tokens into text deltas, and hands all of the step's outputs to ``emit`` in
one call. Admission and aborts take effect at every step. Each decode is
timed, so that while streams decode, prompt chunks are sized to a time budget
(``step_costs.py``). A constrained sequence's logits are masked by its grammar
before its sampler runs (``constraint.py``).
"""

from __future__ import annotations

import logging
import math
import mmap
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spigot.engine.llamacpp.constraint import Grammars, SequenceGrammar
from spigot.engine.llamacpp.model_protocol import ModelProtocol, TokenSampler
from spigot.engine.llamacpp.output import TextAssembler
from spigot.engine.llamacpp.prefix_cache import DropKV, ForgetKV, LoadKV, SaveKV
from spigot.engine.llamacpp.scheduler import Scheduler, Sequence, StepPlan
from spigot.engine.llamacpp.step_costs import StepCosts
from spigot.engine.types import FinishReason, GenOutput, GenRequest, TokenLogprob, Usage

log = logging.getLogger(__name__)

Emit = Callable[[list[tuple[str, GenOutput]]], None]

# Prompt tokens per step while streams decode, until the first steps have been
# timed; and the prompt work a step may always carry, so that a newcomer is not
# starved while one fast stream decodes.
FALLBACK_PREFILL_TOKENS = 32
MIN_PREFILL_SECONDS = 0.04


@dataclass(slots=True)
class _Runtime:
    """Per-sequence state the scheduler does not need to know about."""

    sampler: TokenSampler | None
    text: TextAssembler
    eog_suppressed: bool
    grammar: SequenceGrammar | None = None  # a constrained sequence's matcher
    logprobs: list[TokenLogprob] = field(default_factory=list)


class EngineCore:
    def __init__(
        self,
        model: ModelProtocol,
        scheduler: Scheduler,
        emit: Emit,
        prefill_slowdown: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
        grammars: Grammars | None = None,
    ) -> None:
        """``prefill_slowdown``: while streams decode, a step with prompt tokens
        may take this many times a decode-only step; 0 leaves chunk sizes to
        the scheduler's token limits alone. ``clock`` times the decodes.
        ``grammars``: the model's compiled grammars (made here if not given)."""
        self.model = model
        self.grammars = grammars or Grammars(model.grammar_tokenizer, model.n_vocab)
        self.scheduler = scheduler
        self._emit = emit
        self.prefill_slowdown = prefill_slowdown
        self.costs = StepCosts()
        self._clock = clock
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spigot-engine", daemon=True)
        self._stopping = False
        self.steps = 0
        # The bytes of the scheduler's saved prefixes, by entry id.
        self._saved: dict[int, mmap.mmap] = {}

    # -- any thread --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def thread_ident(self) -> int | None:
        return self._thread.ident

    def add(self, request: GenRequest) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between steps; its result or error in the future.

        For work on the model that must not run on another thread
        (``LlamaCppModel.decode`` says why): measurements at start, benchmarks.
        """
        future: Future[Any] = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread; False if it is still inside a step after ``timeout``."""
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int | float | None]:
        """A racy snapshot for /health and tests; good enough for monitoring."""
        running = len(self.scheduler.running)
        decode_step = self.costs.decode_step_s(max(running, 1))
        prompt_token = self.costs.prompt_token_s
        return {
            "running": running,
            "waiting": len(self.scheduler.waiting),
            "kv_used": self.scheduler.kv_used(),
            "saved_prefix_tokens": self.scheduler.saved.tokens,
            "steps": self.steps,
            # The moving averages that size prompt chunks (None until seen),
            # the decode step for as many streams as run now.
            "decode_step_ms": None if decode_step is None else round(decode_step * 1000, 3),
            "prompt_token_ms": None if prompt_token is None else round(prompt_token * 1000, 3),
        }

    # -- engine thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.scheduler.has_work())
                if self._stopping:
                    break
                if self.scheduler.has_work():
                    self._step_safely()
        finally:
            self._fail_all("the server is shutting down")

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                assert isinstance(arg, GenRequest)
                self.scheduler.add(Sequence.from_request(arg))
            elif kind == "abort":
                assert isinstance(arg, str)
                seq = self.scheduler.abort(arg)
                if seq is not None:
                    self._release(seq)
                    # The last word on an aborted sequence: what it consumed.
                    self._emit([(seq.request_id, self._final_output(seq, FinishReason.ABORT))])
            elif kind == "call":
                assert isinstance(arg, tuple)
                fn, future = arg
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)
            elif kind == "stop":
                self._stopping = True
                return

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception:
            log.exception("engine step failed")
            self._fail_all("the engine failed while generating")
            self.model.clear_memory()
            self.scheduler.forget_cache()

    def _prefill_limit(self, decoding: int, prefilling: int) -> int:
        return self.costs.prompt_budget(
            self.prefill_slowdown,
            MIN_PREFILL_SECONDS,
            FALLBACK_PREFILL_TOKENS,
            decoding,
            prefilling,
        )

    def _apply_kv_ops(self) -> bool:
        """Carry out the scheduler's KV edits and copies; False if a saved
        prefix could not be loaded (its sequence then computes its prompt)."""
        loaded = True
        for op in self.scheduler.take_kv_ops():
            if isinstance(op, DropKV):
                self.model.remove_sequence(op.slot, op.keep)
            elif isinstance(op, SaveKV):
                data = self.model.save_sequence(op.slot)
                if data is None:
                    self.scheduler.saved.remove_id(op.entry)
                else:
                    self._saved[op.entry] = data
            elif isinstance(op, LoadKV):
                data = self._saved.get(op.entry)
                if data is None or not self.model.load_sequence(op.slot, data):
                    log.warning("could not load a saved prefix; computing it instead")
                    self.model.remove_sequence(op.slot)
                    self.scheduler.load_failed(op.slot, op.entry)
                    self._forget_saved(op.entry)
                    loaded = False
            elif isinstance(op, ForgetKV):
                self._forget_saved(op.entry)
        return loaded

    def _forget_saved(self, entry: int) -> None:
        data = self._saved.pop(entry, None)
        if data is not None:
            data.close()

    def _schedule(self) -> StepPlan:
        limit = self._prefill_limit if self.prefill_slowdown > 0 else None
        plan = self.scheduler.schedule(limit)
        while not self._apply_kv_ops():
            # A sequence planned from a prefix that failed to load starts over;
            # each failure forgets one saved prefix, so this ends.
            plan = self.scheduler.schedule(limit)
        return plan

    def _step(self) -> None:
        plan = self._schedule()
        if not plan.chunks:
            return
        batch = self.model.batch
        batch.clear()
        sample_at: list[tuple[Sequence, int]] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            assert seq.slot is not None
            idx = batch.add(
                seq.slot, seq.tokens[chunk.start : chunk.end], chunk.start, chunk.completes
            )
            if chunk.completes:
                sample_at.append((seq, idx))
        started = self._clock()
        rc = self.model.decode()
        seconds = self._clock() - started
        self.steps += 1
        if rc == 1:
            self._recover_from_full_kv()
            return
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.costs.record(plan.num_decode, batch.n_tokens - plan.num_decode, seconds)

        sampled: dict[Sequence, int] = {}
        failed: list[tuple[Sequence, str]] = []
        for seq, idx in sample_at:
            token = self._sample(seq, idx)
            if isinstance(token, str):
                failed.append((seq, token))
            else:
                sampled[seq] = token
        self.scheduler.update(plan, sampled)

        outputs: list[tuple[str, GenOutput]] = [
            (seq.request_id, self._end_with_error(seq, message)) for seq, message in failed
        ]
        for seq, token in sampled.items():
            out = self._process_token(seq, token)
            if out is not None:
                outputs.append((seq.request_id, out))
        if outputs:
            self._emit(outputs)

    def _recover_from_full_kv(self) -> None:
        # llama.cpp found no room for the batch (the pool is fragmented or
        # fuller than the scheduler's count) and wrote nothing: free cached
        # prefixes, or else recompute the newest sequence later, and retry.
        if not self.scheduler.evict_caches():
            running = self.scheduler.running
            if len(running) <= 1:
                raise RuntimeError("no KV space for a single sequence")
            self.scheduler.preempt(running[-1])
        self._apply_kv_ops()

    def _runtime(self, seq: Sequence) -> _Runtime:
        rt: _Runtime | None = seq.runtime
        if rt is None:
            params = seq.request.params
            constraint = params.constraint
            grammar = None if constraint is None else SequenceGrammar(self.grammars, constraint)
            rt = _Runtime(
                sampler=None,
                text=TextAssembler(params.stop),
                # While a grammar masks, it alone decides where the sequence may
                # end: held-back end-of-generation could leave no token allowed.
                eog_suppressed=(params.ignore_eos or params.min_tokens > 0)
                and (grammar is None or not grammar.masking),
                grammar=grammar,
            )
            seq.runtime = rt
        return rt

    def _sample(self, seq: Sequence, idx: int) -> int | str:
        """The next token, or why the sequence must end with an error (its grammar)."""
        rt = self._runtime(seq)
        params = seq.request.params
        grammar = rt.grammar
        if rt.eog_suppressed and (
            (grammar is not None and grammar.masking)
            or (not params.ignore_eos and seq.num_generated >= params.min_tokens)
        ):
            # min_tokens reached, or a lazy grammar took over: sample with
            # end-of-generation allowed again, replaying what was generated so
            # penalties still see it.
            if rt.sampler is not None:
                rt.sampler.close()
            rt.sampler = self.model.new_sampler(params, suppress_eog=False)
            for t in seq.tokens[seq.num_prompt :]:
                rt.sampler.accept(t)
            rt.eog_suppressed = False
        if rt.sampler is None:
            rt.sampler = self.model.new_sampler(params, suppress_eog=rt.eog_suppressed)
        if grammar is not None:
            # In place, before the sampler reads the row.
            if grammar.masking:
                grammar.mask(self.model.logits_row(idx))
            if grammar.error is not None:
                return grammar.error
        token = rt.sampler.sample(idx)
        if params.logprobs is not None:
            rt.logprobs.append(self._logprob(idx, token, params.logprobs))
        if grammar is not None:
            grammar.accept(token, self.model.pieces[token])
        return token

    def _logprob(self, idx: int, token: int, top_n: int) -> TokenLogprob:
        row = self.model.logits_row(idx).astype(np.float64)
        peak = row.max()
        log_z = peak + math.log(float(np.exp(row - peak).sum()))
        top: tuple[tuple[str, bytes, float], ...] = ()
        if top_n > 0:
            best = np.argpartition(row, -top_n)[-top_n:]
            best = best[np.argsort(row[best])[::-1]]
            # A grammar's mask leaves refused tokens at -inf: not alternatives.
            top = tuple(
                self._token_entry(int(t), float(row[t] - log_z))
                for t in best
                if np.isfinite(row[t])
            )
        text, raw, lp = self._token_entry(token, float(row[token] - log_z))
        return TokenLogprob(text, raw, lp, top)

    def _token_entry(self, token: int, logprob: float) -> tuple[str, bytes, float]:
        raw = self.model.pieces[token]
        return raw.decode("utf-8", errors="replace"), raw, logprob

    def _process_token(self, seq: Sequence, token: int) -> GenOutput | None:
        """Text for a freshly sampled token, and whether the sequence ends here."""
        rt: _Runtime = seq.runtime
        grammar = rt.grammar
        if grammar is not None and grammar.error is not None:
            return self._end_with_error(seq, grammar.error)
        reason: FinishReason | None = None
        stopped_by_string = False
        text = ""
        if token in self.model.eog_ids and not rt.eog_suppressed:
            reason = FinishReason.STOP
        else:
            step = rt.text.push(self.model.pieces[token])
            text = step.text
            if step.stopped:
                reason = FinishReason.STOP
                stopped_by_string = True
        if reason is None and grammar is not None and grammar.complete:
            reason = FinishReason.STOP  # the output matches and nothing may follow
        if reason is None and seq.num_generated >= seq.request.params.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            if not text:
                return None  # held text keeps its logprobs until it is released
            return GenOutput(seq.request.choice_index, text, self._take_logprobs(rt))
        if not stopped_by_string:
            tail = rt.text.finish()
            text += tail.text
            if tail.stopped:
                reason = FinishReason.STOP
        self.scheduler.finish(seq, reason)
        self._release(seq)
        return self._final_output(seq, reason, text, self._take_logprobs(rt))

    def _end_with_error(self, seq: Sequence, message: str) -> GenOutput:
        """End one sequence that cannot go on (its grammar failed); the others run on."""
        log.warning("sequence %s ended: %s", seq.request_id, message)
        self.scheduler.finish(seq, FinishReason.ERROR)
        self._release(seq)
        return self._final_output(seq, FinishReason.ERROR, error=message)

    @staticmethod
    def _final_output(
        seq: Sequence,
        reason: FinishReason,
        text: str = "",
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> GenOutput:
        return GenOutput(
            seq.request.choice_index,
            text,
            logprobs or [],
            reason,
            Usage(seq.num_prompt, seq.num_generated, cached_tokens=seq.num_cached),
            error,
        )

    @staticmethod
    def _take_logprobs(rt: _Runtime) -> list[TokenLogprob]:
        # Logprobs travel with the text they produced.
        if not rt.logprobs:
            return []
        taken, rt.logprobs = rt.logprobs, []
        return taken

    def _release(self, seq: Sequence) -> None:
        # KV stays: the scheduler keeps it as a cached prefix or queues its removal.
        rt = seq.runtime
        if rt is not None and rt.sampler is not None:
            rt.sampler.close()
            rt.sampler = None
        if rt is not None:
            rt.grammar = None  # its matcher's memory, at once

    def _fail_all(self, message: str) -> None:
        outputs: list[tuple[str, GenOutput]] = []
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, FinishReason.ERROR)
            self._release(seq)
            outputs.append(
                (seq.request_id, self._final_output(seq, FinishReason.ERROR, error=message))
            )
        if outputs:
            self._emit(outputs)
