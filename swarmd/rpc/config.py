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
    max_backlog_bytes: int = 16 << 20  # requests held while the peer does not read our answers
    max_connections: int = 4096  # a server refuses handshakes beyond this many open connections
    net: NetConfig = field(default_factory=NetConfig)


@dataclass
class AccessConfig:
    """[access]: who may call this node's methods, by Ed25519 public key (hex).

    With both lists empty the node is open to every peer that completes a
    Noise handshake (a private swarm is then made with node.swarm_secret).
    As soon as either list names a key, everyone else is refused; keys in
    allow_read_only may call only methods registered with op "r". Addresses
    never grant anything.
    """

    allow: list[str] = field(default_factory=list)  # keys that may call every method
    allow_read_only: list[str] = field(default_factory=list)  # keys that may call read (op "r") methods only
