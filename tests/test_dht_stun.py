"""STUN encode/parse (sans-IO), RFC 5389 test vectors, and a DHT node answering
STUN on its own UDP port next to the DHT RPCs (and on its alternate port)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.dht import stun
from tests.dht_testnet import DhtTestnet


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


def test_rfc5769_sample_response_parses() -> None:
    """RFC 5769 2.2's XOR-MAPPED-ADDRESS (192.0.2.1:32853), as another STUN implementation encodes it."""
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    body = stun._pack_attrs([(stun.ATTR_XOR_MAPPED_ADDRESS, bytes.fromhex("0001a147e112a643"))])
    msg = stun.parse_message(bytes.fromhex("0101") + len(body).to_bytes(2, "big") + stun.COOKIE_BYTES + tid + body)
    assert msg.mapped_address == ("192.0.2.1", 32853)


def test_a_plain_rfc5389_request_with_fingerprint_is_understood() -> None:
    tid = stun.new_transaction_id()
    ours = stun.parse_message(stun.encode_binding_request(tid, fingerprint=True))
    assert ours.msg_type == stun.BINDING_REQUEST and ours.transaction_id == tid


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
    async with await DhtTestnet.create(2) as net:
        a, b = net.nodes
        assert await a.stun(b.address) == a.address
        assert await a.ping(b.address) == b.node_id
        assert a.mode == "server" and b.mode == "server"


def test_other_address_names_the_alternate_port() -> None:
    tid = stun.new_transaction_id()
    msg = stun.parse_message(stun.encode_binding_response(tid, ("198.51.100.2", 3478), other_port=4001))
    assert msg.mapped_address == ("198.51.100.2", 3478) and msg.other_port == 4001
    assert stun.parse_message(stun.encode_binding_response(tid, ("198.51.100.2", 1))).other_port is None
    with pytest.raises(ValueError, match="alternate port"):
        stun.encode_binding_response(tid, ("198.51.100.2", 1), other_port=70000)


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
    async with await DhtTestnet.create(2) as net:
        a, b = net.nodes
        assert await a.stun(b.address) == a.address
        alt = a.stun_alternate(b.address)
        assert alt is not None and alt[0] == b.address[0] and alt[1] not in (b.address[1], 0)
        assert await a.stun(alt) == a.address  # answered from the second port
        assert a.stun_alternate(alt) is None  # the second port names no further port
