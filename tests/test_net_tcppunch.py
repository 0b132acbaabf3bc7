"""TCP punching pieces on loopback: the relay's PONG tells a port its mapping, one port serves
the rendezvous and the connect, and a refused connect is retried. The punch through real
NAT routers (the dropped first SYN, the simultaneous open) is in tests/test_nat_paths_lab.py."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmd.errors import ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.relay import ST_PONG, RelayConfig, encode_status
from swarmd.net.relayserver import RelayServer
from swarmd.net.tcppunch import parse_observed, rendezvous, reuse_socket, simultaneous_open


@pytest.fixture
async def relay():
    s = RelayServer(RelayConfig(), "127.0.0.1")
    await s.start()
    yield s
    await s.stop()


async def test_rendezvous_learns_the_port_mapping_and_the_port_stays_usable(relay) -> None:
    rv = await rendezvous(("127.0.0.1", relay.port), timeout=5)
    try:
        assert rv.observed == ("127.0.0.1", rv.port)  # no NAT on loopback: the mapping is the port itself
        assert rv.port == rv.sock.getsockname()[1] and rv.seconds > 0
        # the punch binds the same port again while the rendezvous connection holds it
        again = reuse_socket(rv.port)
        assert again.getsockname()[1] == rv.port
        again.close()
    finally:
        rv.close()


async def test_an_old_relay_without_observed_addresses_is_refused_with_a_reason() -> None:
    async def old_relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(38)
        w.write(encode_status(ST_PONG, "circuits=0 pending=0"))
        await w.drain()
        w.close()

    srv = await asyncio.start_server(old_relay, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SwarmdError) as ei:
            await rendezvous(("127.0.0.1", port), timeout=5)
        assert ei.value.code == ERR_UNAVAILABLE and "observed" in ei.value.message
    finally:
        srv.close()
        await srv.wait_closed()


async def test_refused_connects_are_retried_from_the_same_port_until_the_peer_answers() -> None:
    mine = reuse_socket(0)
    port = mine.getsockname()[1]
    mine.close()
    with socket.socket() as probe:  # a free port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        target = probe.getsockname()[1]
    loop = asyncio.get_running_loop()
    punch = asyncio.ensure_future(simultaneous_open(port, ("127.0.0.1", target), timeout=10))
    await asyncio.sleep(0.1)  # several connects refused meanwhile
    assert not punch.done()
    listener = reuse_socket(target, "127.0.0.1")
    listener.listen(1)
    sock = await punch
    try:
        assert sock.getsockname()[1] == port  # every retry left from the one punch port
        peer, _ = await loop.sock_accept(listener)
        assert peer.getpeername()[1] == port
        peer.close()
    finally:
        sock.close()
        listener.close()


async def test_a_punch_nobody_answers_ends_at_its_bound() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        target = probe.getsockname()[1]
    with pytest.raises(SwarmdError) as ei:
        await simultaneous_open(0, ("127.0.0.1", target), timeout=0.3)
    assert ei.value.code == ERR_TIMEOUT and "simultaneous open" in ei.value.message


@given(st.text(max_size=300))
def test_parse_observed_takes_any_reason_text(reason: str) -> None:
    out = parse_observed(reason)
    assert out is None or (isinstance(out[0], str) and 0 < out[1] <= 65535)


def test_parse_observed_reads_the_pong_field() -> None:
    assert parse_observed("circuits=1 pending=0 observed=198.18.0.11:40000") == ("198.18.0.11", 40000)
    assert parse_observed("circuits=1 pending=0") is None
    assert parse_observed("observed=198.18.0.11:0") is None
    assert parse_observed("observed=:80") is None
