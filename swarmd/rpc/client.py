"""Dial a peer and get an RpcPeer."""

from __future__ import annotations

from swarmd.net.connection import SecureConnection
from swarmd.net.tcp import dial
from swarmd.node.identity import Identity
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.methods import Firewall, Methods
from swarmd.rpc.peer import RpcPeer


async def connect(
    identity: Identity | None,
    host: str,
    port: int,
    *,
    remote_public_key: bytes | None = None,
    methods: Methods | None = None,
    firewall: Firewall | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - part of the API
    config: RpcConfig | None = None,
) -> RpcPeer:
    """Dial host:port over TCP and complete the handshake (IK if remote_public_key is given, else XX).

    `identity=None` uses a fresh ephemeral key; `methods` are what this side
    serves back to the peer on the same connection.
    """
    cfg = config or RpcConfig()
    ident = identity or Identity.generate()
    holder: list[RpcPeer] = []

    def setup(conn: SecureConnection) -> None:
        holder.append(RpcPeer(conn, methods, firewall=firewall, config=cfg))

    await dial(
        ident, host, port, remote_public_key=remote_public_key, config=cfg.net, timeout=timeout, setup=setup
    )
    return holder[0]
