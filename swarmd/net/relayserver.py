"""The relay's TCP server: it splices two circuits it cannot decrypt.

It performs what the sans-IO `RelayCore` (swarmd.net.relay) decides and owns
every task it starts (connection handlers and their two pumps), so `stop()`
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, SwarmdError
from swarmd.net.relay import (
    HELLO_SIZE,
    ST_BAD_HELLO,
    ST_CLOSING,
    ST_OVERLOADED,
    ST_PAIRED,
    ST_RATE_LIMITED,
    ST_WAITING,
    STATUS_NAMES,
    CloseCircuit,
    Refuse,
    RelayConfig,
    RelayCore,
    Send,
    Splice,
    encode_status,
)
from swarmd.net.relayio import READ_CHUNK
from swarmd.node.address import format_hostport
from swarmd.node.deadline import within

LOG_PER_SECOND = 10  # WAITING then PAIRED, with room to spare


@dataclass
class _Conn:
    id: int
    source: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    paired: asyncio.Future[tuple[_Conn, int, asyncio.Future[None]]] | None = None  # set while waiting
    observed: str = ""  # "ip:port" the client's connection came from (echoed in PONG)


@dataclass
class _CircuitState:
    last_activity: float = field(default_factory=time.monotonic)
    ended: str = ""


class RelayServer:
    """A TCP listener that pairs streams by token and splices them blindly."""

    def __init__(self, config: RelayConfig, host: str = "127.0.0.1") -> None:
        self.config = config
        self.host = host
        self.core = RelayCore(config)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._by_source: dict[str, int] = {}  # open sockets per source address
        self._handlers: set[asyncio.Task[Any]] = set()
        self._next_conn = 1
        self.bytes_total = 0
        self.connections_refused = 0
        self.log = logger.bind(part="relay")
        self._log_window = 0.0
        self._log_count = 0
        self._log_suppressed = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, self.config.port, limit=READ_CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.bind(event="relay_listening", host=self.host, port=self.port).info("relay listening")
        return self.port

    async def stop(self) -> None:
        self.core.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            if conn.paired is not None and not conn.paired.done():
                with contextlib.suppress(Exception):
                    conn.writer.write(encode_status(ST_CLOSING, "relay is shutting down"))
        tasks = list(self._handlers)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2.0)

    def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "circuits": self.core.circuits,
            "pending": self.core.pending,
            "paired_total": self.core.paired_total,
            "refused": dict(self.core.refused),
            "bytes": self.bytes_total,
            "connections": len(self._conns),
            "connections_refused": self.connections_refused,
        }

    # -- per connection ---------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.core.closing:
            writer.close()
            return
        peer = writer.get_extra_info("peername") or ("?", 0)
        conn = _Conn(self._next_conn, str(peer[0]), reader, writer, observed=format_hostport(str(peer[0]), peer[1]) if len(peer) > 1 else "")
        self._next_conn += 1
        if len(self._conns) >= self.config.max_connections:  # a connection flood must not eat every fd
            self.connections_refused += 1
            self._refuse(conn, ST_OVERLOADED, f"relay holds {len(self._conns)} connections (max_connections)")
            writer.close()
            return
        if self._by_source.get(conn.source, 0) >= self.config.max_connections_per_source:
            self.connections_refused += 1  # one address must not take the sockets everyone shares
            self._refuse(conn, ST_RATE_LIMITED,
                         f"source holds {self.config.max_connections_per_source} connections (max_connections_per_source)")
            writer.close()
            return
        self._handlers.add(task)
        self._conns[conn.id] = conn
        self._by_source[conn.source] = self._by_source.get(conn.source, 0) + 1
        try:
            await self._serve(conn)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # stop() cancelled us; this task is the stream server's callback and nobody
            # awaits its result, so end quietly instead of leaving a cancelled result
            pass
        finally:
            self._conns.pop(conn.id, None)
            left = self._by_source.get(conn.source, 1) - 1
            if left > 0:
                self._by_source[conn.source] = left
            else:
                self._by_source.pop(conn.source, None)
            self.core.closed(conn.id)  # a circuit's splice ends both of its sides itself
            writer.close()
            self._handlers.discard(task)

    async def _serve(self, conn: _Conn) -> None:
        try:
            hello = await within(conn.reader.readexactly(HELLO_SIZE), self.config.hello_timeout)
        except TimeoutError:
            self._refuse(conn, ST_BAD_HELLO, f"no hello within {self.config.hello_timeout:g}s")
            return
        except asyncio.IncompleteReadError as e:
            if e.partial:
                self._refuse(conn, ST_BAD_HELLO, f"hello truncated at {len(e.partial)} of {HELLO_SIZE} bytes")
            return
        for action in self.core.hello(conn.id, conn.source, hello, conn.observed):
            if isinstance(action, Send):
                conn.writer.write(action.data)
                if action.data[0] == ST_WAITING:
                    await self._wait_for_peer(conn)
                    return
                await within(conn.writer.drain(), self.config.hello_timeout)
                return  # a pong: done
            if isinstance(action, Refuse):
                self._refuse(conn, action.code, action.reason)
                return
            if isinstance(action, Splice):
                await self._join(action, conn)
                return

    def _refuse(self, conn: _Conn, code: int, reason: str) -> None:
        # one line per refusal, at most LOG_PER_SECOND a second: a flood must not flood the log
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._log_suppressed:
                self.log.bind(event="relay_refused_suppressed", count=self._log_suppressed).info(
                    "{} more refusals not logged", self._log_suppressed
                )
            self._log_window, self._log_count, self._log_suppressed = now, 0, 0
        if self._log_count < LOG_PER_SECOND:
            self._log_count += 1
            self.log.bind(event="relay_refused", status=STATUS_NAMES[code], source=conn.source).info(
                "relay refused a stream: {}", reason
            )
        else:
            self._log_suppressed += 1
        with contextlib.suppress(Exception):
            conn.writer.write(encode_status(code, reason))

    async def _wait_for_peer(self, conn: _Conn) -> None:
        """Hold an unpaired stream until its peer arrives (then splice here) or the timer fires."""
        loop = asyncio.get_running_loop()
        conn.paired = loop.create_future()
        # A waiting client sends nothing before PAIRED, so a read that returns
        # means it hung up (EOF) or broke the protocol.
        early = asyncio.ensure_future(conn.reader.read(1))
        try:
            done, _ = await asyncio.wait(
                {conn.paired, early}, timeout=self.config.pair_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if conn.paired.done():
                other, cid, circuit_done = conn.paired.result()
                prefix = b""
                if not early.done():
                    early.cancel()
                await asyncio.gather(early, return_exceptions=True)
                if not early.cancelled() and early.exception() is None:
                    prefix = early.result()  # our client spoke right after PAIRED: keep its byte
                try:
                    await self._splice(cid, conn, other, prefix)
                finally:
                    if not circuit_done.done():
                        circuit_done.set_result(None)
                return
            if early in done:
                data = early.result() if early.exception() is None else b""
                self.core.closed(conn.id)
                if data:
                    self._refuse(conn, ST_BAD_HELLO, "sent data before the circuit was paired")
                return
            for action in self.core.pair_timeout(conn.id):
                if isinstance(action, Refuse):
                    self._refuse(conn, action.code, action.reason)
        finally:
            if not early.done():
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)

    async def _join(self, sp: Splice, b: _Conn) -> None:
        """The second stream arrived: hand it to the waiter's handler, which runs the splice."""
        a = self._conns.get(sp.a)
        if a is None or a.paired is None or a.paired.done():  # the waiter vanished in between
            self.core.closed(sp.a)
            self.core.closed(b.id)
            self._refuse(b, ST_CLOSING, "the other side left before pairing")
            return
        circuit_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        a.paired.set_result((b, sp.circuit, circuit_done))
        await circuit_done  # keep this handler (and b's socket) alive until the circuit ends

    async def _splice(self, cid: int, a: _Conn, b: _Conn, prefix: bytes) -> None:
        started = time.monotonic()
        state = _CircuitState()
        a.writer.write(encode_status(ST_PAIRED))
        b.writer.write(encode_status(ST_PAIRED))
        if prefix:
            b.writer.write(prefix)
            self.core.carried(cid, len(prefix))
        log = self.log.bind(circuit=cid, a=a.source, b=b.source)
        log.bind(event="relay_paired").info("relay paired two streams")
        circ = self.core.circuit(cid)
        try:
            pumps = [
                asyncio.ensure_future(self._pump(cid, state, a.reader, b.writer)),
                asyncio.ensure_future(self._pump(cid, state, b.reader, a.writer)),
            ]
            try:
                # a half-close lets the other direction finish; a limit or an error ends both
                await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for c in (a, b):
                with contextlib.suppress(Exception):
                    c.writer.close()
            self.core.closed(a.id)
            self.core.closed(b.id)
            log.bind(
                event="relay_circuit_closed",
                reason=state.ended or "eof",
                bytes=circ.bytes if circ is not None else 0,
                seconds=round(time.monotonic() - started, 3),
            ).info("relay circuit closed")

    async def _pump(
        self, cid: int, state: _CircuitState, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        idle = self.config.idle_timeout
        while True:
            try:
                data = await within(src.read(READ_CHUNK), idle)
            except TimeoutError:
                if time.monotonic() - state.last_activity < idle:
                    continue  # the other direction is busy: the circuit is not idle
                state.ended = state.ended or "idle"
                raise SwarmdError(ERR_TIMEOUT, f"circuit idle for {idle:g}s") from None
            if state.ended:
                return
            if not data:
                if dst.can_write_eof():
                    with contextlib.suppress(Exception):
                        dst.write_eof()
                return
            state.last_activity = time.monotonic()
            self.bytes_total += len(data)
            for action in self.core.carried(cid, len(data)):
                if isinstance(action, CloseCircuit):
                    state.ended = "too_large"
                    self.log.bind(event="relay_limit", circuit=cid).warning(
                        "relay circuit over its byte limit"
                    )
                    raise SwarmdError(ERR_CLOSED, action.reason)
            dst.write(data)
            await within(dst.drain(), idle)


# -- client side ------------------------------------------------------------------------
