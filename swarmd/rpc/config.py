"""Settings of the RPC layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmd.net.config import NetConfig


@dataclass
class RpcConfig:
    """Timeouts and limits of RPC over one connection."""

    default_timeout: float = 30.0  # every call has one; override per call
    stream_timeout: float = 3600.0  # default for a whole stream call (blobs take a while)
    connect_timeout: float = 10.0  # TCP connect + handshake
    max_in_flight: int = 1024  # concurrent requests a peer may have us run; beyond: ERR_OVERLOADED
    max_connections: int = 4096  # a server refuses handshakes beyond this many open connections
    net: NetConfig = field(default_factory=NetConfig)
