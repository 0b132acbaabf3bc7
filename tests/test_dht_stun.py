"""STUN encode/parse (sans-IO), compatibility with aioice, and a DHT node
answering STUN on its own UDP port next to the DHT RPCs."""

from __future__ import annotations

import asyncio

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.dht import stun
from swarmd.dht.node import DhtNode
from swarmd.node.identity import Identity
from tests.dht_testnet import DhtTestnet, dht_config


@pytest.mark.parametrize("addr", [("203.0.113.7", 40000), ("2001:db8::1", 5)])
def test_binding_response_round_trip(addr: tuple[str, int]) -> None:
    tid = stun.new_transaction_id()
    req = stun.encode_binding_request(tid)
    assert stun.looks_like_stun(req)
    assert stun.parse_message(req).msg_type == stun.BINDING_REQUEST
    resp = stun.encode_binding_response(tid, addr)
    msg = stun.parse_message(resp)
    assert msg.msg_type == stun.BINDING_SUCCESS and msg.transaction_id == tid
    assert msg.mapped_address == addr


def test_aioice_reads_our_response_and_we_read_its_request() -> None:
    tid = stun.new_transaction_id()
    theirs = aioice_stun.parse_message(stun.encode_binding_response(tid, ("198.51.100.2", 3478)))
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("198.51.100.2", 3478)
    req = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    req.add_fingerprint()
    ours = stun.parse_message(bytes(req))
    assert ours.msg_type == stun.BINDING_REQUEST and ours.transaction_id == req.transaction_id


def test_corrupted_fingerprint_is_refused() -> None:
    resp = bytearray(stun.encode_binding_response(stun.new_transaction_id(), ("192.0.2.1", 1)))
    resp[-1] ^= 1
    with pytest.raises(ValueError, match="FINGERPRINT"):
        stun.parse_message(bytes(resp))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_parse_message_raises_only_value_error(data: bytes) -> None:
    try:
        msg = stun.parse_message(data)
        _ = msg.mapped_address
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_parse_message_after_a_valid_header(body: bytes) -> None:
    body = body[: len(body) - len(body) % 4]
    head = bytes([0x01, 0x01]) + len(body).to_bytes(2, "big") + stun.COOKIE_BYTES + b"\x00" * 12
    try:
        addr = stun.parse_message(head + body).mapped_address
    except ValueError as e:  # the only error allowed, with a sentence saying why
        assert str(e)
    else:
        assert addr is None or (isinstance(addr[0], str) and 0 <= addr[1] <= 65535)


async def test_dht_node_answers_stun_and_rpc_on_one_port() -> None:
    net = await DhtTestnet.create(2)
    try:
        a, b = net.nodes
        assert await a.stun(b.address) == a.address
        assert await a.ping(b.address) == b.node_id
        assert a.mode == "server" and b.mode == "server"
    finally:
        await net.close()


async def test_aioice_gathers_a_reflexive_candidate_from_a_dht_node() -> None:
    node = DhtNode(Identity.generate(), dht_config())
    await node.start()
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: aioice_stun_client(), local_addr=("127.0.0.1", 0)
        )
        try:
            req = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
            transport.sendto(bytes(req), node.address)
            resp = await asyncio.wait_for(proto.got, 5.0)
            assert resp.transaction_id == req.transaction_id
            assert resp.attributes["XOR-MAPPED-ADDRESS"] == transport.get_extra_info("sockname")[:2]
        finally:
            transport.close()
    finally:
        await node.stop()


class aioice_stun_client(asyncio.DatagramProtocol):  # noqa: N801
    def __init__(self) -> None:
        self.got: asyncio.Future = asyncio.get_event_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.got.done():
            self.got.set_result(aioice_stun.parse_message(data))


def test_other_address_names_the_alternate_port() -> None:
    tid = stun.new_transaction_id()
    msg = stun.parse_message(stun.encode_binding_response(tid, ("198.51.100.2", 3478), other_port=4001))
    assert msg.mapped_address == ("198.51.100.2", 3478) and msg.other_port == 4001
    assert stun.parse_message(stun.encode_binding_response(tid, ("198.51.100.2", 1))).other_port is None
    with pytest.raises(ValueError, match="alternate port"):
        stun.encode_binding_response(tid, ("198.51.100.2", 1), other_port=70000)
    # aioice still reads the answer (unknown comprehension-optional attribute)
    assert aioice_stun.parse_message(stun.encode_binding_response(tid, ("198.51.100.2", 9), 4001))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=40))
def test_other_address_from_hostile_bytes(value: bytes) -> None:
    tid = b"\x00" * 12
    body = stun._pack_attrs([(stun.ATTR_OTHER_ADDRESS, value)])
    head = bytes([0x01, 0x01]) + len(body).to_bytes(2, "big") + stun.COOKIE_BYTES + tid
    try:
        port = stun.parse_message(head + body).other_port
    except ValueError as e:
        assert str(e)
    else:
        assert port is None or 0 < port <= 65535


async def test_dht_node_answers_stun_on_its_alternate_port_too() -> None:
    net = await DhtTestnet.create(2)
    try:
        a, b = net.nodes
        assert await a.stun(b.address) == a.address
        alt = a.stun_alternate(b.address)
        assert alt is not None and alt[0] == b.address[0] and alt[1] not in (b.address[1], 0)
        assert await a.stun(alt) == a.address  # answered from the second port
        assert a.stun_alternate(alt) is None  # the second port names no further port
    finally:
        await net.close()
