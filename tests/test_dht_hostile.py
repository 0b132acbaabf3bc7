"""A stranger filling a DHT topic over real UDP: 256 signed records from 4 addresses
filled WORKERS on its holder and kept a new worker out; now a newcomer still gets in."""

from __future__ import annotations

import asyncio
import time

from swarmd.dht.node import DhtNode
from swarmd.dht.records import topic_from_name
from swarmd.node.identity import Identity
from tests.dht_testnet import dht_config, record_for


async def test_four_addresses_cannot_keep_a_new_worker_out_of_a_topic() -> None:
    topic = topic_from_name("swarmd/workers-hostile-test")
    holder = DhtNode(Identity.generate(), dht_config())
    await holder.start()
    boot = [holder.address]
    nodes: list[DhtNode] = [holder]
    try:
        # the hostile announcers: swarmd's own DHT nodes, one per source address, each signing
        # 64 records with keys of its own (no forged signature anywhere)
        flooders = []
        for i in range(4):
            n = DhtNode(Identity.generate(), dht_config(host=f"127.0.0.{2 + i}", bootstrap=boot))
            await n.start()
            nodes.append(n)
            flooders.append(n)
        for n in flooders:
            for _ in range(64):  # one after the other: after the first crawl, each is one put per holder
                await n.announce(record_for(Identity.generate(), topic, ttl=600))
        assert len(holder.protocol.records.get(topic, time.time(), budget=1 << 30)) == 256  # full
        # a new, healthy worker announces from its own address
        worker_key = Identity.generate()
        worker = DhtNode(Identity.generate(), dht_config(host="127.0.0.9", bootstrap=boot))
        await worker.start()
        nodes.append(worker)
        result = await worker.announce(record_for(worker_key, topic, ttl=60))
        assert result.stored >= 1
        # the holder keeps it (lookups union what the holders return)
        held = {r.public_key for r in holder.protocol.records.get(topic, time.time(), budget=1 << 30)}
        assert worker_key.public_key in held and len(held) == 256
        assert holder.protocol.records.evicted >= 1
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
