"""swarmd.dht: Kademlia discovery (on the kademlia package) with signed,
expiring, multi-value topic records and STUN on the same UDP port.

    dht = DhtNode(identity, DhtConfig(bootstrap=[("10.0.0.1", 49737)]))
    await dht.start()
    await dht.announce(make_record(identity, topic_from_name("x"), [("10.0.0.2", 7000)], {}, 1, 1200, time.time()))
    async for record in dht.lookup(topic_from_name("x")): ...
"""

from swarmd.dht.config import DhtConfig
from swarmd.dht.node import AnnounceResult, DhtNode, node_id_for
from swarmd.dht.records import PeerRecord, RecordError, Unannounce, make_record, topic_from_name

__all__ = [
    "AnnounceResult",
    "DhtConfig",
    "DhtNode",
    "PeerRecord",
    "RecordError",
    "Unannounce",
    "make_record",
    "node_id_for",
    "topic_from_name",
]
