"""Live connections keyed by the remote public key, one per peer.

When two peers dial each other at the same moment each ends up with two
connections. Both sides keep the same one by a rule they compute alike: the
connection *dialled by the smaller public key* wins (comparing the 32-byte keys
as unsigned big-endian integers, i.e. bytewise). When both connections were
dialled by the same side (a reconnect), only that dialler decides: it keeps the
newer one and closes the older; the acceptor simply follows the closes.
"""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from swarmd.errors import ERR_CLOSED, SwarmdError
from swarmd.rpc.peer import RpcPeer


def dialler_key(local_public_key: bytes, peer: RpcPeer) -> bytes:
    """Public key of the side that dialled this connection."""
    return local_public_key if peer.conn.initiator else peer.remote_public_key


def path_rank(peer: RpcPeer) -> int:
    """Higher is better: a connection through a relay (rank 0, set by the NAT
    traversal layer as conn.path_rank) yields to a direct or punched one (1)."""
    return int(getattr(peer.conn, "path_rank", 1))


def keep_first(local_public_key: bytes, a: RpcPeer, b: RpcPeer) -> bool:
    """True when a should be kept over b (a is the one registered first).

    A better path wins first (both sides know each connection's path), so a
    relayed connection is replaced when a punched one to the same peer appears."""
    ra, rb = path_rank(a), path_rank(b)
    if ra != rb:
        return ra > rb
    da, db = dialler_key(local_public_key, a), dialler_key(local_public_key, b)
    if da != db:
        return da < db
    return False  # same dialler: the newer connection replaces the older


class ConnectionRegistry:
    """The swarm layer's table of connections; `add` dedupes, closed peers drop out."""

    def __init__(
        self, local_public_key: bytes, on_replaced: Callable[[RpcPeer, RpcPeer], None] | None = None
    ) -> None:
        self.local_public_key = local_public_key
        self._peers: dict[bytes, RpcPeer] = {}
        self.on_replaced = on_replaced  # (loser, winner)

    def get(self, public_key: bytes) -> RpcPeer | None:
        p = self._peers.get(public_key)
        if p is not None and p.is_closed:
            del self._peers[public_key]
            return None
        return p

    def __len__(self) -> int:
        return len(self._peers)

    def peers(self) -> list[RpcPeer]:
        return [p for p in self._peers.values() if not p.is_closed]

    def add(self, peer: RpcPeer) -> RpcPeer:
        """Register an established peer; returns the connection kept for that key."""
        key = peer.remote_public_key
        current = self.get(key)
        if current is None or current is peer:
            self._track(key, peer)
            return peer
        if keep_first(self.local_public_key, current, peer):
            winner, loser = current, peer
        else:
            winner, loser = peer, current
        same_dialler = dialler_key(self.local_public_key, current) == dialler_key(self.local_public_key, peer)
        self._track(key, winner)
        if not same_dialler or peer.conn.initiator:
            logger.bind(component="registry", peer=key.hex()[:16]).debug("closing duplicate connection")
            loser.conn.close(
                SwarmdError(ERR_CLOSED, "duplicate connection: keeping the one dialled by the smaller key")
            )
        if self.on_replaced is not None and winner is not current:
            self.on_replaced(loser, winner)
        return winner

    def remove(self, key: bytes, peer: RpcPeer) -> None:
        """Stop handing out `peer` for key (the caller closes it when it is done with it)."""
        if self._peers.get(key) is peer:
            del self._peers[key]

    def _track(self, key: bytes, peer: RpcPeer) -> None:
        self._peers[key] = peer

        def forget(_fut: object) -> None:
            if self._peers.get(key) is peer:
                del self._peers[key]

        peer.conn.closed.add_done_callback(forget)

    async def close(self) -> None:
        peers = list(self._peers.values())
        self._peers.clear()
        for p in peers:
            await p.close()
