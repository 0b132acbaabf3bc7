"""The blind relay: wire format, pairing rules and limits, on real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmd.errors import (
    ERR_CLOSED,
    ERR_CONFLICT,
    ERR_OVERLOADED,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.net.relay import (
    HELLO_SIZE,
    KIND_CIRCUIT,
    KIND_PING,
    ST_BAD_HELLO,
    ST_OVERLOADED,
    ST_PAIRED,
    ST_RATE_LIMITED,
    ST_TIMEOUT,
    ST_WAITING,
    TOKEN_SIZE,
    Refuse,
    RelayConfig,
    RelayCore,
    RelayProtocolError,
    Send,
    Splice,
    StatusDecoder,
    decode_hello,
    encode_hello,
    encode_status,
)
from swarmd.net.relayio import new_token, open_circuit, pick_relay, ping_relay, relay_transport
from swarmd.net.relayserver import RelayServer

# -- wire format --------------------------------------------------------------------


def test_hello_round_trip() -> None:
    tok = os.urandom(TOKEN_SIZE)
    h = decode_hello(encode_hello(KIND_CIRCUIT, tok))
    assert (h.kind, h.token) == (KIND_CIRCUIT, tok)
    assert decode_hello(encode_hello(KIND_PING)).kind == KIND_PING


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"SWRL\x01\x01" + b"\x00" * 32, "all zeros"),
        (b"XXXX\x01\x01" + b"\x01" * 32, "start with"),
        (b"SWRL\x09\x01" + b"\x01" * 32, "version 9"),
        (b"SWRL\x01\x07" + b"\x01" * 32, "kind 7"),
        (b"SWRL\x01\x01", "38 bytes"),
    ],
)
def test_bad_hello_is_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(RelayProtocolError, match=words):
        decode_hello(data)


@given(st.binary(max_size=80))
def test_decode_hello_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        decode_hello(data)
    except RelayProtocolError:
        pass


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=7))
def test_status_decoder_on_arbitrary_bytes(data: bytes, step: int) -> None:
    dec = StatusDecoder()
    for i in range(0, len(data), step):
        try:
            _, rest = dec.feed(data[i : i + step])
        except RelayProtocolError:
            return
        if dec.done:
            assert len(rest) <= step
            return


def test_status_decoder_hands_back_stream_bytes_after_paired() -> None:
    dec = StatusDecoder()
    out, rest = dec.feed(encode_status(ST_WAITING, "wait") + encode_status(ST_PAIRED) + b"noise bytes")
    assert [s.code for s in out] == [ST_WAITING, ST_PAIRED]
    assert rest == b"noise bytes" and dec.done


# -- the core's rules -----------------------------------------------------------------


def test_core_pairs_by_token_and_refuses_a_third_stream() -> None:
    core = RelayCore(RelayConfig(max_circuits=4))
    tok = new_token()
    [w] = core.hello(1, "10.0.0.1", encode_hello(KIND_CIRCUIT, tok))
    assert isinstance(w, Send) and w.data[0] == ST_WAITING
    [sp] = core.hello(2, "10.0.0.2", encode_hello(KIND_CIRCUIT, tok))
    assert isinstance(sp, Splice) and (sp.a, sp.b) == (1, 2)
    assert core.circuits == 1 and core.pending == 0
    # the token is consumed: a third stream with it waits alone (and times out), it cannot join
    [w3] = core.hello(3, "10.0.0.3", encode_hello(KIND_CIRCUIT, tok))
    assert isinstance(w3, Send) and w3.data[0] == ST_WAITING
    [r] = core.pair_timeout(3)
    assert isinstance(r, Refuse) and r.code == ST_TIMEOUT
    core.closed(1)
    assert core.circuits == 0


def test_core_limits_circuits_and_unpaired_streams_per_source() -> None:
    core = RelayCore(RelayConfig(max_circuits=3, max_pending_per_source=2))
    a1 = core.hello(1, "10.0.0.1", encode_hello(KIND_CIRCUIT, new_token()))
    a2 = core.hello(2, "10.0.0.1", encode_hello(KIND_CIRCUIT, new_token()))
    assert all(isinstance(x[0], Send) for x in (a1, a2))
    [r] = core.hello(3, "10.0.0.1", encode_hello(KIND_CIRCUIT, new_token()))
    assert isinstance(r, Refuse) and r.code == ST_RATE_LIMITED
    assert isinstance(core.hello(4, "10.0.0.2", encode_hello(KIND_CIRCUIT, new_token()))[0], Send)
    [r] = core.hello(5, "10.0.0.3", encode_hello(KIND_CIRCUIT, new_token()))
    assert isinstance(r, Refuse) and r.code == ST_OVERLOADED
    core.closed(1)  # a waiting stream hung up: its slot is free again
    assert isinstance(core.hello(6, "10.0.0.3", encode_hello(KIND_CIRCUIT, new_token()))[0], Send)
    assert core.refused == {"rate_limited": 1, "overloaded": 1}


def test_core_closes_a_circuit_over_its_byte_allowance() -> None:
    core = RelayCore(RelayConfig(max_bytes=1000))
    tok = new_token()
    core.hello(1, "a", encode_hello(KIND_CIRCUIT, tok))
    [sp] = core.hello(2, "b", encode_hello(KIND_CIRCUIT, tok))
    assert core.carried(sp.circuit, 600) == []
    [close] = core.carried(sp.circuit, 600)
    assert "1000 bytes" in close.reason


def test_core_refuses_garbage_hello() -> None:
    core = RelayCore(RelayConfig())
    [r] = core.hello(1, "a", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 11)
    assert isinstance(r, Refuse) and r.code == ST_BAD_HELLO


# -- the server on loopback -------------------------------------------------------------


@pytest.fixture
async def relay():
    servers: list[RelayServer] = []

    async def make(**kw) -> RelayServer:
        s = RelayServer(RelayConfig(**kw), "127.0.0.1")
        await s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.stop()


async def test_relay_splices_ten_megabytes_both_ways(relay) -> None:
    srv = await relay()
    tok = new_token()
    a, b = await asyncio.gather(
        open_circuit("127.0.0.1", srv.port, tok, timeout=20),
        open_circuit("127.0.0.1", srv.port, tok, timeout=20),
    )
    payload = os.urandom(10 * 1024 * 1024)

    async def send(w: asyncio.StreamWriter) -> None:
        w.write(payload)
        await w.drain()
        w.write_eof()

    async def recv(r: asyncio.StreamReader) -> bytes:
        return await asyncio.wait_for(r.read(-1), 60)

    _, _, got_b, got_a = await asyncio.gather(send(a.writer), send(b.writer), recv(b.reader), recv(a.reader))
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(payload).digest()
    assert len(got_a) == len(payload)
    a.writer.close()
    b.writer.close()
    assert srv.stats()["paired_total"] == 1


async def test_unpaired_stream_is_refused_after_the_pair_timeout(relay) -> None:
    srv = await relay(pair_timeout=0.3)
    with pytest.raises(SwarmdError) as ei:
        await open_circuit("127.0.0.1", srv.port, new_token(), timeout=20)
    assert ei.value.code == ERR_TIMEOUT
    assert srv.stats()["refused"] == {"timeout": 1}
    assert srv.stats()["pending"] == 0


async def test_over_limit_circuits_are_refused(relay) -> None:
    srv = await relay(max_circuits=1, pair_timeout=30)
    first = asyncio.ensure_future(open_circuit("127.0.0.1", srv.port, new_token(), timeout=30))
    try:
        while srv.stats()["pending"] < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(SwarmdError) as ei:
            await open_circuit("127.0.0.1", srv.port, new_token(), timeout=20)
        assert ei.value.code == ERR_OVERLOADED
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)


async def test_one_source_cannot_hold_many_unpaired_streams(relay) -> None:
    srv = await relay(max_pending_per_source=2, pair_timeout=30)
    waiting = [asyncio.ensure_future(open_circuit("127.0.0.1", srv.port, new_token(), timeout=30)) for _ in range(2)]
    try:
        while srv.stats()["pending"] < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(SwarmdError) as ei:
            await open_circuit("127.0.0.1", srv.port, new_token(), timeout=20)
        assert ei.value.code == ERR_RATE_LIMITED
    finally:
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_circuit_over_its_byte_limit_is_cut(relay) -> None:
    srv = await relay(max_bytes=1 << 20)
    tok = new_token()
    a, b = await asyncio.gather(open_circuit("127.0.0.1", srv.port, tok), open_circuit("127.0.0.1", srv.port, tok))
    a.writer.write(os.urandom(4 << 20))
    got = await asyncio.wait_for(b.reader.read(-1), 30)  # EOF arrives once the relay cuts the circuit
    assert len(got) < 4 << 20
    a.writer.close()
    b.writer.close()
    assert srv.stats()["refused"].get("too_large") == 1


async def test_idle_circuit_is_closed(relay) -> None:
    srv = await relay(idle_timeout=0.3)
    tok = new_token()
    a, b = await asyncio.gather(open_circuit("127.0.0.1", srv.port, tok), open_circuit("127.0.0.1", srv.port, tok))
    assert await asyncio.wait_for(a.reader.read(-1), 30) == b""
    assert await asyncio.wait_for(b.reader.read(-1), 30) == b""
    a.writer.close()
    b.writer.close()


async def test_same_token_twice_while_spliced_cannot_hijack(relay) -> None:
    # 2 s, not 0.3: a and b must pair within it, and on a loaded machine the second may arrive late
    srv = await relay(pair_timeout=2.0)
    tok = new_token()
    a, b = await asyncio.gather(open_circuit("127.0.0.1", srv.port, tok), open_circuit("127.0.0.1", srv.port, tok))
    with pytest.raises(SwarmdError) as ei:
        await open_circuit("127.0.0.1", srv.port, tok, timeout=20)
    assert ei.value.code == ERR_TIMEOUT  # it waits alone: the pair it wanted to join is not reachable
    a.writer.write(b"still private")
    await a.writer.drain()
    assert await asyncio.wait_for(b.reader.readexactly(13), 10) == b"still private"
    a.writer.close()
    b.writer.close()
    assert ERR_CONFLICT and ERR_CLOSED  # codes a client may also see (token in use, relay closing)


async def test_garbage_connection_gets_a_reason_and_server_keeps_serving(relay) -> None:
    srv = await relay()
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(b"\xff" * HELLO_SIZE)
    data = await asyncio.wait_for(r.read(-1), 10)
    assert data[0] == ST_BAD_HELLO and b"SWRL" in data
    w.close()
    assert await ping_relay("127.0.0.1", srv.port) > 0


async def test_pick_relay_prefers_a_live_one(relay) -> None:
    srv = await relay()
    dead = ("127.0.0.1", 1)
    addr, rtt = await pick_relay([dead, ("127.0.0.1", srv.port)])
    assert addr == ("127.0.0.1", srv.port) and rtt > 0
    with pytest.raises(SwarmdError):
        await pick_relay([dead])


class Echo(asyncio.Protocol):
    """A protocol handed a relayed transport, as the Noise connection is."""

    def __init__(self, greet: bytes = b"") -> None:
        self.greet = greet
        self.got = bytearray()
        self.closed = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.greet:
            transport.write(self.greet)

    def data_received(self, data: bytes) -> None:
        self.got += data
        if not self.greet:
            self.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.closed.set()


async def test_relay_transport_hands_the_circuit_to_a_protocol(relay) -> None:
    srv = await relay()
    tok = new_token()
    caller, callee = Echo(greet=b"hello through the relay"), Echo()
    pa, pb = await asyncio.gather(
        relay_transport("127.0.0.1", srv.port, tok, caller, timeout=20),
        relay_transport("127.0.0.1", srv.port, tok, callee, timeout=20),
    )
    while len(caller.got) < len(caller.greet):
        await asyncio.wait_for(asyncio.sleep(0.01), 5)
    assert bytes(caller.got) == b"hello through the relay" == bytes(callee.got)
    assert pa.relay == ("127.0.0.1", srv.port) and pb.connect_s >= 0
    caller.transport.close()
    await asyncio.wait_for(callee.closed.wait(), 10)


async def test_relay_transport_reports_refusals(relay) -> None:
    srv = await relay(pair_timeout=0.2)
    with pytest.raises(SwarmdError) as ei:
        await relay_transport("127.0.0.1", srv.port, new_token(), Echo(), timeout=20)
    assert ei.value.code == ERR_TIMEOUT


async def test_garbage_flood_is_refused_and_the_log_stays_bounded(relay) -> None:
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lines.append, level="INFO", filter=lambda r: r["extra"].get("event") == "relay_refused")
    try:
        srv = await relay()

        async def one(i: int) -> bytes:
            # from four addresses: one address alone is capped at max_connections_per_source sockets
            r, w = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(f"127.0.0.{1 + i % 4}", 0))
            w.write(b"\x00" * HELLO_SIZE)
            data = await asyncio.wait_for(r.read(-1), 10)
            w.close()
            return data

        answers = await asyncio.gather(*(one(i) for i in range(60)))
        assert all(a[:1] == bytes([ST_BAD_HELLO]) for a in answers)
        assert srv.stats()["refused"]["bad_hello"] == 60
        assert len(lines) <= 2 * 10  # at most LOG_PER_SECOND a second (the flood may span two windows)
        assert await ping_relay("127.0.0.1", srv.port) > 0
    finally:
        logger.remove(sink)
