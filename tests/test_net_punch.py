"""Punching pieces that need no NAT: our STUN servers only, the probe and offer codecs
with hostile input, a UDP punch + UDX on loopback (plain and birthday), and the pool's
preference for a punched path over a relayed one. The NAT lab runs the real thing."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.dht.node import DhtNode
from swarmd.errors import ERR_UNAVAILABLE, SwarmdError
from swarmd.net import udppunch, udx
from swarmd.net.punch import PathAttempt, PathInfo
from swarmd.net.udppunch import ACK, PROBE, UdpPuncher, encode_probe, parse_probe
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer, connect
from swarmd.rpc.registry import ConnectionRegistry
from tests.dht_testnet import dht_config


def test_no_stun_server_means_no_punching_never_a_public_one() -> None:
    with pytest.raises(SwarmdError) as ei:
        UdpPuncher([], "cone", initiator=True)
    assert ei.value.code == ERR_UNAVAILABLE


def test_probe_round_trip() -> None:
    pid = os.urandom(16)
    for kind in (PROBE, ACK):
        raw = encode_probe(kind, pid)
        assert parse_probe(raw) == (kind, pid)
        assert not udx.is_udx(raw) and not udx.is_udx_syn(raw)  # a probe never passes for UDX
    with pytest.raises(ValueError, match="16-byte"):
        encode_probe(PROBE, b"short")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40) | st.binary(min_size=16, max_size=17).map(lambda b: b"\x00SWP" + b))
def test_hostile_probes_give_a_worded_error_or_a_well_formed_probe(data: bytes) -> None:
    try:
        kind, pid = parse_probe(data)
    except ValueError as e:
        assert str(e)
    else:
        assert kind in (PROBE, ACK) and len(pid) == 16 and encode_probe(kind, pid) == data


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.paused = 0
        self.lost = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def pause_writing(self) -> None:
        self.paused += 1
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def _punch_pair(node: DhtNode, nat_a: str, nat_b: str, sockets: int = 256):
    servers = [node.address]
    a = UdpPuncher(servers, nat_a, initiator=True, peer_nat=nat_b, birthday_sockets=sockets)
    offer = await a.prepare()
    b = UdpPuncher(servers, nat_b, initiator=False, punch_id=offer.punch_id, birthday_sockets=sockets)
    answer = await b.prepare(offer)
    tb = asyncio.ensure_future(b.connect(offer, 20))
    ta = await a.connect(answer, 20)
    return a, b, ta, await tb


async def test_loopback_punch_carries_a_stream_both_ways_with_backpressure_and_eof() -> None:
    node = DhtNode(Identity.generate(), dht_config())
    await node.start()
    try:
        a, b, ta, tb = await _punch_pair(node, "cone", "cone")
        assert a.result.remote_type == "listed" and not a.result.birthday and a.result.sockets == 1
        sa, sb = _Sink(), _Sink()
        ta.attach(sa)
        tb.attach(sb)
        payload = hashlib.shake_256(b"punch").digest(6 << 20)
        ta.writelines(payload[i : i + (1 << 20)] for i in range(0, len(payload), 1 << 20))
        assert sa.paused == 1  # 6 MiB at once is over the high-water mark: the writer is paused
        await asyncio.wait_for(sa.writable.wait(), 60)  # and resumed as the peer acknowledges
        ta.write_eof()
        tb.write(b"pong")
        tb.write_eof()
        await asyncio.wait_for(sb.eof.wait(), 120)
        await asyncio.wait_for(sa.eof.wait(), 60)
        assert bytes(sb.data) == payload and bytes(sa.data) == b"pong"
        ta.close()
        await ta.wait_closed()
        await asyncio.wait_for(sb.lost.wait(), 60)  # the peer learns of the close
        tb.close()
    finally:
        await node.stop()


async def test_birthday_side_opens_bounded_sockets_and_keeps_only_the_winner() -> None:
    node = DhtNode(Identity.generate(), dht_config())
    await node.start()
    try:
        before = len(os.listdir("/proc/self/fd"))
        a, b, ta, tb = await _punch_pair(node, "symmetric", "cone", sockets=16)
        assert a.result.birthday and a.result.sockets == 16 and b.result.birthday
        assert len(os.listdir("/proc/self/fd")) - before <= 4  # 15 losers closed; 2 UDX sockets remain
        sa, sb = _Sink(), _Sink()
        ta.attach(sa)
        tb.attach(sb)
        tb.write(b"hello")
        async with asyncio.timeout(60):  # the callee (UDX responder) may speak first
            while bytes(sa.data) != b"hello":
                await asyncio.sleep(0.01)
        # a stray datagram at the UDX socket from anyone else is ignored, not a crash
        stray, _ = await udppunch.udp_socket("127.0.0.1")
        stray.sendto(b"\x55" + os.urandom(1300), ta.get_extra_info("sockname"))
        stray.close()
        ta.write(b"still")
        async with asyncio.timeout(60):
            while bytes(sb.data) != b"still":
                await asyncio.sleep(0.01)
        ta.abort()
        tb.abort()
    finally:
        await node.stop()


async def test_two_symmetric_sides_are_refused_before_any_probe() -> None:
    node = DhtNode(Identity.generate(), dht_config())
    await node.start()
    try:
        a = UdpPuncher([node.address], "symmetric", initiator=True, peer_nat="symmetric", birthday_sockets=4)
        offer = await a.prepare()
        assert a.result.sockets == 1  # no birthday sockets against another symmetric NAT
        with pytest.raises(SwarmdError) as ei:
            await a.connect(offer, 1)
        assert ei.value.code == ERR_UNAVAILABLE and "symmetric" in ei.value.message
    finally:
        await node.stop()


def test_path_info_reports_attempts() -> None:
    info = PathInfo("relayed", 0.05, [PathAttempt("direct", False, 2.0, "timed out"), PathAttempt("relayed", True, 0.04)])
    d = info.to_dict()
    assert d["path"] == "relayed" and d["setup_ms"] == 50.0
    assert d["attempts"][0] == {"path": "direct", "ok": False, "ms": 2000.0, "error": "timed out"}


async def test_registry_prefers_a_better_path_over_the_dialler_rule() -> None:
    srv_id, cli_id = Identity.generate(), Identity.generate()
    srv = RpcServer(srv_id, Methods())
    await srv.start()
    try:
        first = await connect(cli_id, "127.0.0.1", srv.port, remote_public_key=srv_id.public_key)
        second = await connect(cli_id, "127.0.0.1", srv.port, remote_public_key=srv_id.public_key)
        second.conn.path_rank = 0  # as the traversal marks a relayed connection
        reg = ConnectionRegistry(cli_id.public_key)
        assert reg.add(first) is first
        assert reg.add(second) is first  # newer, same dialler, but relayed: the direct one stays
        assert second.is_closed or second.conn.error is not None
        third = await connect(cli_id, "127.0.0.1", srv.port, remote_public_key=srv_id.public_key)
        first.conn.path_rank = 0
        assert reg.add(third) is third  # a better path replaces a relayed one
        await third.close()
    finally:
        await srv.stop()
