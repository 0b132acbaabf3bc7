"""The RPC server as a node part: the first network part to start, so the DHT
and swarm can advertise its port and roles can register methods on it."""

from __future__ import annotations

import time
from typing import Any

from loguru import logger

from swarmd.errors import ConfigError
from swarmd.node.trust import Trust, TrustConfig
from swarmd.rpc.config import AccessConfig, RpcConfig
from swarmd.rpc.methods import Firewall, Methods
from swarmd.rpc.server import RpcServer

GRANT_EXPIRY_WARNING = 7 * 86400.0  # seconds before a grant expires that start-up warns about it


def firewall_from(access: AccessConfig, own_key: bytes, trust: Trust | None = None) -> Firewall:
    if not access.allow and not access.allow_read_only:
        fw = Firewall.open_to_all()
        fw.trust = trust
        return fw
    try:
        fw = Firewall.from_keys(access.allow, access.allow_read_only)
    except ValueError:
        raise ConfigError(
            "access.allow and access.allow_read_only must hold 64-hex-digit public keys"
        ) from None
    fw.allow.add(own_key)  # a node may always call itself (local tools, co-located roles)
    fw.trust = trust
    return fw


class RpcPart:
    """Fills ctx.trust, ctx.methods, ctx.rpc_server and ctx.ports["rpc"].

    ctx.trust (swarmd.node.trust.Trust) is built here, the first network part,
    so a node running a role with no trust model configured fails at start.
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.server: RpcServer | None = None

    async def start(self) -> None:
        ctx = self.ctx
        settings = ctx.settings
        rpc_cfg = getattr(settings, "rpc", None) or RpcConfig()
        access = getattr(settings, "access", None) or AccessConfig()
        ctx.trust = Trust.from_config(
            getattr(settings, "trust", None) or TrustConfig(), ctx.identity.public_key, ctx.roles
        )
        summary = ctx.trust.summary()
        logger.bind(event="trust", **summary).info("trust model: {}", summary["trust"])
        soon = [g for g in ctx.trust.own_grants if g.expires - time.time() < GRANT_EXPIRY_WARNING]
        if soon:
            logger.bind(event="grant_expiring", expires=summary.get("grants_expire")).warning(
                "a grant of this node expires within a week: renew it with `swarmd grant` and restart"
            )
        ctx.methods = Methods()
        self.server = RpcServer(
            ctx.identity,
            ctx.methods,
            host=settings.node.host,
            port=settings.node.port,
            firewall=firewall_from(access, ctx.identity.public_key, ctx.trust),
            config=rpc_cfg,
            instance_id=ctx.instance_id,
        )
        await self.server.start()

        async def node_tasks(call: Any, params: Any) -> Any:
            """The node's Supervisor tree: every scope's name, crash policy and running tasks."""
            return ctx.tasks.describe()

        ctx.methods.register("node.tasks", node_tasks, op="r")
        ctx.rpc_server = self.server
        ctx.ports["rpc"] = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
