"""The DHT settings of a node: the daemon's stack (swarmd.swarm.stack) starts the node.

Settings read: ``node.host`` (bind address), ``node.dht_port``,
``node.bootstrap`` (HOST:PORT strings; none = first node of a new swarm) and,
when the integrator composes one, a ``dht`` section (DhtConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from swarmd.dht.config import DhtConfig
from swarmd.errors import ConfigError
from swarmd.node.address import parse_address, parse_hostport


def dht_config_from(settings: Any) -> DhtConfig:
    """DhtConfig for a node's settings: the [dht] section overlaid with [node] flags."""
    base = getattr(settings, "dht", None)
    cfg = dataclasses.replace(base) if isinstance(base, DhtConfig) else DhtConfig()
    node = settings.node
    cfg.host = node.host
    cfg.port = node.dht_port
    cfg.bootstrap = [
        parse_hostport(b, what="node.bootstrap entry")
        if isinstance(b, str)
        else parse_address(b, "node.bootstrap entry", error=ConfigError)
        for b in node.bootstrap
    ]
    cfg.bootstrap_wait = getattr(node, "bootstrap_wait", cfg.bootstrap_wait)
    return cfg
