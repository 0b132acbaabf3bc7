"""In-process testnets of real UDP DHT nodes on 127.0.0.1 (one event loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from swarmd.dht.config import DhtConfig
from swarmd.dht.node import DhtNode
from swarmd.dht.records import PeerRecord, make_record
from swarmd.node.identity import Identity


def dht_config(**kw: object) -> DhtConfig:
    # request_timeout 1 s, not 0.5: every node of a testnet shares one event loop, so on a loaded
    # machine replies queue; a timed-out request evicts the contact and lookups then miss nodes.
    # The DHT test files take the same time either way (dead nodes are rare and queried in parallel).
    base = DhtConfig(host="127.0.0.1", port=0, request_timeout=1.0, per_source_rate=1e6, per_source_burst=1e6)
    return dataclasses.replace(base, **kw)


class DhtTestnet:
    """A bootstrap node plus n-1 nodes that joined through it."""

    def __init__(self) -> None:
        self.nodes: list[DhtNode] = []

    @classmethod
    async def create(cls, n: int, **cfg: object) -> DhtTestnet:
        net = cls()
        first = DhtNode(Identity.generate(), dht_config(**cfg))
        await first.start()
        net.nodes.append(first)
        boot = [first.address]
        rest = [DhtNode(Identity.generate(), dht_config(bootstrap=boot, **cfg)) for _ in range(n - 1)]
        # join in batches: a realistic arrival pattern that still finishes quickly. 10, not 25: one
        # event loop serves every node, and 25 joins crawling at once queued replies past
        # request_timeout on a loaded machine ("no bootstrap node answered"); 10 is also faster
        for i in range(0, len(rest), 10):
            batch = rest[i : i + 10]
            await asyncio.gather(*(node.start() for node in batch))
            net.nodes.extend(batch)
        return net

    def config(self, **cfg: object) -> DhtConfig:
        """The DhtConfig of a node joining this testnet (for swarmd.swarm.stack.open_stack)."""
        return dht_config(bootstrap=[self.nodes[0].address], **cfg)

    async def add(self, identity: Identity | None = None, **cfg: object) -> DhtNode:
        node = DhtNode(identity or Identity.generate(), self.config(**cfg))
        await node.start()
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes))

    async def __aenter__(self) -> DhtTestnet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def record_for(
    identity: Identity, topic: bytes, port: int = 4000, ttl: float = 60.0, seq: int = 1, **payload: object
) -> PeerRecord:
    return make_record(identity, topic, [("127.0.0.1", port)], dict(payload), seq, ttl, time.time())
