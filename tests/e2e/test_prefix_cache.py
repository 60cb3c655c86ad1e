"""Prefix reuse on the real model: a shared prompt prefix is computed once, reported as cached."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from spigot.bench.load import BenchConfig, Target, run_bench
from spigot.metering import open_store
from tests.e2e.server import RunningServer, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """A server with the default settings: prefix cache on."""
    srv = start_server("--parallel", "4")
    try:
        yield srv
    finally:
        srv.stop()


def ask(server: RunningServer, system: str, question: str, stream: bool = False) -> dict:
    payload = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
    }
    if not stream:
        r = httpx.post(f"{server.base_url}/chat/completions", json=payload, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    payload |= {"stream": True, "stream_options": {"include_usage": True}}
    usage = None
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=payload, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                usage = orjson.loads(line[6:])["usage"]
    assert usage is not None
    return usage


def test_shared_system_prompt_is_reported_as_cached(server: RunningServer) -> None:
    system = f"Session {uuid.uuid4()}. " + "You answer questions about lighthouses. " * 60
    cold = ask(server, system, "What is a lighthouse?")
    assert cold["prompt_tokens_details"]["cached_tokens"] == 0
    warm = ask(server, system, "Who keeps a lighthouse?", stream=True)
    cached = warm["prompt_tokens_details"]["cached_tokens"]
    # Everything up to where the two conversations part is reused.
    assert cached >= cold["prompt_tokens"] - 12
    assert cached < warm["prompt_tokens"]


def test_next_chat_turn_reuses_the_previous_turn(server: RunningServer) -> None:
    messages = [
        {"role": "system", "content": f"Conversation {uuid.uuid4()}."},
        {"role": "user", "content": "Name a colour."},
    ]
    first = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0},
        timeout=120,
    ).json()
    reply = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another."}]
    second = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0},
        timeout=120,
    ).json()
    assert (
        second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    )


def test_streams_with_the_cache_on_and_repeats_are_stable_once_warm(server: RunningServer) -> None:
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Story {uuid.uuid4()}: a lighthouse."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    url = f"{server.base_url}/chat/completions"
    httpx.post(url, json=payload, timeout=120)  # warms the cache
    texts = []
    for _ in range(2):
        texts.append(
            httpx.post(url, json=payload, timeout=120).json()["choices"][0]["message"]["content"]
        )
        streamed = ""
        with httpx.stream("POST", url, json={**payload, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = orjson.loads(line[6:])
                    if event["choices"]:
                        streamed += event["choices"][0]["delta"].get("content") or ""
        texts.append(streamed)
    assert texts[0]
    assert len(set(texts)) == 1


def test_streams_that_ran_together_leave_only_the_newest_cache(server: RunningServer) -> None:
    # Every cached token slows every later decode step, so beyond
    # --prefix-cache-tokens (0 here) only the last finished sequence's KV stays:
    # the pool must not hold the other streams' prompts once they are done.
    from concurrent.futures import ThreadPoolExecutor

    server.wait_idle()
    systems = [
        f"Run {uuid.uuid4()}, stream {i}. " + "Tell me about the sea. " * 30 for i in range(3)
    ]
    with ThreadPoolExecutor(3) as pool:
        usages = list(pool.map(lambda s: ask(server, s, "Why?", stream=True), systems))
    stats = server.wait_idle()
    longest = max(u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    # Three streams' worth would be about three times this.
    assert 0 < stats["kv_used"] <= longest, (stats, usages)


def test_a_prefix_evicted_from_the_pool_comes_back_from_host_memory() -> None:
    # The pool keeps only the newest cache; the one it replaces is saved to
    # host memory (--prefix-cache-ram) and copied back for a prompt that
    # starts the same way, giving the very KV the pool would have held.
    # A server of its own: streams that ran together before would leave holes
    # in the pool, and a prompt computed into them keeps its KV in another
    # cell order than its copy gets (see assert_same_distributions).
    server = start_server("--parallel", "4")
    try:
        check_restored_prefix(server)
    finally:
        server.stop()


def check_restored_prefix(server: RunningServer) -> None:
    system = f"Archive {uuid.uuid4()}. " + "You answer questions about old maps. " * 40
    payload = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Why?"}],
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    url = f"{server.base_url}/chat/completions"

    def answer() -> tuple[list[dict], dict]:
        r = httpx.post(url, json=payload, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["logprobs"]["content"], body["usage"]

    _, cold = answer()
    assert cold["prompt_tokens_details"]["cached_tokens"] < 10  # the chat template's opening
    from_pool, warm = answer()  # the pool's own cache
    assert warm["prompt_tokens_details"]["cached_tokens"] == cold["prompt_tokens"] - 1
    ask(server, f"Other {uuid.uuid4()}. " + "Talk about rivers. " * 40, "How?")
    assert server.wait_idle()["saved_prefix_tokens"] >= cold["prompt_tokens"]
    from_host, restored = answer()
    assert restored["prompt_tokens_details"]["cached_tokens"] == cold["prompt_tokens"] - 1
    assert_same_distributions(from_pool, from_host)


def assert_same_distributions(a: list[dict], b: list[dict], tolerance: float = 0.05) -> None:
    """Two greedy runs saw the same KV, up to rounding.

    llama.cpp's CPU flash attention walks a sequence's cells in pool order and
    accumulates in f16, so the same KV in another cell order gives logprobs
    that differ by more than rounding (a tenth or so was seen when the
    original was computed into a fragmented pool): enough to flip a near-tie
    and part two greedy texts.
    On a fresh pool the copy keeps the original's order and the two agree
    exactly; ``tolerance`` leaves room for rounding only. Tokens agree up to a
    parting, which may only fall on a near-tie.
    """
    assert a and b
    for entry_a, entry_b in zip(a, b, strict=False):
        top_a = {t["token"]: t["logprob"] for t in entry_a["top_logprobs"]}
        top_b = {t["token"]: t["logprob"] for t in entry_b["top_logprobs"]}
        shared = top_a.keys() & top_b.keys()
        assert entry_a["token"] in shared and entry_b["token"] in shared, (entry_a, entry_b)
        for token in shared & {entry_a["token"], entry_b["token"]}:
            assert abs(top_a[token] - top_b[token]) < tolerance, (token, entry_a, entry_b)
        if entry_a["token"] != entry_b["token"]:
            # A near-tie: each run's pick is within rounding of the other's.
            assert abs(top_a[entry_a["token"]] - top_a[entry_b["token"]]) < tolerance
            return


def test_without_host_memory_an_evicted_prefix_is_computed_again() -> None:
    # --prefix-cache-ram 0: the pool's cache is all there is; once another
    # prompt takes it, the first prompt is computed in full again.
    srv = start_server("--parallel", "2", "--prefix-cache-ram", "0")
    try:
        system = f"Ledger {uuid.uuid4()}. " + "You answer questions about old ships. " * 30
        cold = ask(srv, system, "Why?")
        ask(srv, f"Other {uuid.uuid4()}. " + "Talk about forests. " * 30, "How?")
        assert srv.wait_idle()["saved_prefix_tokens"] == 0
        again = ask(srv, system, "Why?")
        assert again["prompt_tokens"] == cold["prompt_tokens"]
        assert again["prompt_tokens_details"]["cached_tokens"] < 10  # the template's opening
    finally:
        srv.stop()


async def test_cached_prompt_tokens_come_from_the_servers_usage(server: RunningServer) -> None:
    # spigot bench against this server: one worker, two requests sharing a
    # ~1,000-token system prompt. The second is answered from the prefix
    # cache, and the bench reads how much of it from the usage chunk.
    config = BenchConfig(
        targets=(Target("spigot", server.base_url),),
        concurrency=(1,),
        requests=2,
        max_tokens=2,
        workload="shared-prefix",
        warmup=0,
        raw=True,
    )
    results = await run_bench(config)
    (level,) = results["servers"][0]["levels"]
    assert level["errors"]["total"] == 0, level["errors"]
    cached = [s["cached_tokens"] for s in level["samples"]]
    assert all(isinstance(c, int) for c in cached), cached
    assert cached[1] > 900, cached
    # One worker: the second request is sent after the first one ended.
    first, second = level["samples"]
    assert first["sent_ms"] == 0
    assert second["sent_ms"] >= first["e2e_ms"] - 0.01, (first, second)
    assert level["cached_tokens_mean"] == pytest.approx(sum(cached) / 2, abs=0.1)


# -- cache scopes: one key's prompts never show in another key's cached_tokens --------


def keyed_server(tmp_path: Path, *args: str) -> tuple[RunningServer, str, str]:
    """A server with two API keys in its ledger: (server, key A's secret, key B's)."""
    db = str(tmp_path / "keys.db")
    with open_store(db) as store:
        secrets = [store.create_key(name)[1] for name in ("tenant-a", "tenant-b")]
    return start_server("--parallel", "2", "--db", db, *args), secrets[0], secrets[1]


def ask_as(server: RunningServer, secret: str, system: str) -> dict:
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json={
            "model": MODEL,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "What is my secret?"},
            ],
            "max_tokens": 4,
            "temperature": 0,
        },
        headers={"Authorization": f"Bearer {secret}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_a_key_never_reuses_another_keys_prefix(tmp_path: Path) -> None:
    # The cross-tenant side channel: were the cache shared, key B sending key
    # A's prompt would see it counted as cached (and answered sooner), and
    # could recover A's system prompt token by token.
    server, key_a, key_b = keyed_server(tmp_path)
    try:
        system = f"Tenant A {uuid.uuid4()}. The secret word is lighthouse. " * 20
        cold = ask_as(server, key_a, system)
        assert cold["prompt_tokens"] > 200
        probe = ask_as(server, key_b, system)
        assert probe["prompt_tokens"] == cold["prompt_tokens"]
        assert probe["prompt_tokens_details"]["cached_tokens"] == 0
        # A's own prefix is still there for A: B's request took over A's slot,
        # so A's copy comes back from host memory, saved under A's scope.
        warm = ask_as(server, key_a, system)
        assert warm["prompt_tokens_details"]["cached_tokens"] == cold["prompt_tokens"] - 1
        # And B now reuses what B computed.
        again = ask_as(server, key_b, system)
        assert again["prompt_tokens_details"]["cached_tokens"] == cold["prompt_tokens"] - 1
    finally:
        server.stop()


def test_a_shared_prefix_cache_reuses_across_keys(tmp_path: Path) -> None:
    # --prefix-cache-scope shared: today's most-reuse behaviour, for a
    # single-tenant deployment whose keys trust each other.
    server, key_a, key_b = keyed_server(tmp_path, "--prefix-cache-scope", "shared")
    try:
        system = f"Team {uuid.uuid4()}. You answer questions about tides. " * 20
        cold = ask_as(server, key_a, system)
        other = ask_as(server, key_b, system)
        assert other["prompt_tokens_details"]["cached_tokens"] == cold["prompt_tokens"] - 1
    finally:
        server.stop()
