"""One IP cannot fill a node's routing table, nor a lookup's k closest, with made-up ids (ids are claimed, not proven)."""

from __future__ import annotations

import asyncio
import os

from kademlia.node import Node

from swarmd.dht.protocol import SwarmdProtocol
from swarmd.dht.routing import Shortlist
from tests.dht_testnet import dht_config


async def _protocol(**cfg: object) -> SwarmdProtocol:
    loop = asyncio.get_running_loop()
    config = dht_config()
    for k, v in cfg.items():
        setattr(config, k, v)
    _, proto = await loop.create_datagram_endpoint(
        lambda: SwarmdProtocol(Node(os.urandom(20), "127.0.0.1", 0), config), local_addr=("127.0.0.1", 0))
    return proto


def _ips(proto: SwarmdProtocol) -> list[str]:
    return [n.ip for n in proto.router.all_contacts()]


async def test_one_ip_gets_at_most_max_contacts_per_ip_entries() -> None:
    proto = await _protocol(max_contacts_per_ip=8)
    try:
        # the handlers as rpcudp calls them for datagrams from one host rotating source ports and ids
        # (fewer than k, so no bucket fills and nothing is sent to these addresses)
        for port in range(1000, 1019):
            proto.rpc_ping(("198.18.0.7", port), os.urandom(20))
        assert _ips(proto).count("198.18.0.7") == 8
        assert proto.router.ip_capped == 11
        # a known contact is still refreshed, another IP still gets its own slots
        known = proto.router.all_contacts()[0]
        proto.rpc_ping((known.ip, known.port), known.id)
        for port in range(1000, 1004):
            proto.rpc_ping(("198.18.0.8", port), os.urandom(20))
        assert _ips(proto).count("198.18.0.8") == 4
        # loopback is exempt: a box runs many local nodes
        for port in range(2000, 2012):
            proto.rpc_ping(("127.0.0.1", port), os.urandom(20))
        assert _ips(proto).count("127.0.0.1") == 12
    finally:
        proto.transport.close()


def test_a_lookup_holds_at_most_max_contacts_per_ip_of_one_address_near_its_target() -> None:
    """The routing table's cap is per table; a lookup merges the replies of many nodes, each of
    which may hold up to 8 ids of one address. The walk's shortlist caps each address the same
    way, so the k closest a lookup asks (and an announcer stores on) always include k - 8 ids of
    other addresses: one address alone can never make up the neighbourhood of a topic."""
    target = Node(os.urandom(20))

    def sybils() -> list[Node]:  # made-up ids, all nearer the target than any honest node
        return [Node(target.id[:18] + bytes([i, 0]), "198.18.0.7", 1000 + i) for i in range(40)]

    honest = [Node(os.urandom(20), f"198.18.1.{i}", 4000) for i in range(1, 31)]
    capped = Shortlist(target, 20, per_ip=8)
    capped.push(sybils())  # as several honest nodes' replies would list them
    capped.push(honest)
    ips = [n.ip for n in capped]
    assert ips.count("198.18.0.7") == 8 and len(ips) == 20
    assert capped.ip_capped == 32
    assert sum(1 for n in capped.get_uncontacted() if n.ip != "198.18.0.7") == 12
    # a place freed by a departed sybil goes to whoever is next, not to another id of that address
    capped.remove([n.id for n in capped if n.ip == "198.18.0.7"][:1])
    capped.push(sybils())
    assert [n.ip for n in capped].count("198.18.0.7") == 8
    # without the cap that one address takes every place
    uncapped = Shortlist(target, 20)
    uncapped.push(sybils())
    uncapped.push(honest)
    assert all(n.ip == "198.18.0.7" for n in uncapped)


async def test_a_record_is_found_while_one_of_its_holders_does_not_withhold_it() -> None:
    """docs/dht.md "Known limits", claim 2: a position near a topic buys only the chance to withhold,
    and a lookup takes the union of what the k closest answer, so hiding a record takes every holder."""
    import time

    from swarmd.dht.records import topic_from_name, topic_target
    from swarmd.node.identity import Identity
    from tests.dht_testnet import DhtTestnet, record_for

    async with await DhtTestnet.create(30) as net:
        announcer = Identity.generate()
        topic = topic_from_name("swarmd/workers")
        res = await net.nodes[3].announce(record_for(announcer, topic, port=5555))
        assert res.ok
        now = time.time()
        # the honest holder is the one closest to the topic: under load an announce may also have
        # stored on a node past the k closest (a closer one timed out), which no lookup must reach
        target = Node(topic_target(topic))
        holders = sorted(
            (n for n in net.nodes if n.protocol.records.get(topic, now)), key=lambda n: n.node.distance_to(target)
        )
        assert len(holders) >= 2

        def withhold(node: object) -> None:  # answers every question, never with a record
            node.protocol.records.get = lambda *a, **kw: []  # type: ignore[attr-defined]

        for n in holders[1:]:
            withhold(n)
        askers = [n for n in net.nodes if n not in holders][:5]
        for asker in askers:
            recs = await asker.lookup_all(topic, 10)
            assert [r.public_key for r in recs] == [announcer.public_key]
        withhold(holders[0])  # the last honest holder turns: now, and only now, the record is hidden
        assert await askers[0].lookup_all(topic, 10) == []
