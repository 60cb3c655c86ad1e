"""What every check uses: servers, a raw HTTP client, a /health prober, the ledger, results.

The client is written on asyncio sockets rather than an HTTP library so that a check can
do what libraries refuse to: send malformed requests, read one byte at a time, half-close,
or vanish with a TCP reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx

from tests.e2e.server import ROOT, RunningServer, start_server

MODEL = "smollm2-135m-instruct"
Status = Literal["PASS", "FAIL", "WARN", "SKIP", "XFAIL", "XPASS"]

# Prices that make every token cost something, so that billing can be checked.
PRICES_TOML = """\
[prices."*"]
prompt = "1.00"
completion = "2.00"
"""


# -- results ----------------------------------------------------------------------------------


@dataclass
class Result:
    """One check's verdict. ``status`` WARN: the check ran and found something to report
    that is not (yet) a requirement."""

    check: str
    status: Status
    summary: str
    numbers: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.summary} ({self.seconds:.0f} s)"


class Findings:
    """Collects a check's failures and numbers as it goes."""

    def __init__(self, check: str) -> None:
        self.check = check
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.numbers: dict[str, Any] = {}

    def expect(self, ok: bool, failure: str) -> bool:
        if not ok:
            self.failures.append(failure)
            print(f"  ! {failure}", flush=True)
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  - {text}", flush=True)

    def result(self, summary: str, *, warn: bool = False) -> Result:
        status: Status = "FAIL" if self.failures else ("WARN" if warn else "PASS")
        return Result(self.check, status, summary, self.numbers, self.failures, self.notes)


@dataclass(frozen=True)
class Profile:
    """How much of each check to run: ``short`` for CI (about 5 minutes on 2 cores),
    ``full`` for a release."""

    name: str
    fuzz_examples: int  # schemathesis examples per operation
    fuzz_seconds: int  # the time budget of the main schemathesis run (a third for /admin)
    hostile_big: bool  # the corpus's slowest items (200 MB bodies, 1,100 idle sockets)
    overload_streams: int
    client_rounds: int
    shutdown_streams: int
    postgres: bool  # SIGTERM/SIGKILL also on PostgreSQL
    soak_seconds: int
    soak_streams: int = 16


SHORT = Profile(
    "short",
    fuzz_examples=10,
    fuzz_seconds=45,
    hostile_big=False,
    overload_streams=40,
    client_rounds=1,
    shutdown_streams=6,
    postgres=False,
    soak_seconds=60,
)
FULL = Profile(
    "full",
    fuzz_examples=150,
    fuzz_seconds=420,
    hostile_big=True,
    overload_streams=200,
    client_rounds=3,
    shutdown_streams=12,
    postgres=True,
    soak_seconds=600,
)


# -- servers ----------------------------------------------------------------------------------


@cache
def serve_options() -> frozenset[str]:
    """The options this ``spigot serve`` knows: checks use newer ones only where they exist."""
    out = subprocess.run(
        [sys.executable, "-m", "spigot", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def optional_flags(**flags: Any) -> list[str]:
    """``--name value`` for each option this server knows (``max_connections`` ->
    ``--max-connections``); the others are left out."""
    known = serve_options()
    args: list[str] = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in known:
            args += [flag, str(value)]
    return args


class Workdir:
    """A temporary folder for one run's databases, price table and reports."""

    def __init__(self, base: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="spigot-reliability-", dir=base))
        self.prices = self.path / "prices.toml"
        self.prices.write_text(PRICES_TOML)
        self._n = 0

    def db(self, name: str) -> str:
        self._n += 1
        return str(self.path / f"{self._n:02d}-{name}.db")


class Server:
    """A running ``spigot serve`` process and what can be seen of it from outside."""

    live: ClassVar[set[Server]] = set()  # every one started and not yet stopped

    def __init__(self, running: RunningServer, db: str | None) -> None:
        self.running = running
        self.db = db
        Server.live.add(self)

    @classmethod
    def start(cls, *args: str, db: str | None, threads: int = 1) -> Server:
        base = ["--threads", str(threads)]
        if db is None:
            base.append("--no-metering")
        else:
            base += ["--db", db]
        return cls(start_server(*base, *args), db)

    @property
    def pid(self) -> int:
        return self.running.process.pid

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def url(self) -> str:
        return self.running.root_url

    def alive(self) -> bool:
        return self.running.process.poll() is None

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", timeout=timeout).json())

    def healthy(self, within: float = 10.0) -> bool:
        """/health answers 200 within ``within`` seconds (and the process lives)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.alive():
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def engine(self) -> dict[str, Any]:
        (stats,) = self.health()["models"].values()
        return dict(stats)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Waits until no sequence runs, waits or is in flight; the last stats seen."""
        deadline = time.monotonic() + timeout
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                stats = self.engine()
                if idle(stats):
                    return stats
            time.sleep(0.1)
        return stats

    def rss_mb(self) -> float:
        return proc_status(self.pid, "VmRSS") / 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.running.log()

    def tracebacks(self) -> list[str]:
        """The server log's ERROR lines and the exceptions its tracebacks end with (each
        once, with a count): each one is a bug or a crash."""
        found: dict[str, int] = {}
        for line in self.log().splitlines():
            if " ERROR " in line or " CRITICAL " in line:
                # The message without its timestamp and request id, so repeats group.
                text = re.sub(r"req_[0-9a-f]+", "req_…", line.partition(" ERROR ")[2] or line)
            elif re.match(r"^[A-Za-z_.]+(Error|Exception|Exit|Interrupt)\b", line):
                text = line
            else:
                continue
            found[text[:240]] = found.get(text[:240], 0) + 1
        return [f"{n} x {text}" if n > 1 else text for text, n in found.items()]

    def signal(self, sig: signal.Signals) -> None:
        self.running.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.running.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        Server.live.discard(self)
        if self.alive():
            self.signal(signal.SIGKILL)
            self.running.process.wait()

    @classmethod
    def stop_all(cls) -> None:
        """Kills what a crashed or interrupted check left running."""
        for srv in list(cls.live):
            srv.stop()


def idle(stats: dict[str, Any]) -> bool:
    return stats.get("running") == 0 and stats.get("waiting") == 0 and stats.get("in_flight") == 0


def proc_status(pid: int, field_name: str) -> int:
    """A number from /proc/<pid>/status (kB for the memory fields)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


@contextlib.contextmanager
def server(*args: str, db: str | None, threads: int = 1) -> Iterator[Server]:
    srv = Server.start(*args, db=db, threads=threads)
    try:
        yield srv
    finally:
        srv.stop()


def create_key(db: str, name: str, *options: str) -> str:
    """A new key's secret, made with ``spigot keys create`` as an operator would."""
    out = subprocess.run(
        [sys.executable, "-m", "spigot", "keys", "create", "--name", name, "--db", db, *options],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"spigot keys create failed: {out.stderr}")
    return out.stdout.strip()


def revoke_key(db: str, name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "spigot", "keys", "revoke", name, "--db", db],
        capture_output=True,
        cwd=ROOT,
        check=True,
    )


# -- the ledger, read directly ------------------------------------------------------------------


class Ledger:
    """The metering database behind a server, read outside the server (SQLite or PostgreSQL)."""

    def __init__(self, db: str) -> None:
        self.db = db

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self.db.startswith(("postgresql://", "postgres://")):
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.db, autocommit=True, row_factory=dict_row) as conn:
                return list(conn.execute(sql.replace("?", "%s"), params).fetchall())
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """One write, outside the server (a check ageing rows, as time passing would)."""
        if self.db.startswith(("postgresql://", "postgres://")):
            import psycopg

            with psycopg.connect(self.db, autocommit=True) as conn:
                conn.execute(sql.replace("?", "%s"), params)
            return
        conn = sqlite3.connect(self.db, timeout=10, isolation_level=None)
        try:
            conn.execute(sql, params)
        finally:
            conn.close()

    def rows(self, request_ids: list[str] | None = None) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM ledger ORDER BY id")
        if request_ids is None:
            return rows
        wanted = set(request_ids)
        return [row for row in rows if row["request_id"] in wanted]

    def reservations(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM reservations")

    def key(self, name: str) -> dict[str, Any]:
        (row,) = self.query("SELECT * FROM api_keys WHERE name = ?", (name,))
        return row

    def wait_rows(self, request_ids: list[str], timeout: float = 15.0) -> list[dict[str, Any]]:
        """The rows of these requests, once all are written (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(request_ids)
            if len({r["request_id"] for r in rows}) >= len(set(request_ids)):
                return rows
            if time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


# -- /health, probed while something else happens -------------------------------------------


class HealthProbe:
    """Asks /health every ``interval`` seconds from a thread of its own, over its own
    connection, and keeps each answer's latency: a stalled event loop shows as a long one."""

    def __init__(self, url: str, interval: float = 0.1, timeout: float = 5.0) -> None:
        self.url = f"{url}/health"
        self.interval = interval
        self.timeout = timeout
        self.samples: list[tuple[float, float, int]] = []  # (at, seconds, status; 0: failed)
        self.inflight_since: float | None = None  # when the probe now waiting was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health-probe")

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                self.inflight_since = started
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                took = time.monotonic() - started
                self.samples.append((started, took, status))
                self.inflight_since = None
                self._stop.wait(max(0.0, self.interval - took))

    def worst_between(self, start: float, end: float) -> float:
        """The longest wait of a probe that overlapped ``[start, end]``; a probe still
        waiting that was sent before ``end`` is waited for first (it may be the stalled one)."""
        sent = self.inflight_since
        if sent is not None and sent <= end:
            deadline = time.monotonic() + self.timeout + 1
            while self.inflight_since == sent and time.monotonic() < deadline:
                time.sleep(0.01)
        return max(
            (took for at, took, _ in list(self.samples) if at <= end and at + took >= start),
            default=0.0,
        )

    def worst(self) -> float:
        """The longest wait for an answer (a failed or timed-out probe counts as its wait)."""
        return max((took for _, took, _ in self.samples), default=0.0)

    def failed(self) -> int:
        return sum(1 for _, _, status in self.samples if status != 200)

    def median(self) -> float:
        return statistics.median(took for _, took, _ in self.samples) if self.samples else 0.0


# -- a raw HTTP/1.1 client --------------------------------------------------------------------


@dataclass
class Reply:
    status: int  # 0: the server closed the connection without an answer; -1: timed out
    headers: dict[str, str]
    body: bytes
    seconds: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any] | None:
        """The OpenAI error object, or None if the body is not one."""
        try:
            body = self.json()
        except ValueError:
            return None
        if not isinstance(body, dict) or set(body) != {"error"}:
            return None
        error = body["error"]
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            return None
        if not isinstance(error["message"], str) or not isinstance(error["type"], str):
            return None
        return error


@dataclass
class Event:
    data: str
    id: str | None = None

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def is_error(self) -> bool:
        return not self.done and self.data.startswith("{") and '"error"' in self.data[:20]


class ConnectionClosed(Exception):
    pass


class Conn:
    """One HTTP/1.1 connection: write a request as bytes, read the answer as it comes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunked = False
        self._length: int | None = None

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window the server sees is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        port: int,
    ) -> None:
        await self.send(request_bytes(method, path, body, headers, port=port))

    async def read_head(self) -> None:
        """The status line and headers of the final answer (1xx interim ones skipped, as
        every client must)."""
        self.status = 100
        while 100 <= self.status < 200:
            line = await self.reader.readline()
            if not line:
                raise ConnectionClosed
            parts = line.decode("latin-1").split(" ", 2)
            self.status = int(parts[1])
            self.headers = {}
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionClosed
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._length = int(length) if length is not None and length.isdigit() else None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked, sized or until close)."""
        if self._chunked:
            while True:
                size_line = await self.reader.readline()
                if not size_line:
                    raise ConnectionClosed
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self.reader.readline()
                    return
                data = await self.reader.readexactly(size)
                await self.reader.readexactly(2)
                yield data
        elif self._length is not None:
            left = self._length
            while left > 0:
                data = await self.reader.read(min(left, 65536))
                if not data:
                    raise ConnectionClosed
                left -= len(data)
                yield data
        else:
            while data := await self.reader.read(65536):
                yield data

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def events(self) -> AsyncIterator[Event]:
        """Server-sent events, parsed as a client's decoder would."""
        buffer = b""
        async for chunk in self.chunks():
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                event = parse_event(raw.decode("utf-8", errors="replace"))
                if event is not None:
                    yield event

    def reset(self) -> None:
        """Vanish: close with a TCP reset (SO_LINGER 0), as a crashed client or a
        dropped NAT entry looks to the server."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
        self.writer.transport.abort()

    def half_close(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def parse_event(raw: str) -> Event | None:
    data: list[str] = []
    event_id = None
    for line in raw.split("\n"):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("id:"):
            event_id = line[3:].strip()
    if not data:
        return None
    return Event("\n".join(data), event_id)


def request_bytes(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    port: int,
) -> bytes:
    """The request as bytes. ``headers`` may override Host and Content-Length (or drop
    them with a None value, given as the string "\\0")."""
    base = {"host": f"127.0.0.1:{port}", "content-type": "application/json"}
    if body or method in ("POST", "PUT", "PATCH"):
        base["content-length"] = str(len(body))
    for name, value in (headers or {}).items():
        base[name.lower()] = value
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in base.items() if value != "\0"]
    head = "\r\n".join(lines).encode("latin-1", errors="surrogateescape") + b"\r\n\r\n"
    return head + body


async def call(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] = b"",
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> Reply:
    """One request on a new connection, the whole answer read (0 if the server hung up)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await exchange(port, request_bytes(method, path, raw, headers, port=port), timeout)


async def exchange(
    port: int,
    data: bytes | list[bytes],
    timeout: float = 30.0,  # noqa: ASYNC109 (the whole exchange's bound: asyncio.timeout)
) -> Reply:
    """Arbitrary bytes on a new connection, and the server's answer (status 0: none).

    Sending and reading overlap: a server that answers 413 before reading a huge body
    is heard at once, and a server that stops reading cannot block the client.
    """
    started = time.monotonic()
    conn = await Conn.open(port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            for part in [data] if isinstance(data, bytes) else data:
                await conn.send(part)

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(timeout):
            await conn.read_head()
            body = await conn.body()
        return Reply(conn.status, conn.headers, body, time.monotonic() - started)
    except (ConnectionClosed, ConnectionError, asyncio.IncompleteReadError):
        return Reply(conn.status, conn.headers, b"", time.monotonic() - started)
    except TimeoutError:
        return Reply(-1, conn.headers, b"", time.monotonic() - started)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        conn.writer.transport.abort()


def chat_body(content: str = "Count from one to ten.", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


@dataclass
class StreamOutcome:
    """How one streamed request went, from the client's side."""

    status: int = 0
    request_id: str | None = None
    retry_after: str | None = None
    events: int = 0
    content_events: int = 0
    done: bool = False
    error: dict[str, Any] | None = None  # the in-band error event, or the 4xx/5xx body's
    ids: list[str] = field(default_factory=list)
    text: str = ""
    ended: str = "open"  # done | error | closed | reset | timeout | refused
    seconds: float = 0.0


async def stream_chat(
    port: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 120.0,  # noqa: ASYNC109
    stop_after_events: int | None = None,
    vanish: Literal["reset", "close"] = "reset",
    read_delay: float = 0.0,
    rcvbuf: int | None = None,
    path: str = "/v1/chat/completions",
    method: str = "POST",
) -> StreamOutcome:
    """A streamed request read event by event; with ``stop_after_events`` the client
    vanishes after that many events (``reset``: TCP RST; ``close``: FIN)."""
    out = StreamOutcome()
    started = time.monotonic()
    conn = await Conn.open(port, rcvbuf=rcvbuf)
    raw = json.dumps(body).encode() if method == "POST" else b""
    try:
        async with asyncio.timeout(timeout):
            await conn.request(method, path, raw, headers, port=port)
            await conn.read_head()
            out.status = conn.status
            out.request_id = conn.headers.get("x-request-id")
            out.retry_after = conn.headers.get("retry-after")
            if conn.status != 200:
                reply = Reply(conn.status, conn.headers, await conn.body())
                out.error = reply.error() or {"raw": reply.body[:200].decode(errors="replace")}
                out.ended = "refused"
                return out
            async for event in conn.events():
                out.events += 1
                if event.id is not None:
                    out.ids.append(event.id)
                if event.done:
                    out.done = True
                    out.ended = "done"
                    break
                payload = event.json()
                if "error" in payload:
                    out.error = payload["error"]
                    out.ended = "error"
                    continue
                for choice in payload.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if piece:
                        out.text += piece
                        out.content_events += 1
                if stop_after_events is not None and out.events >= stop_after_events:
                    if vanish == "reset":
                        conn.reset()
                        out.ended = "reset"
                    else:
                        await conn.close()
                        out.ended = "closed"
                    return out
                if read_delay:
                    await asyncio.sleep(read_delay)
            if out.ended == "open":
                out.ended = "closed" if out.error is None else "error"
    except TimeoutError:
        out.ended = "timeout"
    except (ConnectionClosed, ConnectionError, asyncio.IncompleteReadError):
        if out.ended == "open":
            out.ended = "closed"
    finally:
        out.seconds = time.monotonic() - started
        conn.writer.transport.abort()
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def raise_open_files() -> None:
    """Many idle sockets need more descriptors than the usual soft limit of 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def kill_quietly(sig: int, pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
