"""One thread decodes on a context: the engine thread, measurements at start included.

A second thread running ggml graphs makes libgomp stop spinning at barriers,
which slows one stream by about two fifths on 2 cores (``LlamaCppModel.decode``,
``python -m benchmarks.omp_teams``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from spigot.engine.llamacpp.engine import EngineOptions, LlamaCppEngine
from spigot.engine.llamacpp.model import ContextOptions, LlamaCppModel, set_native_logging
from spigot.engine.llamacpp.model_protocol import ModelProtocol
from spigot.engine.types import GenRequest, SamplingParams
from spigot.models import embedded_model_path
from tests.unit.fake_model import FakeModel


def on_a_thread(fn: Callable[[], object]) -> object:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def decode_one_token(model: LlamaCppModel) -> int:
    model.batch.clear()
    model.batch.add(0, [model.bos_id if model.bos_id >= 0 else 0], 0, True)
    rc = model.decode()
    model.remove_sequence(0)
    return rc


def test_a_context_refuses_a_decode_from_a_second_thread() -> None:
    set_native_logging(False)
    model = LlamaCppModel(
        embedded_model_path(), ContextOptions(n_ctx=512, n_seq_max=1, n_batch=32, n_threads=2)
    )
    try:
        # Every member the engine uses, present (mypy checks their types).
        assert isinstance(model, ModelProtocol)
        # Both on short-lived threads, so that no OpenMP team outlives the test. The
        # first stays alive until the second has tried: a finished thread's id may be
        # given to the next one, which would then pass for the first.
        decoded = threading.Event()
        release = threading.Event()
        first_rc: list[int] = []

        def first() -> None:
            first_rc.append(decode_one_token(model))
            decoded.set()
            release.wait(30)

        holder = threading.Thread(target=first)
        holder.start()
        try:
            assert decoded.wait(30)
            refused = on_a_thread(lambda: decode_one_token(model))
        finally:
            release.set()
            holder.join()
        assert first_rc == [0]
        assert isinstance(refused, RuntimeError)
        assert "one thread" in str(refused)
    finally:
        model.close()


async def test_a_served_model_decodes_on_the_engine_thread_only() -> None:
    set_native_logging(False)
    engine = LlamaCppEngine.load(
        "probe", embedded_model_path(), EngineOptions(n_ctx=1024, parallel=2, threads=2)
    )
    model = engine.model
    assert isinstance(model, LlamaCppModel)
    assert model.decoding_thread is None  # loading computes nothing
    await engine.start()
    try:
        # The host-memory tier is sized from a probe decode, done on the engine thread.
        assert engine.core.scheduler.saved.capacity_tokens > 0
        assert model.decoding_thread == engine.core.thread_ident
        params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
        prompt = engine.prepare_text("Hello")
        request = GenRequest(engine.new_request_id(), prompt, params)
        outputs = [o async for o in engine.submit([request])]
        assert outputs[-1].usage is not None and outputs[-1].usage.completion_tokens == 4
        assert model.decoding_thread == engine.core.thread_ident
    finally:
        engine.close()


async def test_call_runs_on_the_engine_thread_and_returns_its_result_or_error() -> None:
    engine = LlamaCppEngine("fake", FakeModel(), EngineOptions(n_ctx=1024, parallel=2))
    await engine.start()
    try:
        name = await asyncio.wrap_future(engine.core.call(lambda: threading.current_thread().name))
        assert name == "spigot-engine"

        def fail() -> None:
            raise ValueError("from the engine thread")

        with pytest.raises(ValueError, match="from the engine thread"):
            await asyncio.wrap_future(engine.core.call(fail))
        # The thread goes on serving after a failed call.
        assert await asyncio.wrap_future(engine.core.call(lambda: 42)) == 42
    finally:
        engine.close()


def test_the_fake_model_has_every_member_of_the_model_protocol() -> None:
    # At run time only the names are checked; mypy checks the types (fake_model.py).
    assert isinstance(FakeModel(), ModelProtocol)
