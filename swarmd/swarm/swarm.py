"""The Swarm: topics in, authenticated RPC connections out.

``join`` announces us under a topic and/or looks the topic up and connects to
the peers found; ``connect``/``request`` reach a peer by public key (direct
TCP to the addresses in its signed record, Noise-authenticated against that
key); topic-addressed requests pick a peer announcing the topic and
re-resolve on failure. Connections are pooled and deduplicated with a rule
both sides compute the same way: of two connections between A and B, the one
dialled by the lower public key survives.

The three ideas live in their own modules, joined here with the state they
share and the lifecycle: `membership.Membership` (topics), `pool.Pool`
(connections) and `calls.Calls` (requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

from swarmd.dht.node import DhtNode
from swarmd.dht.records import PeerRecord
from swarmd.node.deadline import within
from swarmd.node.identity import Identity
from swarmd.node.supervisor import LOG, Supervisor
from swarmd.node.trust import Trust
from swarmd.rpc import CallContext, Methods, RpcPeer, RpcServer
from swarmd.rpc.local import LocalPeer
from swarmd.rpc.registry import ConnectionRegistry
from swarmd.swarm.calls import Calls
from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.membership import Joined, Membership
from swarmd.swarm.paths import PathMetrics, path_of
from swarmd.swarm.pool import ConnectionEvent, ConnectionEvents, Firewall, Pool
from swarmd.topics import ROLE_TOPICS, peer_topic


class Swarm(Membership, Pool, Calls):
    """Topic membership and a pool of peer connections for one node."""

    def __init__(
        self,
        identity: Identity,
        dht: DhtNode,
        rpc: RpcServer | Methods,
        config: SwarmConfig | None = None,
        *,
        firewall: Firewall | None = None,
        on_connection: Callable[[ConnectionEvent], None] | None = None,
        tasks: Supervisor | None = None,
        trust: Trust | None = None,
    ) -> None:
        """`tasks`: the node's Supervisor; the swarm's tasks (topic loops, dials, reconnects)
        run in a "swarm" scope of it whose failures are logged, not fatal."""
        self.identity = identity
        self.public_key = identity.public_key
        self.dht = dht
        self.config = config or SwarmConfig()
        if isinstance(rpc, RpcServer):
            self.server: RpcServer = rpc
            self._own_server = False
        else:
            self.server = RpcServer(identity, rpc)
            self._own_server = True
        self.methods: Methods = self.server.methods
        # Who may be which role (swarmd.node.trust): lookups of a role's topic yield
        # only admitted announcers, and our records carry our grants. Default: the
        # RPC server's (the node's), else an open swarm (library use, tests).
        fw_trust = getattr(self.server.firewall, "trust", None)
        self.trust: Trust = trust or fw_trust or Trust.open_swarm(self.public_key)
        # topic hash -> role its announcers must hold, for the well-known role topics given
        # as hashes; a joined topic keeps its role in Joined (names from requests never land here)
        self._topic_roles: dict[bytes, str] = {self.topic(name): role for name, role in ROLE_TOPICS.items()}
        self._refused: set[bytes] = set()  # keys whose records a role lookup ignored (logged once)
        self.firewall = firewall
        self.on_connection = on_connection
        self._registry = ConnectionRegistry(self.public_key)  # dedupes: dialled-by-smaller-key wins
        self.path_metrics = PathMetrics()  # connections by path, upgrades (swarm.traversal counts the rest)
        self.traversal: Any = (
            None  # swarmd.swarm.traversal.Traversal: punched/relayed paths when direct fails
        )
        self.mapped_addresses: list[tuple[str, int]] = []  # ports our router forwards to us (swarm/mapping.py)
        self._dialing: dict[bytes, asyncio.Future[RpcPeer]] = {}
        self._topics: dict[bytes, Joined] = {}
        self._seen: dict[bytes, dict[bytes, PeerRecord]] = {}  # topic -> pk -> newest record seen
        self._reconnecting: set[bytes] = set()
        self._subscribers: list[asyncio.Queue[ConnectionEvent]] = []
        self.tasks = tasks.scope("swarm", LOG) if tasks is not None else Supervisor(name="swarm", policy=LOG)
        self._started = False
        self._closing = False
        self._prev_on_peer: Callable[[RpcPeer], None] | None = None
        self._local: LocalPeer | None = None
        self._log = logger.bind(component="swarm", node=identity.public_hex[:16])

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the RPC server we own (if any) and take inbound connections."""
        if self._started:
            return
        self._started = True
        prev = self.server.on_peer

        def on_peer(peer: RpcPeer) -> None:
            if prev is not None:
                prev(peer)
            if self.firewall is None:
                self._admit(peer)  # at once: the peer is in the table before it is served
            else:
                self._spawn(self._admit_inbound(peer), "swarm-admit")

        self.server.on_peer = on_peer
        self._prev_on_peer = prev
        if self.firewall is not None:
            self.server.hold_new_peers = True  # no call is dispatched before the firewall answers
        if self._own_server:
            await self.server.start()
        if self.config.announce_self:
            await self.join(peer_topic(self.identity.public_hex), announce=True, lookup=False)

    async def stop(self) -> None:
        """Withdraw announcements, close connections, cancel every task."""
        self._closing = True
        if self._started:
            self.server.on_peer = self._prev_on_peer  # a shared server stops feeding us peers
            if self.firewall is not None:
                self.server.hold_new_peers = False
        leaves = [within(self.leave(t), self.config.leave_timeout) for t in list(self._topics)]
        await asyncio.gather(*leaves, return_exceptions=True)  # best effort: records expire anyway
        await self.tasks.close()
        for fut in self._dialing.values():
            fut.cancel()
        await self._registry.close()
        if self._local is not None:
            await self._local.close()
        if self._own_server:
            await self.server.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """A task of the swarm's scope; None (coro dropped) once the swarm is stopping."""
        try:
            return self.tasks.spawn(coro, name)
        except RuntimeError:  # the scope is closed: we are stopping, nothing new starts
            return None

    # -- addresses ----------------------------------------------------------------

    def addresses(self) -> list[tuple[str, int]]:
        """What our records advertise: where peers can dial our RPC server (a port our
        router forwards to us first: it is the one that works from outside)."""
        if self.config.announce_addresses:
            return list(self.config.announce_addresses)
        if self.mapped_addresses:
            return list(self.mapped_addresses) + [a for a in self._bound_addresses() if a not in self.mapped_addresses]
        return self._bound_addresses()

    def _bound_addresses(self) -> list[tuple[str, int]]:
        host, port = self.server.host, self.server.port
        if host not in ("0.0.0.0", "", "::"):
            return [(host, port)]
        if self.dht.reflexive_address is not None:
            return [(self.dht.reflexive_address[0], port)]
        contacts = self.dht.contacts()
        if contacts:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
                s.connect((contacts[0][1], contacts[0][2]))
                return [(s.getsockname()[0], port)]
        return [("127.0.0.1", port)]

    # -- introspection ------------------------------------------------------------------

    def register_methods(self, methods: Methods | None = None) -> None:
        """Serve ``swarm.status`` (topics, connections, DHT routing table) to
        peers; ``swarmd peers`` calls it on a running node."""

        async def status(ctx: CallContext, params: Any) -> Any:
            return self.status()

        (methods or self.methods).register("swarm.status", status, op="r")

    def status(self) -> dict[str, Any]:
        """JSON-able view of topics, connections and the DHT routing table."""
        return {
            "public_key": self.identity.public_hex,
            "dht": {
                "address": list(self.dht.address),
                "mode": self.dht.mode,
                "reflexive": list(self.dht.reflexive_address) if self.dht.reflexive_address else None,
                "records_held": len(self.dht.protocol.records),
                "contacts": [[nid.hex(), ip, port] for nid, ip, port in self.dht.contacts()],
            },
            "topics": {
                t.hex(): {"announce": j.announce, "lookup": j.lookup, "seq": j.seq}
                for t, j in self._topics.items()
            },
            **({"nat": self.traversal.status()} if self.traversal is not None else {}),
            "peers": [
                {
                    "public_key": pk.hex(),
                    "inbound": inbound,
                    "path": path_of(peer),
                    "topics": sorted(t.hex() for t in topics),
                }
                for pk, peer, topics, inbound in self.peers()
            ],
        }


__all__ = ["ConnectionEvent", "ConnectionEvents", "Firewall", "Swarm"]
