"""swarmd_rpc: the client library for a swarmd swarm.

    import asyncio, swarmd_rpc

    async def main():
        peer = await swarmd_rpc.connect("127.0.0.1", 7000, public_key=bytes.fromhex("..."))
        print(await peer.call("ping"))
        await peer.close()

    asyncio.run(main())

Works without a daemon of its own: an ephemeral identity is made when none is given.
"""

from __future__ import annotations

from swarmd.errors import SwarmdError
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcConfig, RpcPeer, Stream
from swarmd.rpc import connect as _connect
from swarmd_rpc.pool import Pool, PoolConfig, Target, fan_out

__all__ = [
    "Identity",
    "Methods",
    "Pool",
    "PoolConfig",
    "RpcPeer",
    "Stream",
    "SwarmdError",
    "Target",
    "connect",
    "fan_out",
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
    pk = bytes.fromhex(public_key) if isinstance(public_key, str) else public_key
    return await _connect(
        identity, host, port, remote_public_key=pk, methods=methods, timeout=timeout, config=config
    )
