"""The DHT as a node part: the daemon starts it before the swarm and roles.

Settings read: ``node.host`` (bind address), ``node.dht_port``,
``node.bootstrap`` (HOST:PORT strings; none = first node of a new swarm) and,
when the integrator composes one, a ``dht`` section (DhtConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from swarmd.dht.config import DhtConfig
from swarmd.dht.node import DhtNode
from swarmd.errors import ConfigError


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"bootstrap entry {text!r} must look like HOST:PORT")
    return host, int(port)


def dht_config_from(settings: Any) -> DhtConfig:
    """DhtConfig for a node's settings: the [dht] section overlaid with [node] flags."""
    base = getattr(settings, "dht", None)
    cfg = dataclasses.replace(base) if isinstance(base, DhtConfig) else DhtConfig()
    node = settings.node
    cfg.host = node.host
    cfg.port = node.dht_port
    cfg.bootstrap = [_hostport(b) if isinstance(b, str) else tuple(b) for b in node.bootstrap]
    cfg.bootstrap_wait = getattr(node, "bootstrap_wait", cfg.bootstrap_wait)
    return cfg


class DhtPart:
    """Fills ctx.dht and ctx.ports["dht"]; stops the node on stop()."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.node: DhtNode | None = None

    async def start(self) -> None:
        tasks = getattr(self.ctx, "tasks", None)  # the node's Supervisor (absent in bare test contexts)
        self.node = DhtNode(self.ctx.identity, dht_config_from(self.ctx.settings), tasks=tasks)
        await self.node.start()
        self.ctx.dht = self.node
        self.ctx.ports["dht"] = self.node.address[1]

    async def stop(self) -> None:
        if self.node is not None:
            await self.node.stop()
