"""The swarm as a node part: started after the RPC server and the DHT,
before the roles (which join their topics through ctx.swarm)."""

from __future__ import annotations

import dataclasses
from typing import Any

from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.swarm import Swarm


def swarm_config_from(settings: Any) -> SwarmConfig:
    base = getattr(settings, "swarm", None)
    cfg = dataclasses.replace(base) if isinstance(base, SwarmConfig) else SwarmConfig()
    secret = getattr(settings.node, "swarm_secret", None)
    if secret:
        cfg.secret = bytes.fromhex(secret)
    return cfg


class SwarmPart:
    """Fills ctx.swarm; needs ctx.rpc_server and ctx.dht. Serves swarm.status."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.swarm: Swarm | None = None

    async def start(self) -> None:
        ctx = self.ctx
        self.swarm = Swarm(
            ctx.identity, ctx.dht, ctx.rpc_server, swarm_config_from(ctx.settings),
            trust=getattr(ctx, "trust", None), tasks=getattr(ctx, "tasks", None),
        )
        self.swarm.register_methods()
        await self.swarm.start()
        ctx.swarm = self.swarm

    async def stop(self) -> None:
        if self.swarm is not None:
            await self.swarm.stop()
