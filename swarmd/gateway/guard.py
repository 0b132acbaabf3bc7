"""Connection guard for the gateway's HTTP listener: slow clients and connection floods.

aiohttp parses a request only once its headers are complete and has no bound
on how long that may take, nor on how many sockets may be open, so a client
that drips its headers a byte at a time (slowloris) holds a connection, and
enough of them hold the port. This guard sits between the transport and
aiohttp's protocol (a thin forwarding asyncio.Protocol) and:

- closes a connection whose request line and headers have not fully arrived
  within `header_timeout`: for the first request from the moment the
  connection opens, for each later request on a keep-alive connection from its
  first byte past the previous request, whether that byte arrives while the
  connection is idle, while the previous request is still being answered, or
  pipelined in the same read as the previous request's headers. Only a
  connection with no byte of a next request is idle, and that is bounded by
  aiohttp's keepalive timer (`keepalive_timeout`) apart from this one.
  "Headers complete" is what aiohttp's own parser reports (its request count),
  not a byte pattern: a client cannot stop the timer with a stray blank line;
- refuses connections above `max_connections` open at once, and above
  `max_connections_per_address` from one client address (closed on accept,
  counted, logged once per interval).

Bodies are bounded in the handlers (`body_timeout` around each read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp.streams import EMPTY_PAYLOAD
from loguru import logger

LOG_INTERVAL = 10.0  # seconds between log lines about refused or timed-out connections


class ConnectionGuard:
    """Protocol factory wrapper; one per listening gateway."""

    def __init__(
        self,
        inner: Callable[[], asyncio.Protocol],
        header_timeout: float,
        max_connections: int,
        max_per_address: int | None = None,
    ) -> None:
        self.inner = inner
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address or max_connections
        self.open = 0
        self.by_address: dict[str, int] = {}  # open connections per client address
        self.refused = 0  # connections closed on accept: over max_connections
        self.timed_out = 0  # connections closed: headers not complete within header_timeout
        self._last_log = 0.0
        self.log = logger.bind(role="gateway", component="http_guard")
        # what each accepted connection runs: GuardedProtocol, or fastlane.FastProtocol in front of it
        self.protocol: Callable[[ConnectionGuard], asyncio.Protocol] = GuardedProtocol

    def __call__(self) -> asyncio.Protocol:
        return self.protocol(self)

    def note(self, event: str, message: str) -> None:
        """One line per LOG_INTERVAL at most: hostile clients must not flood the log."""
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            self.log.bind(event=event, refused=self.refused, timed_out=self.timed_out, open=self.open).warning(message)


class GuardedProtocol(asyncio.Protocol):
    """Forwards every protocol event to aiohttp's handler; times each request's headers."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._address = ""
        self._requests = 0  # requests whose headers aiohttp has parsed on this connection
        self._body: Any = None  # the payload of the last request parsed (EMPTY_PAYLOAD when it has none)
        self._admitted = False  # counted in guard.open / by_address (not refused on accept)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admit(transport):
            self._arm()
            self._attach()

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count the connection in, or close it when over max_connections or the per-address cap."""
        g = self.guard
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if g.open >= g.max_connections:
            g.refused += 1
            g.note("http_connection_refused", "gateway at max_connections; closing new connections")
            transport.abort()  # type: ignore[attr-defined]
            return False
        if g.by_address.get(address, 0) >= g.max_per_address:
            g.refused += 1
            g.note("http_connection_refused", "a client address is at max_connections_per_address; closing its new connections")
            transport.abort()  # type: ignore[attr-defined]
            return False
        g.open += 1
        g.by_address[address] = g.by_address.get(address, 0) + 1
        self._address = address
        self._admitted = True
        return True

    def _attach(self) -> None:
        """aiohttp's handler takes the connection (fastlane.py defers this until it hands one over)."""
        self.inner = self.guard.inner()
        self.inner.connection_made(self.transport)

    def _parsed(self) -> int:
        """How many requests aiohttp's parser has completed the headers of (errors included)."""
        return self.inner._request_count  # type: ignore[no-any-return]

    def _idle(self) -> bool:
        """aiohttp's handler waits for the next request: nothing queued, no request running."""
        waiter = self.inner._waiter
        return waiter is not None and not waiter.done() and not self.inner._messages

    def _past_body(self) -> bool:
        """The last parsed request's body has fully arrived: any further byte belongs to the next request."""
        body = self._body
        return body is not None and body.is_eof()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.guard.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._timer = None
        self.guard.timed_out += 1
        self.guard.note("http_header_timeout", "closing connections whose request headers are too slow")
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is None:
            return
        # these bytes start a new request: the handler waits for one, or the last request's body is complete
        starts = self._timer is None and (self._idle() or self._past_body())
        inner.data_received(data)
        if self.inner is None:
            return
        n = self._parsed()
        if n != self._requests:  # headers complete: the handler and body_timeout take it from here
            self._requests = n
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._body = inner._messages[-1][1] if inner._messages else None
            if self._body is EMPTY_PAYLOAD and not data.endswith(b"\r\n\r\n"):
                self._arm()  # bytes after a bodiless request's header end: the next request began in this read
        elif starts:
            self._arm()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._admitted:
            return
        self._admitted = False
        g = self.guard
        g.open -= 1
        left = g.by_address.get(self._address, 1) - 1
        if left > 0:
            g.by_address[self._address] = left
        else:
            g.by_address.pop(self._address, None)
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)


class _OneLine(logging.Filter):
    """aiohttp logs a full traceback for each malformed request it rejects (a line too long,
    a bad header): hostile input must cost one log line per interval, not a traceback each."""

    def __init__(self, guard_log: Any) -> None:
        super().__init__()
        self.log = guard_log
        self.dropped = 0
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL:
            self._last = now
            exc = record.exc_info[1] if record.exc_info else None
            reason = f"{type(exc).__name__}: {str(exc)[:120]!r}" if exc is not None else record.getMessage()[:160]
            self.log.bind(event="http_bad_request", count=self.dropped, reason=reason).warning(
                "gateway rejected malformed HTTP requests"
            )
        return False


def http_logger() -> logging.Logger:
    """The stdlib logger handed to aiohttp's request handler: rate-limited, one line, no traceback."""
    log = logging.getLogger("swarmd.gateway.http")
    log.propagate = False
    if not any(isinstance(f, _OneLine) for f in log.filters):
        log.addFilter(_OneLine(logger.bind(role="gateway", component="http_guard")))
    return log
