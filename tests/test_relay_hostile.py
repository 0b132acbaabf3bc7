"""The relay listener under hostile traffic: connection floods, half-open and silent
sockets, garbage and oversized hellos, unpaired-token floods; it stays within its
bounds and keeps pairing and answering pings."""

from __future__ import annotations

import asyncio
import os

from swarmd.net.relay import (
    HELLO_SIZE,
    KIND_CIRCUIT,
    KIND_PING,
    ST_OVERLOADED,
    ST_PAIRED,
    ST_PONG,
    ST_RATE_LIMITED,
    ST_WAITING,
    RelayConfig,
    encode_hello,
)
from swarmd.net.relayio import new_token, ping_relay
from swarmd.net.relayserver import RelayServer

WAIT = 30.0


async def _start(**kw: object) -> RelayServer:
    srv = RelayServer(RelayConfig(**kw), "127.0.0.1")  # type: ignore[arg-type]
    await srv.start()
    return srv


async def _eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the relay sends until it closes the socket (bounded by WAIT); a reset
    (the relay closed with our garbage unread) counts as closed."""
    try:
        return await asyncio.wait_for(reader.read(-1), WAIT)
    except ConnectionResetError:
        return b""


async def test_connection_flood_is_capped_and_recovers() -> None:
    srv = await _start(max_connections=6, hello_timeout=60.0)
    held = []
    try:
        for _ in range(6):
            held.append(await asyncio.open_connection("127.0.0.1", srv.port))
        async with asyncio.timeout(WAIT):
            while srv.stats()["connections"] < 6:
                await asyncio.sleep(0.01)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        refused = await _eof(r)  # long before hello_timeout: refused on accept
        w.close()
        assert refused[0] == ST_OVERLOADED and b"max_connections" in refused
        assert srv.stats()["connections_refused"] >= 1
    finally:
        for _r, w in held:
            w.close()
    async with asyncio.timeout(WAIT):
        while srv.stats()["connections"]:
            await asyncio.sleep(0.01)
    assert await ping_relay("127.0.0.1", srv.port, timeout=WAIT) > 0
    await srv.stop()


async def test_half_open_silent_and_garbage_connections_are_dropped() -> None:
    srv = await _start(hello_timeout=0.5)
    try:
        # half a hello, then the client shuts its write side: closed at once, no pairing state kept
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
        w1.write(encode_hello(KIND_CIRCUIT, new_token())[: HELLO_SIZE // 2])
        w1.write_eof()
        # silent: closed after hello_timeout
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
        # oversized garbage: one hello's worth is read, the rest is never buffered past the refusal
        r3, w3 = await asyncio.open_connection("127.0.0.1", srv.port)
        w3.write(os.urandom(1 << 20))
        for r in (r1, r2, r3):
            await _eof(r)
        for w in (w1, w2, w3):
            w.close()
        assert srv.stats()["pending"] == 0 and srv.stats()["circuits"] == 0
        assert await ping_relay("127.0.0.1", srv.port, timeout=WAIT) > 0
    finally:
        await srv.stop()


async def test_unpaired_token_flood_stays_within_the_circuit_limit() -> None:
    srv = await _start(max_circuits=8, max_pending_per_source=64, pair_timeout=60.0)
    conns = []
    try:
        codes = []
        for _ in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.write(encode_hello(KIND_CIRCUIT, new_token()))
            conns.append((r, w))
            codes.append((await asyncio.wait_for(r.read(1), WAIT))[:1])
        assert srv.stats()["pending"] <= 8
        assert codes.count(bytes([ST_OVERLOADED])) >= 12
    finally:
        for _r, w in conns:
            w.close()
        await srv.stop()


async def _circuit(port: int, token: bytes, source: str = "127.0.0.1") -> tuple[int, asyncio.StreamWriter]:
    """Open one relay stream from `source`; the first status code it gets, and the writer to close it."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    w.write(encode_hello(KIND_CIRCUIT, token))
    return (await asyncio.wait_for(r.readexactly(1), WAIT))[0], w


async def test_one_address_pairing_with_itself_cannot_take_every_circuit() -> None:
    """One address took all 64 circuits with 128 sockets in 0.02 s; its share is now bounded."""
    srv = await _start(max_circuits=64)
    writers = []
    try:
        codes = []
        for _ in range(64):
            token = new_token()
            for _side in range(2):
                code, w = await _circuit(srv.port, token)
                codes.append(code)
                writers.append(w)
        share = srv.config.max_streams_per_source
        assert codes.count(ST_RATE_LIMITED) >= 128 - share
        assert srv.stats()["circuits"] <= share // 2
        # someone else still gets a circuit
        token = new_token()
        first, w1 = await _circuit(srv.port, token, "127.0.0.2")
        second, w2 = await _circuit(srv.port, token, "127.0.0.3")
        writers += [w1, w2]
        assert (first, second) == (ST_WAITING, ST_PAIRED)
    finally:
        for w in writers:
            w.close()
        await srv.stop()


async def test_one_address_cannot_hold_every_hello_socket() -> None:
    srv = await _start(max_connections=64, max_connections_per_source=8, hello_timeout=60.0)
    held = []
    try:
        for _ in range(8):
            held.append(await asyncio.open_connection("127.0.0.1", srv.port))
        async with asyncio.timeout(WAIT):
            while srv.stats()["connections"] < 8:
                await asyncio.sleep(0.01)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        refused = await _eof(r)
        w.close()
        assert refused[0] == ST_RATE_LIMITED and b"max_connections_per_source" in refused
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=("127.0.0.2", 0))
        w2.write(encode_hello(KIND_PING))
        assert (await asyncio.wait_for(r2.readexactly(1), WAIT))[0] == ST_PONG
        w2.close()
    finally:
        for _r, w in held:
            w.close()
        await srv.stop()
