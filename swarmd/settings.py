"""The node's full configuration schema: one section per part.

Each part defines its own section dataclass next to its code; this module only
composes them, so `[store]` in a config file is `StoreConfig`, and so on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from swarmd.dht.config import DhtConfig
from swarmd.errors import ConfigError
from swarmd.gateway.config import GatewayConfig
from swarmd.net.nat import NatConfig
from swarmd.net.relay import RelayConfig
from swarmd.node.address import parse_hostport
from swarmd.node.tracing import TracingConfig
from swarmd.node.trust import TrustConfig
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.roles.base import ROLE_ORDER
from swarmd.rpc.config import AccessConfig, RpcConfig
from swarmd.services.ork import OrkConfig
from swarmd.services.things import ThingsConfig
from swarmd.store.config import StoreConfig
from swarmd.swarm.config import SwarmConfig
from swarmd.worker.config import WorkerConfig


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "swarmd"


@dataclass
class NodeConfig:
    """[node]: what every role needs: where to listen, where to keep state, whom to join."""

    roles: list[str] = field(default_factory=list)  # roles this node plays (--role); empty: DHT + RPC only
    host: str = "127.0.0.1"  # RPC/TCP listen address; 0.0.0.0 to serve other boxes
    port: int = 0  # RPC/TCP port; 0 picks a free one (printed in the ready line)
    dht_port: int = 0  # UDP port of the DHT node (and its STUN responder)
    data_dir: Path = field(default_factory=default_data_dir)  # identity key, stores, databases, status.json
    bootstrap: list[str] = field(default_factory=list)  # HOST:PORT of DHT nodes; none = first node
    http: str | None = None  # gateway HOST:PORT
    metrics: str | None = None  # HOST:PORT serving Prometheus metrics of every role on /metrics; none = off
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"  # lowest level logged
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, JSON otherwise
    stop_timeout: float = 15.0  # bound on a graceful stop (drain included)
    # seconds a starting daemon keeps retrying (with backoff) bootstrap nodes that do not
    # answer before it exits 1; inf (the default): wait until one answers, logging each try
    bootstrap_wait: float = math.inf
    swarm_secret: str | None = None  # hex; topics become HMACs of names, making a private swarm
    # auto (default): uvloop when importable (a dependency on Linux; ~2x faster loopback RPC round
    # trips, less gateway CPU per request); uvloop: insist on it; asyncio: the standard loop
    # (swarmd/node/eventloop.py)
    event_loop: Literal["asyncio", "uvloop", "auto"] = "auto"


@dataclass
class Settings:
    node: NodeConfig = field(default_factory=NodeConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    dht: DhtConfig = field(default_factory=DhtConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    things: ThingsConfig = field(default_factory=ThingsConfig)
    ork: OrkConfig = field(default_factory=OrkConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def validate(self) -> None:
        for section in vars(self).values():
            check = getattr(section, "validate", None)
            if callable(check):
                check()
        for role in self.node.roles:
            if role not in ROLE_ORDER:
                raise ConfigError(f"unknown role {role!r}; expected some of: {', '.join(ROLE_ORDER)}")
        ConfigError.refuse_if(self.node, "node", "bootstrap_wait", lambda v: not v >= 0, "be >= 0 seconds (or inf)")
        ConfigError.refuse_if(self.node, "node", "port dht_port", lambda v: not 0 <= v <= 65535, "be between 0 and 65535")
        for addr in self.node.bootstrap:
            parse_hostport(addr, what="node.bootstrap entry")
        if self.node.http is not None:
            parse_hostport(self.node.http, what="node.http", listen=True)
        if self.node.metrics is not None:
            parse_hostport(self.node.metrics, what="node.metrics", listen=True)
        if self.gateway.grpc:
            parse_hostport(self.gateway.grpc, what="gateway.grpc", listen=True)
        if self.node.swarm_secret is not None:
            try:
                bytes.fromhex(self.node.swarm_secret)
            except ValueError:
                raise ConfigError("node.swarm_secret must be hex") from None


def parse_peer(text: str, *, what: str) -> tuple[bytes, str, int]:
    """'HEXKEY@HOST:PORT' -> (key, host, port): a peer named with the key it must prove."""
    from swarmd.node.identity import parse_public_key

    key, sep, addr = text.partition("@")
    if not sep:
        raise ConfigError(f"{what} {text!r} must look like HEXKEY@HOST:PORT")
    return (parse_public_key(key, f"{what} key"), *parse_hostport(addr, what=f"{what} address"))
