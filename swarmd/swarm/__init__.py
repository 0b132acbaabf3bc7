"""swarmd.swarm: join topics, find peers, keep authenticated connections to them.

swarm = Swarm(identity, dht, methods_or_rpc_server, SwarmConfig())
await swarm.join("swarmd/workers", payload={"state": "ONLINE"})
await swarm.flush()
result = await swarm.request_topic("swarmd/workers", "echo", b"hi")
"""

from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.swarm import ConnectionEvent, ConnectionEvents, Firewall, Swarm

__all__ = ["ConnectionEvent", "ConnectionEvents", "Firewall", "Swarm", "SwarmConfig"]
