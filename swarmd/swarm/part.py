"""The network stack as a node part: started after the RPC server, before the roles
(which join their topics through ctx.swarm). Built by the one factory, open_stack."""

from __future__ import annotations

import dataclasses
from typing import Any

from swarmd.dht.part import dht_config_from
from swarmd.net.nat import NatConfig
from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.stack import Stack, open_stack


def swarm_config_from(settings: Any) -> SwarmConfig:
    base = getattr(settings, "swarm", None)
    cfg = dataclasses.replace(base) if isinstance(base, SwarmConfig) else SwarmConfig()
    secret = getattr(settings.node, "swarm_secret", None)
    if secret:
        cfg.secret = bytes.fromhex(secret)
    return cfg


class StackPart:
    """Fills ctx.dht, ctx.ports["dht"] and ctx.swarm (with its NAT traversal) over
    ctx.rpc_server; serves swarm.status and the traversal's nat.* methods."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.stack: Stack | None = None

    async def start(self) -> None:
        ctx = self.ctx
        self.stack = await open_stack(
            ctx.identity,
            dht_config_from(ctx.settings),
            swarm_config=swarm_config_from(ctx.settings),
            server=ctx.rpc_server,
            trust=getattr(ctx, "trust", None),
            tasks=getattr(ctx, "tasks", None),
            nat=getattr(ctx.settings, "nat", None) or NatConfig(),
            serve_status=True,
        )
        ctx.dht = self.stack.dht
        ctx.ports["dht"] = self.stack.dht.address[1]
        ctx.swarm = self.stack.swarm

    async def stop(self) -> None:
        if self.stack is not None:
            await self.stack.stop()
