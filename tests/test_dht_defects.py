"""Each kademlia 2.2.3 / rpcudp defect DESIGN.md lists, reproduced against the
unpatched classes (strict xfail: the test must fail there) and passing on ours."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random

import msgpack
import pytest
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import ForgetfulStorage
from loguru import logger

from swarmd.dht.node import DhtNode
from swarmd.dht.protocol import SwarmdProtocol
from swarmd.dht.routing import SwarmdRoutingTable
from swarmd.node.identity import Identity
from tests.dht_testnet import DhtTestnet, dht_config

UNPATCHED = pytest.mark.xfail(strict=True, reason="defect of the unpatched kademlia class")


class PingSink:
    """The routing table's view of a protocol: pings of full-bucket heads go nowhere."""

    def __init__(self) -> None:
        self.pinged: list[Node] = []

    async def call_ping(self, node: Node) -> tuple[bool, None]:
        self.pinged.append(node)
        return (False, None)

    def spawn(self, coro):  # noqa: ANN001, ANN201
        return asyncio.ensure_future(coro)


def _rid(rng: random.Random) -> bytes:
    return rng.getrandbits(160).to_bytes(20, "big")


@pytest.mark.parametrize("table_cls", [SwarmdRoutingTable, pytest.param(RoutingTable, marks=UNPATCHED)])
async def test_find_neighbors_returns_the_k_closest_at_300_contacts(table_cls: type) -> None:
    rng = random.Random(7)
    table = table_cls(PingSink(), 20, Node(_rid(rng)))
    for _ in range(300):
        table.add_contact(Node(_rid(rng), "127.0.0.1", rng.randint(1024, 65535)))
    await asyncio.sleep(0)
    everyone = [n for b in table.buckets for n in b.nodes.values()]
    assert len(everyone) >= 100
    for _ in range(50):
        target = Node(_rid(rng))
        got = table.find_neighbors(target, k=20)
        want = sorted(everyone, key=target.distance_to)[:20]
        assert [n.id for n in got] == [n.id for n in want]


async def _protocol(cls: type, node: Node):  # noqa: ANN202
    loop = asyncio.get_running_loop()
    if cls is SwarmdProtocol:
        factory = lambda: SwarmdProtocol(node, dht_config())  # noqa: E731
    else:
        factory = lambda: KademliaProtocol(node, ForgetfulStorage(), 20)  # noqa: E731
    _, proto = await loop.create_datagram_endpoint(factory, local_addr=("127.0.0.1", 0))
    return proto


@pytest.mark.parametrize("proto_cls", [SwarmdProtocol, pytest.param(KademliaProtocol, marks=UNPATCHED)])
async def test_hand_off_uses_the_stored_key_not_its_hash(proto_cls: type) -> None:
    key = hashlib.sha1(b"some key").digest()
    k = int.from_bytes(key, "big")
    near_a = Node((k ^ (1 << 40)).to_bytes(20, "big"), "127.0.0.1", 1)
    proto = await _protocol(proto_cls, near_a)
    try:
        # C sits right next to the double-hashed key and far from the real key
        c_id = (int.from_bytes(hashlib.sha1(key).digest(), "big") ^ 1).to_bytes(20, "big")
        proto.router.add_contact(Node(c_id, "127.0.0.1", 2))
        proto.storage[key] = b"value"
        calls: list[tuple[Node, bytes]] = []

        async def record_store(node: Node, k_: bytes, value: object) -> tuple[bool, bool]:
            calls.append((node, k_))
            return (True, True)

        proto.call_store = record_store
        newcomer = Node((k ^ (1 << 3)).to_bytes(20, "big"), "127.0.0.1", 3)
        proto.welcome_if_new(newcomer)
        await asyncio.sleep(0.01)
        assert [(n.id, k_) for n, k_ in calls] == [(newcomer.id, key)]
    finally:
        proto.transport.close()


class HostileResponder(asyncio.DatagramProtocol):
    """Answers ping with an id and find_node with whatever contacts it is given."""

    def __init__(self, contacts: object) -> None:
        self.contacts = contacts
        self.node_id = b"\x42" * 20

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != b"\x00":
            return
        name, _args = msgpack.unpackb(data[21:])
        reply = self.node_id if name == "ping" else self.contacts
        self.transport.sendto(b"\x01" + data[1:21] + msgpack.packb(reply), addr)


async def _is_alive(addr: tuple[str, int]) -> bool:
    """A fresh socket pings the node and gets an answer."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, _addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=addr)
    try:
        for _ in range(10):  # retransmit like any UDP client; up to 10 s: a loaded loop may answer late
            transport.sendto(b"\x00" + b"\x07" * 20 + msgpack.packb(["ping", [b"\x09" * 20]]))
            try:
                await asyncio.wait_for(asyncio.shield(got), 1.0)
                return True
            except TimeoutError:
                continue
        return False
    finally:
        transport.close()


async def _victim(cls: type):  # noqa: ANN202
    if cls is DhtNode:
        victim = DhtNode(Identity.generate(), dht_config(request_timeout=0.3))
        await victim.listen(0, "127.0.0.1")
    else:
        victim = Server()
        await victim.listen(0, "127.0.0.1")
        victim.protocol._wait_timeout = 0.3
    return victim


def _addr(server: Server) -> tuple[str, int]:
    return server.transport.get_extra_info("sockname")[:2]


async def _stop(server: Server) -> None:
    if isinstance(server, DhtNode):
        await server.stop()
    else:
        server.stop()


@pytest.mark.parametrize("victim_cls", [DhtNode, pytest.param(Server, marks=UNPATCHED)])
async def test_find_node_reply_with_ip_none_does_not_close_the_socket(victim_cls: type) -> None:
    loop = asyncio.get_running_loop()
    evil_t, evil = await loop.create_datagram_endpoint(
        lambda: HostileResponder([[b"\x43" * 20, None, 9999]]), local_addr=("127.0.0.1", 0)
    )
    victim = await _victim(victim_cls)
    try:
        await victim.bootstrap([evil_t.get_extra_info("sockname")[:2]])
        assert not victim.transport.is_closing()
        assert await _is_alive(_addr(victim))
    finally:
        await _stop(victim)
        evil_t.close()


@pytest.mark.parametrize("victim_cls", [DhtNode, pytest.param(Server, marks=UNPATCHED)])
async def test_garbage_datagrams_produce_no_traceback(victim_cls: type) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING")
    victim = await _victim(victim_cls)
    try:
        sender, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=_addr(victim))
        for i in range(100):
            sender.sendto(b"\x00" + bytes([i]) * 20 + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
        sender.sendto(b"\x00" + b"\x01" * 20 + msgpack.packb({"not": "a request"}))
        assert await _is_alive(_addr(victim))
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()
        sender.close()
        assert errors == []
        assert len(lines) <= 3  # one rate-limited line per kind of rejection
    finally:
        logger.remove(sink)
        loop.set_exception_handler(old)
        await _stop(victim)


@pytest.mark.parametrize("client_cls", [DhtNode, pytest.param(Server, marks=UNPATCHED)])
async def test_set_reports_failure_when_every_store_timed_out(client_cls: type) -> None:
    # our nodes do not serve kademlia's value `store`: every store times out
    async with await DhtTestnet.create(3) as net:
        if client_cls is DhtNode:
            client = DhtNode(
                Identity.generate(), dht_config(request_timeout=0.3, bootstrap=[net.nodes[0].address])
            )
            await client.start()
        else:
            client = Server()
            await client.listen(0, "127.0.0.1")
            client.protocol._wait_timeout = 0.3
            await client.bootstrap([net.nodes[0].address])
        try:
            assert await client.set("key", "value") is False
        finally:
            await _stop(client)


async def test_pickle_state_is_refused(tmp_path) -> None:  # noqa: ANN001
    from swarmd.errors import SwarmdError

    node = DhtNode(Identity.generate(), dht_config())
    await node.listen(0, "127.0.0.1")
    try:
        with pytest.raises(SwarmdError):
            node.save_state(str(tmp_path / "state"))
        with pytest.raises(SwarmdError):
            await DhtNode.load_state(str(tmp_path / "state"), 0)
        assert not (tmp_path / "state").exists()
    finally:
        await node.stop()
