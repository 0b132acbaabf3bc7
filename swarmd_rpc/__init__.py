"""swarmd_rpc: the client library for a swarmd swarm. No daemon needed on this box.

    import numpy as np
    from swarmd_rpc import SyncClient

    with SyncClient(bootstrap=["10.0.0.1:7000"]) as swarm:
        out = swarm.infer("digits", {"input": np.zeros((1, 64), np.float32)})
        print(out["label"])

The async twin is `Client` (`async with Client(bootstrap=[...]) as c: await c.infer(...)`).
`Client.for_peer(public_key, host, port)` talks to one peer with no DHT. Errors are
one class per stable code (NotFound, Overloaded, Timeout, ...), all SwarmdError.
Lower-level pieces: `connect()` opens one RPC channel, `Pool` pools them.
"""

from __future__ import annotations

from swarmd.errors import SwarmdError
from swarmd.node.identity import Identity, parse_public_key
from swarmd.rpc import Methods, RpcConfig, RpcPeer, Stream
from swarmd.rpc import connect as _connect
from swarmd_rpc.client import Client, ClientConfig, Inference, Models, PeerAddress
from swarmd_rpc.errors import (
    BadRequest,
    Cancelled,
    ClientError,
    Closed,
    Conflict,
    Corrupt,
    Forbidden,
    HandshakeFailed,
    InternalError,
    InvalidModel,
    NotFound,
    NotReady,
    Overloaded,
    ProtocolError,
    RateLimited,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownMethod,
    translate,
)
from swarmd_rpc.pool import Pool, PoolConfig, Target, fan_out
from swarmd_rpc.sync import SyncClient, SyncModels

__all__ = [
    "BadRequest",
    "Cancelled",
    "Client",
    "ClientConfig",
    "ClientError",
    "Closed",
    "Conflict",
    "Corrupt",
    "Forbidden",
    "HandshakeFailed",
    "Identity",
    "Inference",
    "InternalError",
    "InvalidModel",
    "Methods",
    "Models",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PeerAddress",
    "Pool",
    "PoolConfig",
    "ProtocolError",
    "RateLimited",
    "RpcPeer",
    "Stream",
    "SwarmdError",
    "SyncClient",
    "SyncModels",
    "Target",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "UnknownMethod",
    "connect",
    "fan_out",
    "quiet_logs",
    "translate",
]


async def connect(
    host: str,
    port: int,
    public_key: bytes | str | None = None,
    identity: Identity | None = None,
    *,
    methods: Methods | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - part of the API
    config: RpcConfig | None = None,
) -> RpcPeer:
    """Connect to one peer; `public_key` (bytes or hex) pins who must answer (IK), None accepts anyone (XX)."""
    pk = None if public_key is None else parse_public_key(public_key)
    return await _connect(
        identity, host, port, remote_public_key=pk, methods=methods, timeout=timeout, config=config
    )


def quiet_logs(level: str = "WARNING") -> None:
    """Show swarmd's log events at `level` or above on stderr, as text.

    The library is silent by default (loguru's `logger.disable("swarmd")` convention): call this,
    or `loguru.logger.enable("swarmd")` with your own sinks, to see its events. Kept under its old
    name, from when the library printed everything unless told otherwise."""
    from swarmd.node.logging import setup_logging

    setup_logging(level, "text")
