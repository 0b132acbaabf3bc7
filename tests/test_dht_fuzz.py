"""Property tests: no datagram a peer can send breaks a DHT node's socket or
raises out of its handler, whether random bytes or well-framed RPCs with
arguments of any type."""

from __future__ import annotations

import asyncio

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.dht.node import DhtNode
from swarmd.dht.routing import parse_contacts
from swarmd.node.identity import Identity
from tests.dht_testnet import dht_config

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.floats(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
methods = st.sampled_from(
    ["ping", "find_node", "topic_get", "topic_put", "topic_del", "store", "find_value", "stun", "x"]
)


def _run(check) -> None:  # noqa: ANN001
    loop = asyncio.new_event_loop()
    try:
        node = DhtNode(Identity.generate(), dht_config())
        loop.run_until_complete(node.listen(0, "127.0.0.1"))
        check(loop, node)
        loop.run_until_complete(node.stop())
    finally:
        loop.close()


def _feed(loop: asyncio.AbstractEventLoop, node: DhtNode, data: bytes) -> None:
    node.protocol.datagram_received(data, ("127.0.0.1", 9))
    loop.run_until_complete(asyncio.sleep(0))
    assert not node.transport.is_closing()


def test_random_datagrams() -> None:
    def check(loop: asyncio.AbstractEventLoop, node: DhtNode) -> None:
        @settings(max_examples=250, deadline=None)
        @given(st.binary(max_size=300))
        def one(data: bytes) -> None:
            _feed(loop, node, data)

        one()

    _run(check)


def test_framed_requests_with_arbitrary_arguments() -> None:
    def check(loop: asyncio.AbstractEventLoop, node: DhtNode) -> None:
        @settings(max_examples=250, deadline=None)
        @given(st.sampled_from([b"\x00", b"\x01"]), methods, st.lists(values, max_size=5))
        def one(kind: bytes, method: str, args: list) -> None:
            _feed(loop, node, kind + b"\x05" * 20 + msgpack.packb([method, args], use_bin_type=True))

        one()

    _run(check)


@settings(max_examples=300, deadline=None)
@given(values)
def test_parse_contacts_only_returns_well_typed_contacts(raw: object) -> None:
    out = parse_contacts(raw, 20)
    assert out is None or all(
        len(n.id) == 20 and isinstance(n.port, int) and isinstance(n.ip, str) for n in out
    )
