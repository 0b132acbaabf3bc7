"""RpcServer: listen on TCP, run the handshake, serve every peer independently.

Each accepted pipe gets its own SecureConnection + RpcPeer at once, so a slow
or hostile peer (stuck handshake, garbage, a peer that stops reading) only
ever affects its own connection: the handshake has a timeout, every buffer is
bounded, protocol errors close that connection alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loguru import logger

from swarmd.errors import ERR_CLOSED, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.connection import SecureConnection
from swarmd.net.tcp import listen
from swarmd.node.identity import Identity
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.methods import Firewall, Methods
from swarmd.rpc.peer import RpcPeer


class RpcServer:
    """Serves `methods` to every peer that completes a handshake."""

    def __init__(
        self,
        identity: Identity,
        methods: Methods,
        host: str = "127.0.0.1",
        port: int = 0,
        firewall: Firewall | None = None,
        config: RpcConfig | None = None,
        on_peer: Callable[[RpcPeer], None] | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.identity = identity
        self.instance_id = instance_id  # what getInstanceId answers: the node's persistent id
        self.methods = methods
        self.host = host
        self.port = port
        self.firewall = firewall
        self.config = config or RpcConfig()
        self.on_peer = on_peer  # called once a peer's handshake is done (the swarm layer dedupes here)
        self.peers: set[RpcPeer] = set()
        # set by an owner that admits peers asynchronously (the swarm's firewall callback): a new
        # peer's calls wait until the owner calls peer.release() (or closes it)
        self.hold_new_peers = False
        self._server: asyncio.Server | None = None
        self._log = logger.bind(component="rpc-server")

    async def start(self) -> None:
        try:
            self._server = await listen(
                self.identity, self.host, self.port, self._accept, config=self.config.net
            )
        except OSError as e:
            raise SwarmdError(
                ERR_UNAVAILABLE, f"cannot listen on {self.host}:{self.port}: {e.strerror or e}"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._log.bind(host=self.host, port=self.port).info("rpc server listening")

    def _accept(self, conn: SecureConnection) -> None:
        if len(self.peers) >= self.config.max_connections:
            conn.refuse(f"server full: {len(self.peers)} connections open")
            return
        peer = RpcPeer(
            conn, self.methods, firewall=self.firewall, config=self.config, instance_id=self.instance_id
        )
        if self.hold_new_peers:
            peer.hold()
        self.peers.add(peer)
        prev_close = conn.on_close

        def on_close(err: SwarmdError) -> None:
            self.peers.discard(peer)
            if prev_close is not None:
                prev_close(err)

        conn.on_close = on_close
        if self.on_peer is not None:
            on_peer = self.on_peer

            def on_established(fut: asyncio.Future[None]) -> None:
                if not fut.cancelled() and fut.exception() is None and not conn.is_closed:
                    on_peer(peer)

            conn.established.add_done_callback(on_established)

    async def stop(self) -> None:
        """Stop accepting, close every connection and wait for handlers to stop."""
        if self._server is not None:
            self._server.close()
        peers = list(self.peers)
        for p in peers:
            p.conn.close(SwarmdError(ERR_CLOSED, "server stopping"))
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
