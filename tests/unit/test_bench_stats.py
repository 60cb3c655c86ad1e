"""The load generator's pure parts, and its orchestration over a mocked network.

Percentiles and level aggregation on hand-made samples with known answers;
SSE parsing of a stream body recorded from ``spigot serve``; error
classification; and ``run_bench`` against ``httpx.MockTransport`` servers
(token-count fallbacks, failures counted, interleaving). No timings asserted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from spigot.bench.load import BenchConfig, Target, run_bench
from spigot.bench.report import markdown
from spigot.bench.request import (
    RequestResult,
    StreamFailure,
    StreamRecorder,
    classify_error,
    error_label,
    request_body,
    send_request,
)
from spigot.bench.results import error_totals, samples
from spigot.bench.stats import (
    LevelRun,
    aggregate_level,
    count_errors,
    percentile,
    ratio,
    summarize,
    token_source,
)
from spigot.bench.workloads import (
    Prompt,
    estimate_tokens,
    load_workload,
    parse_prompt_set,
)
from spigot.sse_parser import SSEParser

# -- percentiles ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0, 1.0), (25, 1.75), (50, 2.5), (90, 3.7), (99, 3.97), (100, 4.0)],
)
def test_percentile_interpolates_linearly_between_ranks(q: float, expected: float) -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_of_one_value_and_of_none() -> None:
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_on_an_odd_count_hits_the_middle_value() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0]
    assert percentile(values, 50) == 60.0
    assert percentile(values, 90) == 100.0
    assert percentile(values, 99) == pytest.approx(109.0)


def test_summarize_scales_seconds_to_milliseconds() -> None:
    summary = summarize([0.1, 0.2, 0.3, 0.4])
    assert summary == {
        "p50": 250.0,
        "p90": 370.0,
        "p99": 397.0,
        "mean": 250.0,
        "min": 100.0,
        "max": 400.0,
        "count": 4,
    }
    assert summarize([])["p50"] is None
    assert summarize([])["count"] == 0


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None


# -- aggregation ---------------------------------------------------------------


def ok_result(start: float, chunk_times: list[float], end: float, tokens: int) -> RequestResult:
    result = RequestResult(
        prompt_id="p",
        start=start,
        end=end,
        chunk_times=chunk_times,
        text="x" * len(chunk_times),
        usage_tokens=tokens,
        prompt_tokens=10,
    )
    result.output_tokens = tokens
    return result


def failed_result(kind: Any, status: int | None = None, message: str = "boom") -> RequestResult:
    return RequestResult(
        prompt_id="p",
        start=0.0,
        end=0.5,
        chunk_times=[],
        text="",
        usage_tokens=None,
        prompt_tokens=None,
        error_kind=kind,
        status=status,
        error=message,
    )


def test_request_result_derives_ttft_gaps_and_tpot() -> None:
    result = ok_result(10.0, [10.5, 10.75, 11.0, 11.5], 11.5, tokens=4)
    assert result.ok
    assert result.ttft == pytest.approx(0.5)
    assert result.gaps == pytest.approx([0.25, 0.25, 0.5])
    assert result.e2e == pytest.approx(1.5)
    # (e2e - ttft) / (tokens - 1) = (1.5 - 0.5) / 3
    assert result.tpot == pytest.approx(1 / 3)
    single = ok_result(0.0, [0.2], 0.2, tokens=1)
    assert single.tpot is None


def test_aggregate_level_on_known_samples() -> None:
    # Two requests of 3 tokens: TTFTs 0.1 and 0.3 s, gaps 0.1/0.1 and 0.2/0.2 s.
    a = ok_result(0.0, [0.1, 0.2, 0.3], 0.3, tokens=3)
    b = ok_result(0.0, [0.3, 0.5, 0.7], 0.7, tokens=3)
    failed = failed_result("http", 503, "overloaded")
    level = aggregate_level([LevelRun(2, 2.0, [a, b, failed])])
    assert level["concurrency"] == 2
    assert (level["requests"], level["ok"]) == (3, 2)
    assert level["output_tokens"] == 6
    assert level["output_tokens_per_s"] == 3.0  # 6 tokens over 2 s of wall time
    assert level["requests_per_s"] == 1.0  # failed requests do not count
    assert level["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert level["ttft_ms"]["min"] == pytest.approx(100.0)
    assert level["itl_ms"]["count"] == 4
    assert level["itl_ms"]["p50"] == pytest.approx(150.0)
    assert level["tpot_ms"]["p50"] == pytest.approx(150.0)  # (0.2/2 + 0.4/2) / 2
    assert level["e2e_ms"]["p99"] == pytest.approx(696.0)
    assert level["prompt_tokens_mean"] == 10.0
    assert level["cached_tokens_mean"] is None  # no request reported any
    assert level["token_count_source"] == "usage"
    assert level["errors"] == {
        "total": 1,
        "by_kind": {"http_503": 1},
        "samples": ["http_503: overloaded"],
    }


def test_rounds_pool_latencies_and_take_the_median_throughput() -> None:
    runs = [
        LevelRun(1, 1.0, [ok_result(0.0, [0.1, 0.2], 0.2, tokens=10)]),
        LevelRun(1, 2.0, [ok_result(0.0, [0.3, 0.4], 0.4, tokens=10)]),
        LevelRun(1, 4.0, [ok_result(0.0, [0.5, 0.6], 0.6, tokens=10)]),
    ]
    level = aggregate_level(runs)
    assert level["output_tokens_per_s"] == 5.0  # median of 10, 5, 2.5
    assert level["ttft_ms"]["count"] == 3
    assert level["ttft_ms"]["p50"] == pytest.approx(300.0)
    assert [r["output_tokens_per_s"] for r in level["rounds"]] == [10.0, 5.0, 2.5]
    assert level["wall_s"] == 7.0


def test_cached_tokens_average_over_the_requests_that_report_them() -> None:
    reported = [ok_result(0.0, [0.1], 0.1, tokens=1) for _ in range(3)]
    for result, cached in zip(reported, (0, 4, 8), strict=True):
        result.cached_tokens = cached
    silent = ok_result(0.0, [0.1], 0.1, tokens=1)
    level = aggregate_level([LevelRun(1, 1.0, [*reported, silent])])
    assert level["cached_tokens_mean"] == 4.0


def test_raw_samples_say_when_each_request_was_sent_within_its_round() -> None:
    first = [ok_result(100.0, [100.2], 100.2, tokens=1), ok_result(100.5, [101.5], 101.5, tokens=1)]
    second = [ok_result(7.0, [7.3], 7.3, tokens=1)]
    rows = samples([LevelRun(2, 2.0, first), LevelRun(2, 1.0, second)])
    assert [(r["round"], r["sent_ms"], r["ttft_ms"]) for r in rows] == [
        (0, 0.0, 200.0),
        (0, 500.0, 1000.0),
        (1, 0.0, 300.0),
    ]


def test_a_level_where_everything_failed_has_no_latencies() -> None:
    level = aggregate_level([LevelRun(1, 0.1, [failed_result("connection")] * 3)])
    assert level["ok"] == 0
    assert level["output_tokens_per_s"] == 0.0
    assert level["ttft_ms"]["p50"] is None
    assert level["token_count_source"] is None
    assert level["errors"]["by_kind"] == {"connection": 3}
    assert level["errors"]["samples"] == ["connection: boom"]  # distinct messages only


def test_error_counts_by_kind_and_distinct_samples() -> None:
    results = [
        failed_result("http", 404, "no such model"),
        failed_result("http", 404, "no such model"),
        failed_result("timeout", None, "slow"),
        failed_result("stream", None, "engine failed"),
        ok_result(0.0, [0.1], 0.1, tokens=1),
    ]
    counted = count_errors(results)
    assert counted["total"] == 4
    assert counted["by_kind"] == {"http_404": 2, "stream": 1, "timeout": 1}
    assert counted["samples"] == [
        "http_404: no such model",
        "timeout: slow",
        "stream: engine failed",
    ]


def test_token_source_names_one_source_or_mixed() -> None:
    a = ok_result(0.0, [0.1], 0.1, tokens=1)
    b = ok_result(0.0, [0.1], 0.1, tokens=1)
    assert token_source([a, b]) == "usage"
    b.token_source = "chunks"
    assert token_source([a, b]) == "mixed"
    assert token_source([failed_result("timeout")]) is None


# -- SSE parsing of a recorded stream --------------------------------------------

# Recorded from `spigot serve` (max_tokens 3, include_usage), then a U+2028
# written raw inside JSON (as orjson does) and a CRLF line ending added.
RECORDED = (
    b'data: {"id":"chatcmpl-3fb3","object":"chat.completion.chunk","created":1795638561,'
    b'"model":"smollm2-135m-instruct","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":""},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-3fb3","object":"chat.completion.chunk","created":1795638561,'
    b'"model":"smollm2-135m-instruct","choices":[{"index":0,"delta":{"content":"Hello"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b": a comment line\n"
    b'data: {"id":"chatcmpl-3fb3","object":"chat.completion.chunk","created":1795638561,'
    b'"model":"smollm2-135m-instruct","choices":[{"index":0,"delta":{"content":"!\xe2\x80\xa8"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-3fb3","object":"chat.completion.chunk","created":1795638561,'
    b'"model":"smollm2-135m-instruct","choices":[{"index":0,"delta":{"content":" How"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-3fb3","object":"chat.completion.chunk","created":1795638561,'
    b'"model":"smollm2-135m-instruct","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"length"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-3fb3","object":"chat.completion.chunk","created":1795638561,'
    b'"model":"smollm2-135m-instruct","choices":[],"usage":{"prompt_tokens":31,'
    b'"completion_tokens":3,"total_tokens":34}}\n\n'
    b"data: [DONE]\n\n"
)


def parse_all(body: bytes, piece: int) -> tuple[list[str], SSEParser]:
    parser = SSEParser()
    payloads: list[str] = []
    for i in range(0, len(body), piece):
        payloads += parser.feed(body[i : i + piece])
    payloads += parser.close()
    return payloads, parser


@pytest.mark.parametrize("piece", [1, 7, 64, len(RECORDED)])
def test_recorded_stream_parses_the_same_however_it_is_cut(piece: int) -> None:
    payloads, parser = parse_all(RECORDED, piece)
    assert parser.done
    assert len(payloads) == 6
    events = [orjson.loads(p) for p in payloads]
    assert events[2]["choices"][0]["delta"]["content"] == "!\u2028"
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_recorder_counts_content_chunks_text_and_usage() -> None:
    payloads, _ = parse_all(RECORDED, 50)
    recorder = StreamRecorder()
    for i, payload in enumerate(payloads):
        recorder.on_payload(payload, float(i))
    # The role-only opening chunk and the finish chunk carry no content.
    assert recorder.chunk_times == [1.0, 2.0, 3.0]
    assert "".join(recorder.text) == "Hello!\u2028 How"
    assert recorder.completion_tokens == 3
    assert recorder.prompt_tokens == 31
    assert recorder.cached_tokens is None  # this server did not say


def test_recorder_reads_cached_prompt_tokens_from_usage_details() -> None:
    recorder = StreamRecorder()
    recorder.on_payload(
        '{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,'
        '"prompt_tokens_details":{"cached_tokens":32}}}',
        0.0,
    )
    assert (recorder.prompt_tokens, recorder.cached_tokens) == (40, 32)
    recorder.on_payload('{"choices":[],"usage":{"prompt_tokens_details":null}}', 1.0)
    assert recorder.cached_tokens is None


def test_parser_ignores_everything_after_done_and_flushes_an_unterminated_event() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}\n\ndata: {"b"') == ['{"a":1}']
    assert parser.close() == ['{"b"']
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]\n\ndata: {}\n\n") == []
    assert parser.done
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == []
    assert parser.done


def test_multi_line_data_fields_join_with_newlines() -> None:
    parser = SSEParser()
    assert parser.feed(b'event: x\ndata: {"a":\ndata:1}\nid: 3\n\n') == ['{"a":\n1}']


def test_recorder_reads_completions_chunks_and_raises_on_in_band_errors() -> None:
    recorder = StreamRecorder()
    recorder.on_payload('{"choices":[{"index":0,"text":"def"}]}', 1.0)
    recorder.on_payload('{"choices":[{"index":0,"text":""}]}', 2.0)
    assert recorder.text == ["def"]
    with pytest.raises(StreamFailure) as failure:
        recorder.on_payload('{"error":{"message":"engine failed","type":"server_error"}}', 3.0)
    assert failure.value.kind == "stream"
    assert str(failure.value) == "engine failed"
    with pytest.raises(StreamFailure) as failure:
        recorder.on_payload("[1, 2]", 4.0)
    assert failure.value.kind == "protocol"


# -- error classification ------------------------------------------------------

REQUEST = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectError("refused", request=REQUEST), "connection"),
        (httpx.RemoteProtocolError("peer closed", request=REQUEST), "connection"),
        (httpx.ReadError("reset", request=REQUEST), "connection"),
        (ConnectionResetError(), "connection"),
        (httpx.ReadTimeout("slow", request=REQUEST), "timeout"),
        (httpx.ConnectTimeout("slow", request=REQUEST), "timeout"),
        (TimeoutError(), "timeout"),
        (orjson.JSONDecodeError("bad", "{", 0), "protocol"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "protocol"),
        (StreamFailure("http", "not found", 404), "http"),
        (StreamFailure("stream", "engine failed"), "stream"),
        (RuntimeError("?"), "other"),
    ],
)
def test_classify_error(exc: BaseException, kind: str) -> None:
    assert classify_error(exc) == kind


def test_error_labels_carry_the_http_status() -> None:
    assert error_label("http", 404) == "http_404"
    assert error_label("timeout", None) == "timeout"


# -- one request over a mocked network -------------------------------------------


def stream_response(body: bytes, pieces: int = 3) -> httpx.Response:
    async def chunks() -> AsyncIterator[bytes]:
        step = max(1, len(body) // pieces)
        for i in range(0, len(body), step):
            yield body[i : i + step]

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())


async def send_with(handler: Callable[[httpx.Request], httpx.Response]) -> RequestResult:
    body = request_body("chat", "m", Prompt("q", "Hi"), 3)
    async with httpx.AsyncClient(
        base_url="http://test/v1", transport=httpx.MockTransport(handler)
    ) as client:
        return await send_request(client, "/chat/completions", body, "q", 5.0)


def test_request_body_asks_for_exact_greedy_streamed_tokens() -> None:
    body = request_body("chat", "m", Prompt("q", "Hi", "Be brief."), 7)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (7, 7, True)
    assert body["temperature"] == 0
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    plain = request_body("completions", "m", Prompt("q", "Hi", "Be brief."), 7, False)
    assert plain["prompt"] == "Be brief.\n\nHi\n"
    assert "ignore_eos" not in plain
    assert "min_tokens" not in plain


async def test_a_recorded_stream_is_a_success_with_usage() -> None:
    result = await send_with(lambda request: stream_response(RECORDED))
    assert result.ok, result.error
    assert result.usage_tokens == 3
    assert len(result.chunk_times) == 3
    assert result.text == "Hello!\u2028 How"


async def test_http_errors_carry_status_and_message() -> None:
    error = {"error": {"message": "The model `m` does not exist", "type": "x", "code": None}}
    result = await send_with(lambda request: httpx.Response(404, json=error))
    assert (result.error_kind, result.status, result.error_label) == ("http", 404, "http_404")
    assert result.error == "The model `m` does not exist"


async def test_a_stream_without_done_is_a_protocol_error() -> None:
    result = await send_with(
        lambda request: stream_response(RECORDED.removesuffix(b"data: [DONE]\n\n"))
    )
    assert result.error_kind == "protocol"


async def test_an_in_band_error_event_is_a_stream_error() -> None:
    body = RECORDED.split(b"\n\n")[1] + b'\n\ndata: {"error":{"message":"engine failed"}}\n\n'
    result = await send_with(lambda request: stream_response(body))
    assert (result.error_kind, result.error) == ("stream", "engine failed")


async def test_a_refused_connection_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    result = await send_with(refuse)
    assert result.error_kind == "connection"
    assert "ConnectError" in (result.error or "")


# -- run_bench over a mocked server ----------------------------------------------


def fake_server(
    *, usage: bool = True, tokenize: bool = True, fail_model: str | None = None
) -> tuple[httpx.MockTransport, dict[str, list[Any]]]:
    """A tiny OpenAI-shaped server: each request streams max_tokens one-word chunks."""
    seen: dict[str, list[Any]] = {"chat": [], "tokenize": []}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/tokenize" and tokenize:
            body = json.loads(request.content)
            seen["tokenize"].append(body)
            return httpx.Response(200, json={"count": len(body["prompt"].split())})
        if path == "/v1/chat/completions":
            body = json.loads(request.content)
            seen["chat"].append(body)
            if body["model"] == fail_model:
                return httpx.Response(404, json={"error": {"message": "no such model"}})
            n = body["max_tokens"]
            events = [{"choices": [{"index": 0, "delta": {"content": " w"}}]} for _ in range(n)]
            if usage:
                events.append(
                    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}}
                )
            raw = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
            return stream_response(raw + b"data: [DONE]\n\n", pieces=n)
        return httpx.Response(404, json={"error": {"message": "not found"}})

    return httpx.MockTransport(handle), seen


def config(**overrides: Any) -> BenchConfig:
    values: dict[str, Any] = {
        "targets": (Target("A", "http://fake/v1"),),
        "concurrency": (1, 2),
        "requests": 3,
        "max_tokens": 4,
        "warmup": 0,
    }
    return BenchConfig(**{**values, **overrides})


async def test_run_bench_counts_tokens_from_usage() -> None:
    transport, seen = fake_server()
    results = await run_bench(config(), transport=transport)
    (server,) = results["servers"]
    assert server["model"] == "fake-model"
    assert server["model_source"] == "listed"
    assert server["token_count_source"] == "usage"
    assert [lv["concurrency"] for lv in server["levels"]] == [1, 2]
    for level in server["levels"]:
        assert (level["requests"], level["ok"], level["output_tokens"]) == (3, 3, 12)
        assert level["errors"]["total"] == 0
    assert len(seen["chat"]) == 6
    assert all(body["min_tokens"] == 4 and body["ignore_eos"] for body in seen["chat"])
    assert seen["tokenize"] == []
    assert error_totals(results) == {"A": (0, 6)}
    assert "| 2 | 3 | 0 |" in markdown(results)


async def test_without_usage_tokens_are_counted_by_tokenize_then_by_chunks() -> None:
    transport, seen = fake_server(usage=False)
    results = await run_bench(config(concurrency=(1,)), transport=transport)
    level = results["servers"][0]["levels"][0]
    assert level["token_count_source"] == "tokenize"
    assert level["output_tokens"] == 12
    assert seen["tokenize"][0] == {
        "model": "fake-model",
        "prompt": " w w w w",
        "add_special_tokens": False,
    }

    transport, _ = fake_server(usage=False, tokenize=False)
    results = await run_bench(config(concurrency=(1,)), transport=transport)
    level = results["servers"][0]["levels"][0]
    assert level["token_count_source"] == "chunks"
    assert level["output_tokens"] == 12


async def test_failures_are_counted_per_level_not_raised() -> None:
    transport, _ = fake_server(fail_model="bad")
    cfg = config(targets=(Target("A", "http://fake/v1", model="bad"),), warmup=1)
    results = await run_bench(cfg, transport=transport)
    for level in results["servers"][0]["levels"]:
        assert level["ok"] == 0
        assert level["errors"]["by_kind"] == {"http_404": 3}
    assert error_totals(results) == {"A": (6, 6)}


async def test_compare_interleaves_levels_and_reports_ratios() -> None:
    order: list[str] = []
    transport, _ = fake_server()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            order.append(f"{request.url.host}:{json.loads(request.content)['max_tokens']}")
        return await transport.handle_async_request(request)

    cfg = config(
        targets=(Target("A", "http://a/v1"), Target("B", "http://b/v1")),
        requests=1,
        rounds=2,
    )
    results = await run_bench(cfg, transport=httpx.MockTransport(handle))
    # Round 1: c=1 A, c=1 B, c=2 A, c=2 B; round 2 flips the order.
    assert order == ["a:4", "b:4", "a:4", "b:4", "b:4", "a:4", "b:4", "a:4"]
    comparison = results["comparison"]
    assert [row["concurrency"] for row in comparison] == [1, 2]
    assert set(comparison[0]["output_tokens_per_s"]) == {"a", "b", "b_over_a"}
    assert comparison[0]["errors"] == {"a": 0, "b": 0}
    assert len(results["servers"][0]["levels"][0]["rounds"]) == 2
    assert "B against A" in markdown(results)


async def test_duration_mode_keeps_sending_until_the_deadline() -> None:
    transport, seen = fake_server()
    results = await run_bench(
        config(concurrency=(2,), requests=None, duration=0.05), transport=transport
    )
    level = results["servers"][0]["levels"][0]
    assert level["requests"] >= 2
    assert level["requests"] == len(seen["chat"])
    assert level["errors"]["total"] == 0


def test_config_rejects_both_a_count_and_a_duration() -> None:
    with pytest.raises(ValueError):
        config(requests=3, duration=1.0)
    assert config(requests=None).requests_for(4) == 16


def test_request_counts_apply_to_every_level_or_one_per_level() -> None:
    assert config(concurrency=(1, 8), requests=5).requests_for(8) == 5
    per_level = config(concurrency=(1, 8, 32), requests=(10, 16, 32))
    assert [per_level.requests_for(c) for c in (1, 8, 32)] == [10, 16, 32]
    with pytest.raises(ValueError):
        config(concurrency=(1, 8), requests=(10, 16, 32))


async def test_per_level_counts_send_exactly_that_many_requests() -> None:
    transport, seen = fake_server()
    results = await run_bench(
        config(concurrency=(1, 2), requests=(3, 5), warmup=0), transport=transport
    )
    assert [lv["requests"] for lv in results["servers"][0]["levels"]] == [3, 5]
    assert len(seen["chat"]) == 8


# -- prompts -----------------------------------------------------------------------


def test_the_shipped_prompt_set_loads() -> None:
    prompts = load_workload("mixed")
    assert len(prompts) >= 30
    assert len({p.id for p in prompts}) == len(prompts)
    lengths = sorted(estimate_tokens(p.user) for p in prompts)
    assert lengths[0] < 20 < 100 < lengths[-1]


def test_synthetic_workloads_are_long_or_share_one_prefix() -> None:
    long = load_workload("long")
    assert all(900 <= estimate_tokens(p.user) <= 2100 for p in long)
    assert load_workload("long") == long  # the same text every run
    shared = load_workload("shared-prefix")
    assert len({p.system for p in shared}) == 1
    # Numbers-heavy text: ~3 characters per token (the e2e test counts exactly).
    assert len(shared[0].system or "") > 3000
    assert len({p.user for p in shared}) > 20


def test_prompt_sets_parse_from_lists_or_objects() -> None:
    assert parse_prompt_set(["a", {"id": "x", "prompt": "b", "system": "s"}]) == [
        Prompt("0", "a"),
        Prompt("x", "b", "s"),
    ]
    with pytest.raises(ValueError):
        parse_prompt_set({"prompts": []})
    with pytest.raises(ValueError):
        load_workload("nope")


async def test_unique_prompts_tag_every_first_message_alike_for_every_server() -> None:
    def first_messages(seen: dict[str, list[Any]]) -> list[str]:
        return [body["messages"][0]["content"] for body in seen["chat"]]

    transport, seen = fake_server()
    await run_bench(config(requests=40, unique_prompts=True), transport=transport)
    tagged_texts = first_messages(seen)
    assert len(tagged_texts) == 80 and len(set(tagged_texts)) == 80  # more than the set holds
    assert all(text.startswith("[") for text in tagged_texts)

    transport, again = fake_server()
    await run_bench(config(requests=40, unique_prompts=True), transport=transport)
    assert first_messages(again) == tagged_texts  # a second server sees the same texts

    transport, plain = fake_server()
    await run_bench(config(requests=40), transport=transport)
    assert len(set(first_messages(plain))) < 80  # the set repeats without tags
