"""One IP cannot fill a node's routing table with made-up ids (ids are claimed, not proven)."""

from __future__ import annotations

import asyncio
import os

from kademlia.node import Node

from swarmd.dht.protocol import SwarmdProtocol
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
