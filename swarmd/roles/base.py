"""The contract between the node and its roles.

A role is a thin piece of glue: on start it registers its RPC methods on
`ctx.methods`, joins its topics through `ctx.swarm` and spawns its loops on
`ctx.tasks`; on stop it drains, withdraws its announcements and returns.
The node starts roles in ROLE_ORDER and stops them in reverse.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from swarmd.errors import ConfigError
from swarmd.node.identity import Identity
from swarmd.node.metrics import NodeMetrics
from swarmd.node.supervisor import Supervisor

if TYPE_CHECKING:  # the upper layers are composed by the daemon, not imported here
    from swarmd.settings import Settings

# Start order: providers before consumers (stores before the workers that fetch
# from them, workers before the orchestrators and gateways that route to them).
ROLE_ORDER: tuple[str, ...] = ("bootstrap", "relay", "store", "worker", "orchestrator", "gateway")


@dataclass
class NodeContext:
    identity: Identity
    settings: Settings
    data_dir: Path
    instance_id: str
    roles: tuple[str, ...]
    tasks: Supervisor
    methods: Any = None  # swarmd.rpc.Methods: what this node serves to peers
    swarm: Any = None  # swarmd.swarm.Swarm: topics, lookups, connections
    dht: Any = None  # swarmd.dht node
    rpc_server: Any = None  # swarmd.rpc.RpcServer
    trust: Any = None  # swarmd.node.trust.Trust: which keys this node admits to which role
    ports: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    metrics: NodeMetrics = field(default_factory=NodeMetrics)  # collectors; served when node.metrics is set
    _roles: dict[str, Role] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """Who this node is, as `node.info` answers it: roles, version, uptime and NAT type
        (what the gateway's dashboard shows for every node)."""
        from swarmd import __version__

        traversal = getattr(self.swarm, "traversal", None)
        report = getattr(traversal, "report", None)
        return {
            "public_key": self.identity.public_hex,
            "roles": list(self.roles),
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "nat": getattr(report, "nat_type", None) if traversal is not None else "public",
        }

    def role(self, name: str) -> Role | None:
        """A co-located role instance (same process), or None."""
        return self._roles.get(name)

    def trusts(self, key: bytes, role: str, record: Any = None, *, replica: bool = False) -> bool:
        """May peer `key` act as `role` toward this node: be fetched from, be replicated with?

        The one place roles ask before they take data from a peer they found on the DHT
        (`record`: its record there, which may carry role grants). Two checks, both must
        pass: the swarm's role grants (ctx.trust, when the node has one and it is not
        open), and the node's own [access] lists: with lists, a replica (replica=True:
        it writes into our catalog) must be in access.allow, any other data source in
        one of the lists; with no lists, every key passes this second check.
        """
        if key == self.identity.public_key:
            return True
        trust = getattr(self, "trust", None)
        if trust is not None and not getattr(trust, "is_open", False):
            admitted = trust.admits_record(record, role) if record is not None else trust.admits(key, role)
            if not admitted:
                return False
        fw = getattr(self.rpc_server, "firewall", None)
        if fw is None or fw.open or key in fw.allow:
            return True
        return not replica and key in fw.allow_read_only

def check_can_listen(host: str, port: int, *, udp: bool = False, what: str = "cannot listen on ") -> None:
    """Raise ConfigError when host:port cannot be bound now (taken, or no such address).

    A start-up check, run before anything with side effects (a key created, a
    record announced): the part that binds for real comes later and may still
    lose a race, but the common case -- another process holds the port -- fails
    at once with one line. Port 0 (any free port) always passes.
    """
    if port == 0:
        return
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host or None, port, type=kind, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ConfigError(f"{what}{host}:{port}: the address does not resolve: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, kind) as s:
        if not udp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
        try:
            s.bind(sockaddr)
            if not udp:
                s.listen(1)
        except OSError as e:
            raise ConfigError(f"{what}{host}:{port}: {e.strerror or e}") from None


class Role:
    """Base class for roles; subclasses set `name` and override start/stop."""

    name: ClassVar[str] = ""

    @classmethod
    def preflight(cls, settings: Settings, data_dir: Path) -> None:
        """Checks that can fail, run before the node creates keys or announces
        anything: raise ConfigError with one line (a port taken, a file missing).
        Must have no side effects."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._scope: Supervisor | None = None

    @property
    def tasks(self) -> Supervisor:
        """This role's scope of the node's Supervisor ("role:NAME"): its loops, whose crash stops
        the node. The daemon closes it after the role's stop()."""
        if self._scope is None:
            self._scope = self.ctx.tasks.scope(f"role:{self.name}")
        return self._scope

    async def close_tasks(self, timeout: float = 5.0) -> None:
        """Cancel and await (at most `timeout` seconds) whatever still runs in this role's scope."""
        if self._scope is not None:
            await self._scope.close(timeout)

    async def start(self) -> None:
        """Register methods, join topics, spawn loops. Return when serving."""

    async def stop(self) -> None:
        """Drain accepted work, withdraw announcements. Bounded in time."""

    def status(self) -> dict[str, Any]:
        """A small JSON-able summary for status.json and status RPCs."""
        return {}

    def metrics(self) -> Iterable[Any]:
        """Prometheus metric families (prometheus_client.core) read at scrape time."""
        return ()
