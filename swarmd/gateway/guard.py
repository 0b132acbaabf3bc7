"""Connection guard for the gateway's HTTP listener: slow clients and connection floods.

aiohttp parses a request only once its headers are complete and has no bound
on how long that may take, nor on how many sockets may be open, so a client
that drips its headers a byte at a time (slowloris) holds a connection, and
enough of them hold the port. This guard sits between the transport and
aiohttp's protocol (a thin forwarding asyncio.Protocol) and:

- closes a connection whose first request line and headers have not fully
  arrived within `header_timeout` (later requests on a keep-alive connection
  are bounded by aiohttp's keepalive timer, which closes a connection whose
  next request is not complete within `keepalive_timeout` of the last reply);
- refuses connections above `max_connections` open at once (closed on accept,
  counted, logged once per interval).

Bodies are bounded in the handlers (`body_timeout` around each read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

HEADER_END = b"\r\n\r\n"
LOG_INTERVAL = 10.0  # seconds between log lines about refused or timed-out connections


class ConnectionGuard:
    """Protocol factory wrapper; one per listening gateway."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], header_timeout: float, max_connections: int) -> None:
        self.inner = inner
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections closed on accept: over max_connections
        self.timed_out = 0  # connections closed: headers not complete within header_timeout
        self._last_log = 0.0
        self.log = logger.bind(role="gateway", component="http_guard")

    def __call__(self) -> asyncio.Protocol:
        return GuardedProtocol(self)

    def note(self, event: str, message: str) -> None:
        """One line per LOG_INTERVAL at most: hostile clients must not flood the log."""
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            self.log.bind(event=event, refused=self.refused, timed_out=self.timed_out, open=self.open).warning(message)


class GuardedProtocol(asyncio.Protocol):
    """Forwards every protocol event to aiohttp's handler; watches the first request's headers."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # last bytes seen, to find a header end split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self.guard
        self.transport = transport  # type: ignore[assignment]
        if g.open >= g.max_connections:
            g.refused += 1
            g.note("http_connection_refused", "gateway at max_connections; closing new connections")
            transport.abort()  # type: ignore[attr-defined]
            return
        g.open += 1
        self.inner = g.inner()
        self._timer = asyncio.get_running_loop().call_later(g.header_timeout, self._headers_late)
        self.inner.connection_made(transport)

    def _headers_late(self) -> None:
        self._timer = None
        self.guard.timed_out += 1
        self.guard.note("http_header_timeout", "closing connections whose request headers are too slow")
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self._timer is not None:
            seen = self._tail + data
            if HEADER_END in seen:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = seen[-3:]
        self.inner.data_received(data)

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
        if self.inner is None:
            return
        self.guard.open -= 1
        inner, self.inner = self.inner, None
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
