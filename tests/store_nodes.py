"""Real store nodes for tests: a StoreRole on an RpcServer on 127.0.0.1, no daemon around it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmd.node.identity import Identity
from swarmd.node.supervisor import Supervisor
from swarmd.roles.store import StoreRole
from swarmd.rpc import Methods, RpcServer
from swarmd.settings import Settings
from swarmd.store.config import StoreConfig
from tests.conftest import node_context


@dataclass
class Node:
    role: StoreRole
    server: RpcServer
    ident: Identity
    tasks: Supervisor
    swarm: Any = None
    dht: Any = None

    @property
    def key(self) -> str:
        return self.ident.public_hex

    @property
    def addr(self) -> str:
        return f"{self.key}@127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        """Stop like a node does: role, then swarm, RPC server and DHT (idempotent)."""
        await self.role.stop()
        await self.tasks.close()
        if self.swarm is not None:
            await self.swarm.stop()
            self.swarm = None
        await self.server.stop()
        if self.dht is not None:
            await self.dht.stop()
            self.dht = None


async def start_swarm_store(net: Any, data_dir: Path, trust_of: Any = None, **cfg: Any) -> Node:
    """A store on the swarm: its own DHT node in testnet `net`, a Swarm, an RpcServer.

    trust_of(identity) -> swarmd.node.trust.Trust gives the node a trust model (the
    daemon's firewall and role-filtered lookups); without it the swarm is open."""
    from swarmd.rpc.config import AccessConfig
    from swarmd.rpc.part import firewall_from
    from swarmd.swarm import SwarmConfig
    from swarmd.swarm.stack import open_stack

    ident = Identity.generate()
    trust = trust_of(ident) if trust_of is not None else None
    firewall = None if trust is None else firewall_from(AccessConfig(), ident.public_key, trust)
    stack = await open_stack(
        ident, net.config(), firewall=firewall, trust=trust,
        swarm_config=SwarmConfig(relookup_interval=0.3, reconnect_initial=0.05, connect_timeout=3.0, lookup_timeout=3.0),
    )
    server, swarm, dht = stack.server, stack.swarm, stack.dht
    return await start_store(data_dir, ident, server=server, swarm=swarm, dht=dht, trust=trust, **cfg)


async def start_store(data_dir: Path, ident: Identity | None = None, port: int = 0, *, server: Any = None,
                      swarm: Any = None, dht: Any = None, trust: Any = None,
                      role_class: type[StoreRole] = StoreRole, **cfg: Any) -> Node:
    ident = ident or Identity.generate()
    settings = Settings()
    settings.trust.open = True  # an open swarm, asked for
    settings.store = StoreConfig(**cfg)
    crashes: list[BaseException] = []
    tasks = Supervisor(on_crash=lambda name, exc: crashes.append(exc))
    if server is None:
        server = RpcServer(ident, Methods(), port=port)
        await server.start()
    ctx = node_context(data_dir, "store", settings=settings, identity=ident, tasks=tasks, methods=server.methods,
                       swarm=swarm, dht=dht, rpc_server=server, trust=trust)
    role = role_class(ctx)
    await role.start()
    return Node(role, server, ident, tasks, swarm, dht)

