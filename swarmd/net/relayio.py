"""Asyncio glue for the client side of a blind relay (the server is swarmd.net.relayserver).

The client side opens a circuit (`open_circuit`) and measures relays
(`ping_relay`, `pick_relay`); what comes back is a plain byte pipe over which
the caller runs its Noise handshake end to end.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.relay import (
    KIND_CIRCUIT,
    KIND_PING,
    ST_PAIRED,
    ST_PONG,
    ST_WAITING,
    TOKEN_SIZE,
    RelayProtocolError,
    Status,
    StatusDecoder,
    encode_hello,
)
from swarmd.node.deadline import within

READ_CHUNK = 256 * 1024
MAX_STATUSES = 4


@dataclass
class RelayCircuit:
    """A paired stream through a relay: a byte pipe to the peer, Noise goes on top."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    relay: tuple[str, int]
    connect_s: float  # TCP connect to the relay
    wait_s: float  # hello -> PAIRED (how long the peer took to arrive)


def new_token() -> bytes:
    return os.urandom(TOKEN_SIZE)


async def _read_statuses(
    reader: asyncio.StreamReader, timeout: float, on_waiting: Callable[[], None] | None = None
) -> list[Status]:
    """Read status frames until PAIRED, PONG or a refusal, never past them."""
    decoder = StatusDecoder()
    statuses: list[Status] = []
    while not decoder.done:
        if len(statuses) >= MAX_STATUSES:
            raise RelayProtocolError(f"relay sent more than {MAX_STATUSES} statuses")
        try:
            head = await within(reader.readexactly(2), timeout)
            reason = await within(reader.readexactly(head[1]), timeout)
        except asyncio.IncompleteReadError:
            raise SwarmdError(ERR_CLOSED, "relay closed the connection before pairing") from None
        out, _ = decoder.feed(head + reason)
        statuses += out
        if on_waiting is not None and any(st.code == ST_WAITING for st in out):
            on_waiting()
    return statuses


async def open_circuit(
    host: str,
    port: int,
    token: bytes,
    *,
    timeout: float = 15.0,
    on_waiting: Callable[[], None] | None = None,
) -> RelayCircuit:
    """Connect to a relay and wait (bounded) until the peer presents the same token.

    `on_waiting` runs when the relay has registered the token (the peer may now come).
    """
    t0 = time.monotonic()
    try:
        reader, writer = await within(
            asyncio.open_connection(host, port, limit=READ_CHUNK), timeout
        )
    except (OSError, TimeoutError) as e:
        raise SwarmdError(ERR_UNAVAILABLE, f"relay {host}:{port} unreachable: {e!r}") from None
    t1 = time.monotonic()
    try:
        writer.write(encode_hello(KIND_CIRCUIT, token))
        for st in await _read_statuses(reader, timeout, on_waiting):
            if st.refused:
                raise st.error()
            if st.code == ST_PAIRED:
                return RelayCircuit(reader, writer, (host, port), t1 - t0, time.monotonic() - t1)
        raise RelayProtocolError("relay ended its statuses without PAIRED")
    except TimeoutError:
        writer.close()
        raise SwarmdError(
            ERR_TIMEOUT, f"relay {host}:{port} did not pair the circuit within {timeout:g}s"
        ) from None
    except BaseException:
        writer.close()
        raise


async def ping_relay(host: str, port: int, *, timeout: float = 3.0) -> float:
    """Round trip in seconds: TCP connect + hello + PONG."""
    t0 = time.monotonic()
    try:
        reader, writer = await within(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as e:
        raise SwarmdError(ERR_UNAVAILABLE, f"relay {host}:{port} unreachable: {e!r}") from None
    try:
        writer.write(encode_hello(KIND_PING))
        statuses = await _read_statuses(reader, timeout)
        if not statuses or statuses[-1].code != ST_PONG:
            raise RelayProtocolError(f"relay {host}:{port} answered a ping with {statuses!r:.100}")
        return time.monotonic() - t0
    except TimeoutError:
        raise SwarmdError(
            ERR_TIMEOUT, f"relay {host}:{port} did not answer a ping within {timeout:g}s"
        ) from None
    finally:
        writer.close()


async def pick_relay(
    candidates: list[tuple[str, int]], *, timeout: float = 3.0
) -> tuple[tuple[str, int], float]:
    """The candidate with the lowest round trip (all pinged at once, bounded)."""
    if not candidates:
        raise SwarmdError(ERR_UNAVAILABLE, "no relay is announced on the relays topic")
    results = await asyncio.gather(
        *(ping_relay(h, p, timeout=timeout) for h, p in candidates), return_exceptions=True
    )
    best = [(rtt, addr) for rtt, addr in zip(results, candidates, strict=True) if isinstance(rtt, float)]
    if not best:
        raise SwarmdError(ERR_UNAVAILABLE, f"none of {len(candidates)} relays answered: {results[0]!r}")
    rtt, addr = min(best)
    return addr, rtt


class _CircuitClient(asyncio.Protocol):
    """Speaks the relay's hello/status exchange, then hands the transport over."""

    def __init__(self, token: bytes, on_waiting: Callable[[], None] | None) -> None:
        self.token = token
        self.on_waiting = on_waiting
        self.decoder = StatusDecoder()
        self.paired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rest = bytearray()  # stream bytes that arrived with or after PAIRED, before the handover
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.statuses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (no isinstance check: uvloop's TCP transport is not an asyncio.Transport subclass)
        self.transport = transport  # type: ignore[assignment]
        transport.write(encode_hello(KIND_CIRCUIT, self.token))

    def data_received(self, data: bytes) -> None:
        if self.decoder.done:
            self.rest += data
            return
        try:
            statuses, rest = self.decoder.feed(data)
        except RelayProtocolError as e:
            self._fail(e)
            return
        self.statuses += len(statuses)
        for st in statuses:
            if st.refused:
                self._fail(st.error())
                return
            if st.code == ST_WAITING and self.on_waiting is not None:
                self.on_waiting()
            if st.code == ST_PAIRED and not self.paired.done():
                self.rest += rest
                self.paired.set_result(None)
                return
            if st.code == ST_PONG:
                self._fail(RelayProtocolError("relay answered a circuit hello with PONG"))
                return
        if self.statuses > MAX_STATUSES:
            self._fail(RelayProtocolError(f"relay sent more than {MAX_STATUSES} statuses"))

    def _fail(self, err: SwarmdError) -> None:
        if not self.paired.done():
            self.paired.set_exception(err)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.paired.done():
            self.paired.set_exception(SwarmdError(ERR_CLOSED, "relay closed the connection before pairing"))


@dataclass
class RelayPath:
    """How a relayed transport came to be: for connection info and logs."""

    relay: tuple[str, int]
    connect_s: float
    wait_s: float


async def relay_transport(
    host: str,
    port: int,
    token: bytes,
    protocol: asyncio.Protocol,
    *,
    timeout: float = 15.0,
    on_waiting: Callable[[], None] | None = None,
) -> RelayPath:
    """Open a circuit and run `protocol` on it, exactly as if it were a direct TCP
    connection to the peer (the Noise connection runs end to end over it)."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    client = _CircuitClient(token, on_waiting)
    try:
        transport, _ = await within(loop.create_connection(lambda: client, host, port), timeout)
    except (OSError, TimeoutError) as e:
        raise SwarmdError(ERR_UNAVAILABLE, f"relay {host}:{port} unreachable: {e!r}") from None
    t1 = time.monotonic()
    try:
        await within(asyncio.shield(client.paired), timeout)
    except TimeoutError:
        transport.close()
        raise SwarmdError(ERR_TIMEOUT, f"relay {host}:{port} did not pair the circuit within {timeout:g}s") from None
    except BaseException:
        transport.close()
        raise
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if client.rest:
        protocol.data_received(bytes(client.rest))
    if client.lost:
        protocol.connection_lost(None)
    return RelayPath((host, port), t1 - t0, time.monotonic() - t1)
