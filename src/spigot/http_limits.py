"""Limits on HTTP connections, enforced below the application in uvicorn's protocol.

uvicorn as shipped keeps a connection for as long as the client likes while it
sends a request: a client that connects and sends nothing, trickles a header
a byte a second (slowloris) or trickles a body holds a file descriptor
forever, and 1,100 of them lock every client out at a 1,024 descriptor
limit. Its parser (httptools) also buffers headers of any size. And a client
that sends a whole request then half-closes its socket (``shutdown(SHUT_WR)``)
is treated as gone, so it never gets its response.

``LimitedHttpProtocol`` is uvicorn's httptools protocol with:

- a cap on open connections: beyond it a new connection is answered 503 at
  once and closed, without reading it, so the connections already open keep
  their descriptors and their streams;
- an idle timeout: a connection that sends no byte within it, after
  connecting or after its last response, is closed (uvicorn's keep-alive
  timeout, armed on connect as well);
- a header timeout: the whole request head must arrive within it, counted
  from the same moments, however the bytes trickle in (408, then closed);
- a body timeout: the whole body must arrive within it of the head (408);
- a header size cap (431).

The timeouts apply to reading a request, never to a response being written:
a stream may run for minutes. The process's open-file limit is raised to its
hard limit at startup, and the connection cap is kept below it.

Half-close: once a whole request is read, an end of file from the client
keeps the connection open for writing; the response is sent and the
connection closed after it. A client that closed its socket completely looks
the same at that moment, and its request should be aborted, not answered:
the two differ only once the server writes, when a closed socket answers with
a reset. So if no response has started within ``PEER_CHECK_S``, an interim
``100 Continue`` (which every HTTP/1.1 client must accept and skip) is sent,
and the socket is checked for that reset until the response ends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

log = logging.getLogger(__name__)

# Descriptors kept for everything but client connections: the listening
# socket, model files, the database, logs, a connection being refused.
FD_HEADROOM = 64
# How often a half-closed connection is checked for a client that left.
PEER_CHECK_S = 0.5
# At most one "refused a connection" warning per this many seconds: a flood
# must not become a flood of log lines.
REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    # Open client connections; beyond it new ones get 503 and are closed.
    max_connections: int = 1000
    # Seconds for a whole request head, from connect or from the previous response.
    header_timeout: float = 10.0
    # Seconds a connection may stay silent, from connect or from the previous response.
    idle_timeout: float = 5.0
    # Seconds for a whole request body, from the end of its head.
    body_timeout: float = 30.0
    # Bytes of request line and headers together.
    max_header_bytes: int = 32 * 1024


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard one; return the soft limit now in force.

    None where the platform has no such limit.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one everywhere (macOS caps it).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    log.info("open-file limit raised from %d to %d", soft, target)
    return target


def fit_to_open_files(limits: ConnectionLimits) -> ConnectionLimits:
    """Raise the open-file limit, and keep the connection cap below it."""
    open_files = raise_open_file_limit()
    if open_files is not None and limits.max_connections > open_files - FD_HEADROOM:
        fitted = max(1, open_files - FD_HEADROOM)
        log.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d",
            limits.max_connections,
            fitted,
            open_files,
        )
        limits = replace(limits, max_connections=fitted)
    log.info(
        "connections: at most %d (open-file limit %s); request head within %gs, body within "
        "%gs, idle %gs; headers up to %d bytes",
        limits.max_connections,
        open_files if open_files is not None else "none",
        limits.header_timeout,
        limits.body_timeout,
        limits.idle_timeout,
        limits.max_header_bytes,
    )
    return limits


def http_protocol(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, enforcing ``limits``."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def error_response(
    status: int, message: str, code: str, error_type: str, headers: dict[str, str] | None = None
) -> bytes:
    """A whole HTTP/1.1 response with an OpenAI error body, closing the connection."""
    body = orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )
    lines = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    lines += [f"{name}: {value}\r\n".encode() for name, value in (headers or {}).items()]
    return b"".join([*lines, b"\r\n", body])


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools re-raises it as a parser error,
    which uvicorn answers through ``send_400_response``."""


class LimitedHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _last_refusal_log: ClassVar[float] = float("-inf")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # uvicorn annotates an int; its timer takes seconds as a float just as well.
        self.timeout_keep_alive = self.limits.idle_timeout  # type: ignore[assignment]
        self._refused = False
        # Bytes of the request head read so far; None while no head is being read.
        self._head_bytes: int | None = 0
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._peer_timer: asyncio.TimerHandle | None = None
        self._half_closed = False
        self._probed = False

    # -- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        # uvicorn arms its keep-alive timeout only after a response: a client
        # that connects and never sends a byte would be kept forever.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._arm_head_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        # Answered without reading: the request is not needed to refuse it, and
        # holding the descriptor while it arrives is what the cap prevents.
        self._refused = True
        self.transport = transport
        transport.write(
            error_response(
                503,
                "The server has too many open connections; retry shortly.",
                "too_many_connections",
                "server_error",
                {"retry-after": "1"},
            )
        )
        transport.close()
        now = time.monotonic()
        cls = type(self)
        if now - cls._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:
            cls._last_refusal_log = now
            log.warning(
                "refusing connections: %d open, the most allowed (--max-connections)",
                len(self.connections),
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        for timer in (self._head_timer, self._body_timer, self._peer_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still incomplete past the cap: the parser would buffer it all.
        if (
            self._head_bytes is not None
            and self._head_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._head_too_large = True
            self.send_400_response("")

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        self.transport.write(
            error_response(
                431,
                f"Request headers are larger than {self.limits.max_header_bytes} bytes.",
                "request_headers_too_large",
                "invalid_request_error",
            )
        )
        self.transport.close()

    # -- request head and body ------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        # A head that arrived whole in one read: measured from what was parsed.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._head_too_large = True
            # Stops the parser; uvicorn answers through send_400_response.
            raise _HeadTooLarge
        self._head_bytes = None
        super().on_headers_complete()
        # A pipelined request's body is read once the responses before it end.
        if not (self.pipeline and self.pipeline[0][0] is self.cycle):
            self._arm_body_timer(self.cycle)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        queued = self.pipeline[-1][0] if self.pipeline else None
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if queued is not None:
            self._arm_body_timer(queued)
        else:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self.transport.write(
                error_response(
                    408,
                    f"The request head did not arrive within {self.limits.header_timeout:g} s.",
                    "request_timeout",
                    "invalid_request_error",
                )
            )
        self.transport.close()

    def _arm_body_timer(self, cycle: RequestResponseCycle) -> None:
        if not cycle.more_body:
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(
            self.limits.body_timeout, self._body_timed_out, cycle
        )

    def _body_timed_out(self, cycle: RequestResponseCycle) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not cycle.more_body:
            return
        if not cycle.response_started:
            self.transport.write(
                error_response(
                    408,
                    f"The request body did not arrive within {self.limits.body_timeout:g} s.",
                    "request_timeout",
                    "invalid_request_error",
                )
            )
        # The application, waiting on the body, sees the client leave.
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()

    # -- half-close -----------------------------------------------------------------

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._half_closed:  # told again, after reading resumed
            return True
        cycle = self.cycle
        if self._refused or cycle is None or cycle.more_body or cycle.response_complete:
            # No whole request waits for an answer: close, as uvicorn does.
            return None
        # The last request read gets its answer, then the connection closes.
        cycle.keep_alive = False
        self._half_closed = True
        self._peer_timer = self.loop.call_later(PEER_CHECK_S, self._check_peer)
        return True

    def _check_peer(self) -> None:
        """On a half-closed connection: abort the request if the client is gone."""
        self._peer_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle.response_complete:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            failed = sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            failed = True
        if failed:
            # Our last write was answered with a reset: the client closed, not half-closed.
            self.transport.abort()
            return
        if (
            not self._probed
            and not self.pipeline
            and not cycle.response_started
            and cycle.scope["http_version"] == "1.1"
        ):
            self._probed = True
            cycle.waiting_for_100_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._peer_timer = self.loop.call_later(PEER_CHECK_S, self._check_peer)
