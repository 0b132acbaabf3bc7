"""The one factory of the network stack: RPC server, DHT node, Swarm and NAT traversal.

The daemon (`swarm.part.StackPart`), the client library (`swarmd_rpc.Client`)
and the tests build the stack here, so the start order and the unwinding of a
failed start are written once: the RPC server first (records advertise its
port), then the DHT node, the swarm over both, and traversal last (it needs
the swarm). `Stack.stop()` stops them in reverse.

    stack = await open_stack(identity, DhtConfig(bootstrap=[("10.0.0.1", 49737)]))
    await stack.swarm.join("topic")
    await stack.stop()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarmd.dht.config import DhtConfig
from swarmd.dht.node import DhtNode
from swarmd.net.nat import NatConfig
from swarmd.node.identity import Identity
from swarmd.node.supervisor import Supervisor
from swarmd.node.trust import Trust
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.methods import Firewall, Methods
from swarmd.rpc.server import RpcServer
from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.swarm import Swarm


@dataclass
class Stack:
    """A started stack. `own_server`: the server was made by open_stack and stops with the stack."""

    identity: Identity
    server: RpcServer
    dht: DhtNode
    swarm: Swarm
    traversal: Any = None  # swarmd.swarm.traversal.Traversal, when NAT traversal was asked for
    own_server: bool = True

    async def stop(self) -> None:
        """Stop every part, the last started first; each is stopped even when another fails,
        and the first failure is raised after."""
        steps = [
            self.traversal.stop if self.traversal is not None else None,
            self.swarm.stop,
            self.server.stop if self.own_server else None,
            self.dht.stop,
        ]
        first: BaseException | None = None
        for step in steps:
            if step is None:
                continue
            try:
                await step()
            except Exception as e:
                first = first or e
        if first is not None:
            raise first


async def open_stack(
    identity: Identity,
    dht_config: DhtConfig,
    *,
    swarm_config: SwarmConfig | None = None,
    server: RpcServer | None = None,
    methods: Methods | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    firewall: Firewall | None = None,
    rpc_config: RpcConfig | None = None,
    dht_identity: Identity | None = None,
    trust: Trust | None = None,
    tasks: Supervisor | None = None,
    nat: NatConfig | bool | None = None,
    serve_status: bool = False,
) -> Stack:
    """Start the stack of a node (or a client) with this identity.

    `server`: an RPC server already started (the daemon's, with its firewall and
    node methods); it is not stopped with the stack. Otherwise one is made from
    `methods`, `host`, `port`, `firewall` and `rpc_config`. `dht_identity`: the
    DHT node's own key (a client's throwaway one); default `identity`. `nat`: a
    NatConfig, or True for the defaults, runs NAT traversal (hole punching,
    relays). `serve_status`: serve `swarm.status`. What started is stopped again
    when a later part fails to start.
    """
    own_server = server is None
    if server is None:
        server = RpcServer(identity, methods or Methods(), host=host, port=port, firewall=firewall, config=rpc_config)
        await server.start()
    started: list[Any] = [server.stop] if own_server else []
    try:
        dht = DhtNode(dht_identity or identity, dht_config, tasks=tasks)
        await dht.start()
        started.append(dht.stop)
        swarm = Swarm(identity, dht, server, swarm_config, trust=trust, tasks=tasks)
        if serve_status:
            swarm.register_methods()
        await swarm.start()
        started.append(swarm.stop)
        traversal = None
        if nat:
            from swarmd.swarm.traversal import Traversal  # aioice & co: only when asked for

            traversal = Traversal(swarm, nat if isinstance(nat, NatConfig) else NatConfig())
            await traversal.start()
    except BaseException:
        for stop in reversed(started):
            try:
                await stop()
            except Exception:  # unwinding: the start's own error is the one to report
                pass
        raise
    return Stack(identity, server, dht, swarm, traversal, own_server)


__all__ = ["Stack", "open_stack"]
