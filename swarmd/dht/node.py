"""A DHT node: kademlia's Server (bootstrap, bucket refresh, node crawling) on
our fixed protocol, plus topic announce / unannounce / streaming lookup.

Records never go through kademlia's value get/set (one value per key, last
writer wins) nor its pickle ``save_state``; they are the signed multi-value
records of ``swarmd.dht.records``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from kademlia.network import Server
from kademlia.node import Node
from loguru import logger

from swarmd.dht.config import DhtConfig
from swarmd.dht.crawl import NodeCrawl, TopicCrawl
from swarmd.dht.protocol import SwarmdProtocol
from swarmd.dht.records import PeerRecord, RecordError, Unannounce, topic_target
from swarmd.dht.reflexive import AltStunProtocol
from swarmd.dht.routing import valid_id
from swarmd.errors import ERR_BAD_REQUEST, ERR_UNAVAILABLE, SwarmdError
from swarmd.node.identity import Identity
from swarmd.node.supervisor import LOG, Supervisor


def node_id_for(public_key: bytes) -> bytes:
    """A node's 160-bit DHT id, derived from its Ed25519 public key so an id
    names a key rather than being chosen freely."""
    return hashlib.blake2b(public_key, digest_size=20, person=b"swarmd-dht-id").digest()


@dataclass(frozen=True)
class AnnounceResult:
    """How many of the closest nodes accepted the record (local copy counted)."""

    stored: int
    tried: int

    @property
    def ok(self) -> bool:
        return self.stored > 0


class DhtNode(Server):
    """One DHT node on one UDP socket. Start with ``await start()``."""

    protocol: SwarmdProtocol

    def __init__(
        self, identity: Identity, config: DhtConfig | None = None, *, tasks: Supervisor | None = None
    ) -> None:
        """`tasks`: the node's Supervisor; the DHT's loops run in a "dht" scope of it whose
        failures are logged, not fatal."""
        self.tasks = tasks.scope("dht", LOG) if tasks is not None else Supervisor(name="dht", policy=LOG)
        self.config = config or DhtConfig()
        self.config.validate()
        self.identity = identity
        super().__init__(
            ksize=self.config.ksize, alpha=self.config.alpha, node_id=node_id_for(identity.public_key)
        )
        self.reflexive_address: tuple[str, int] | None = None
        self._holders: dict[bytes, tuple[float, list[tuple[Node, bytes]]]] = {}
        self._log = logger.bind(component="dht", node=identity.public_hex[:16])

    # -- lifecycle -----------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        return self.node.id

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) of the UDP socket."""
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def mode(self) -> str:
        """ "server" (holds records, in others' tables) or "client" (unreachable)."""
        return "client" if self.protocol.client_mode else "server"

    def _create_protocol(self) -> SwarmdProtocol:
        return SwarmdProtocol(
            self.node, self.config, {"component": "dht", "node": self.identity.public_hex[:16]}, self.tasks
        )

    async def listen(self, port: int, interface: str = "0.0.0.0") -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport, self.protocol = await loop.create_datagram_endpoint(
                self._create_protocol, local_addr=(interface, port)
            )
        except OSError as e:
            raise SwarmdError(
                ERR_UNAVAILABLE, f"cannot listen for the DHT on UDP {interface}:{port}: {e.strerror or e}"
            ) from None
        sock = self.transport.get_extra_info("socket")
        try:  # a larger receive buffer rides out bursts (the kernel caps it at rmem_max)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        if self.config.stun_alt_port >= 0:
            proto = self.protocol
            try:
                alt, _ = await loop.create_datagram_endpoint(
                    lambda: AltStunProtocol(proto.stun), local_addr=(interface, self.config.stun_alt_port)
                )
            except OSError as e:
                self.transport.close()
                raise SwarmdError(
                    ERR_UNAVAILABLE,
                    f"cannot listen for STUN on UDP {interface}:{self.config.stun_alt_port} "
                    f"(dht.stun_alt_port): {e.strerror or e}",
                ) from None
            proto.stun.alt = alt
            proto.stun.alt_port = alt.get_extra_info("sockname")[1]

    async def start(self) -> None:
        """Bind, bootstrap, learn reachability, start maintenance. Raises
        SwarmdError(ERR_UNAVAILABLE) when bootstrap nodes were given and none answered."""
        cfg = self.config
        await self.listen(cfg.port, cfg.host)
        self.protocol.client_mode = cfg.mode == "client" or (cfg.mode == "auto" and bool(cfg.bootstrap))
        resolved = await self._resolve(cfg.bootstrap) if cfg.bootstrap else []
        addrs = [a for a in resolved if not self._is_self(a)]
        if cfg.bootstrap and resolved and not addrs and len(resolved) == len(cfg.bootstrap):
            # every bootstrap entry is this very node: it is the first node of the swarm
            self.protocol.client_mode = cfg.mode == "client"
        elif cfg.bootstrap:
            try:
                found, addrs = await self._bootstrap_with_retries(addrs)
            except BaseException:
                await self.stop()
                raise
            if cfg.mode == "auto":
                await self._probe_reachability(addrs)
            if not self.protocol.client_mode:
                # re-crawl our own id now that we send it, so the closest nodes add us
                await NodeCrawl(
                    self.protocol, self.node, found or self._nearest(self.node), self.ksize, self.alpha
                ).find()
        self.tasks.spawn(self._maintain(), "dht-maintenance")
        self._log.bind(event="dht_started", port=self.address[1], mode=self.mode).info("dht node started")

    async def _bootstrap_with_retries(
        self, addrs: list[tuple[str, int]]
    ) -> tuple[list[Node], list[tuple[str, int]]]:
        """Bootstrap until a node answers: one round when config.bootstrap_wait is 0, else
        retries with backoff (each logged) until one answers or bootstrap_wait has passed,
        then SwarmdError(ERR_UNAVAILABLE). Names are resolved again on every try."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.bootstrap_wait
        delay = cfg.bootstrap_backoff
        attempt = 1
        names = ", ".join(f"{h}:{p}" for h, p in cfg.bootstrap)
        while True:
            found = await self.bootstrap(addrs) if addrs else []
            if self.protocol.router.all_contacts():
                if attempt > 1:
                    self._log.bind(event="bootstrap_answered", attempt=attempt).info(
                        "bootstrap answered on try {}", attempt
                    )
                return found, addrs
            left = deadline - loop.time()
            if left <= 0:
                raise SwarmdError(ERR_UNAVAILABLE, f"no bootstrap node answered: {names}")
            wait = min(delay, left)
            self._log.bind(event="bootstrap_retry", attempt=attempt, retry_in=round(wait, 2)).warning(
                "no bootstrap node answered ({}) on try {}; trying again in {:.1f}s", names, attempt, wait
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, cfg.bootstrap_backoff_max)
            attempt += 1
            addrs = [a for a in await self._resolve(cfg.bootstrap) if not self._is_self(a)]

    def _is_self(self, addr: tuple[str, int]) -> bool:
        host, port = self.address
        return addr[1] == port and (addr[0] == host or host in ("0.0.0.0", "") or addr[0].startswith("127."))

    async def stop(self) -> None:
        await self.tasks.close()  # the maintenance loop and the protocol's background work
        if self.protocol is not None:
            await self.protocol.aclose()

    async def _resolve(self, addrs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        out = []
        for host, port in addrs:
            try:
                async with asyncio.timeout(5.0):
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except (OSError, TimeoutError):
                continue
            for fam, *_rest, sockaddr in infos:
                if fam == socket.AF_INET:
                    out.append((sockaddr[0], sockaddr[1]))
                    break
        return out

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        """kademlia's bootstrap on our NodeCrawl."""
        gathered = await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))
        nodes = [n for n in gathered if n is not None]
        return await NodeCrawl(self.protocol, self.node, nodes, self.ksize, self.alpha).find()

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        # UDP: a lost datagram or a busy bootstrap node must not fail a start
        for _ in range(3):
            ok, nid = await self.protocol.ping(addr, self.node.id)
            if ok and valid_id(nid):
                return Node(nid, addr[0], addr[1])
        return None

    async def _probe_reachability(self, addrs: list[tuple[str, int]]) -> None:
        """Server mode when a STUN-reflexive address equals the address we are
        bound to on the interface that reaches the peer (no NAT in between)."""
        _, port = self.address
        servers = addrs[:3] or [(n.ip, n.port) for n in self.protocol.router.all_contacts()[:3]]
        results = await asyncio.gather(*(self.protocol.stun.request(a) for a in servers))
        reachable = False
        for server, mapped in zip(servers, results, strict=True):
            if mapped is None:
                continue
            self.reflexive_address = mapped
            if mapped == (self._local_ip_towards(server), port):
                reachable = True
        self.protocol.client_mode = not reachable
        self._log.bind(event="dht_reachability", mode=self.mode, reflexive=str(self.reflexive_address)).info(
            "dht reachability probed"
        )

    def _local_ip_towards(self, server: tuple[str, int]) -> str:
        host = self.address[0]
        if host not in ("0.0.0.0", ""):
            return host
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(server)  # no packet is sent; the kernel picks the route's source address
                return s.getsockname()[0]
            except OSError:
                return ""

    async def _maintain(self) -> None:
        cfg = self.config
        tick = max(0.5, min(30.0, cfg.record_ttl / 4))
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            try:
                self.protocol.records.expire(time.time())
                if time.monotonic() - last_refresh >= cfg.refresh_interval:
                    last_refresh = time.monotonic()
                    for node_id in self.protocol.get_refresh_ids():
                        target = Node(node_id)
                        await NodeCrawl(
                            self.protocol, target, self._nearest(target), self.ksize, self.alpha
                        ).find()
            except Exception as e:  # maintenance must outlive one bad round
                self.protocol.rlog.warn(
                    "maintenance", "dht maintenance round failed", error=f"{type(e).__name__}: {e}"
                )

    def refresh_table(self, interval: int = 3600) -> None:
        """kademlia schedules orphan refresh tasks here; our _maintain owns refresh."""

    def _nearest(self, node: Node) -> list[Node]:
        return self.protocol.router.find_neighbors(node, self.alpha * 2)

    # -- kademlia values (fixed, kept for compatibility; records do not use them)

    async def set_digest(self, dkey: bytes, value: Any) -> bool:
        """kademlia's set, but False unless at least one store was acknowledged."""
        node = Node(dkey)
        nearest = self.protocol.router.find_neighbors(node)
        if not nearest:
            return False
        nodes = await NodeCrawl(self.protocol, node, nearest, self.ksize, self.alpha).find()
        if not nodes:
            return False
        results = await asyncio.gather(*(self.protocol.call_store(n, dkey, value) for n in nodes))
        return any(ok and resp is True for ok, resp in results)

    # kademlia persists state with pickle: loading a file someone else can write
    # runs their code. Refuse; contacts() gives the table for a safe format.
    def save_state(self, fname: str) -> None:
        raise SwarmdError(ERR_BAD_REQUEST, "pickle state is refused; persist contacts() as JSON instead")

    def save_state_regularly(self, fname: str, frequency: int = 600) -> None:
        raise SwarmdError(ERR_BAD_REQUEST, "pickle state is refused; persist contacts() as JSON instead")

    @classmethod
    async def load_state(cls, fname: str, port: int, interface: str = "0.0.0.0") -> DhtNode:
        raise SwarmdError(ERR_BAD_REQUEST, "pickle state is refused; bootstrap from saved contacts instead")

    # -- topics -----------------------------------------------------------------

    def _crawl(self, topic: bytes, best: dict[bytes, int] | None = None) -> TopicCrawl:
        target = Node(topic_target(topic))
        peers = self.protocol.router.find_neighbors(target, self.ksize)
        return TopicCrawl(self.protocol, topic, peers, self.ksize, self.alpha, best)

    async def lookup(
        self, topic: bytes, admit: Callable[[PeerRecord], bool] | None = None
    ) -> AsyncIterator[PeerRecord]:
        """Valid records for topic from this node and the k closest nodes, each as
        soon as it arrives; a peer's record again only when a newer seq turns up, so
        the last one yielded per peer is its newest. `admit` (if given) drops the
        records it refuses (the swarm's trust check on a role's topic)."""
        best: dict[bytes, int] = {}
        for rec in self.protocol.records.get(topic, time.time(), 1 << 30):
            best[rec.public_key] = rec.seq
            if admit is None or admit(rec):
                yield rec
        async with aclosing(self._crawl(topic, best).stream(admit)) as it:
            async for rec in it:
                yield rec

    async def lookup_all(
        self,
        topic: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 (API contract: partial results on timeout)
        admit: Callable[[PeerRecord], bool] | None = None,
    ) -> list[PeerRecord]:
        """Every record a full lookup finds (newest per peer); partial on timeout."""
        newest: dict[bytes, PeerRecord] = {}

        async def run() -> None:
            async with aclosing(self.lookup(topic, admit)) as it:
                async for rec in it:
                    newest[rec.public_key] = rec  # lookup yields a peer again only when newer

        try:
            async with asyncio.timeout(timeout or self.config.lookup_timeout):
                await run()
        except TimeoutError:
            pass
        return list(newest.values())

    async def _closest_holders(self, topic: bytes) -> list[tuple[Node, bytes]]:
        crawl = self._crawl(topic)
        async with aclosing(crawl.stream()) as it:
            async for _ in it:
                pass
        return crawl.closest_with_tokens()

    def _hold_locally(self, topic: bytes, holders: list[tuple[Node, bytes]]) -> bool:
        if self.protocol.client_mode:
            return False
        target = Node(topic_target(topic))
        if len(holders) < self.ksize:
            return True
        return self.node.distance_to(target) < holders[-1][0].distance_to(target)

    async def announce(self, record: PeerRecord) -> AnnounceResult:
        """Store a signed record on the k closest nodes to its topic (get a
        token from each through the lookup RPC, then store with it).

        A re-announce within half a token lifetime reuses the nodes and tokens
        of the previous crawl (live load updates every few seconds cost k
        datagrams, not a crawl); if fewer than half of them accept, it crawls."""
        cached = self._holders.get(record.topic)
        fresh = cached is not None and time.monotonic() - cached[0] < self.config.token_rotation / 2
        if fresh:
            assert cached is not None
            result = await self._put(record, cached[1])
            if result.stored * 2 >= result.tried:
                return result
        holders = await self._closest_holders(record.topic)
        if len(self._holders) >= 1024:  # one entry per topic this node announces; bound it anyway
            self._holders.pop(next(iter(self._holders)))
        self._holders[record.topic] = (time.monotonic(), holders)
        return await self._put(record, holders)

    async def _put(self, record: PeerRecord, holders: list[tuple[Node, bytes]]) -> AnnounceResult:
        wire = record.to_wire()
        results = await asyncio.gather(*(self.protocol.call_topic_put(n, tk, wire) for n, tk in holders))
        stored = sum(1 for r in results if r)
        tried = len(holders)
        if self._hold_locally(record.topic, holders):
            tried += 1
            try:
                self.protocol.records.put(record, "self", time.time())
                stored += 1
            except RecordError as e:
                self._log.bind(code=e.code).warning(f"local store refused own record: {e.message}")
        return AnnounceResult(stored, tried)

    async def unannounce(self, un: Unannounce) -> int:
        """Ask the closest nodes to drop the record; returns how many did."""
        self._holders.pop(un.topic, None)
        holders = await self._closest_holders(un.topic)
        wire = un.to_wire()
        results = await asyncio.gather(*(self.protocol.call_topic_del(n, tk, wire) for n, tk in holders))
        removed = sum(1 for r in results if r)
        if self.protocol.records.remove(un):
            removed += 1
        return removed

    # -- introspection ------------------------------------------------------------

    async def stun(self, address: tuple[str, int], wait: float | None = None) -> tuple[str, int] | None:
        """Our reflexive address as the DHT node at address sees it."""
        return await self.protocol.stun.request(address, wait)

    def stun_alternate(self, address: tuple[str, int]) -> tuple[str, int] | None:
        """The second STUN endpoint the node at address named in its last answer, or None."""
        port = self.protocol.stun.alternates.get((address[0], address[1]))
        return (address[0], port) if port else None

    async def ping(self, address: tuple[str, int]) -> bytes | None:
        ok, nid = await self.protocol.ping(address, self.node.id)
        return nid if ok and valid_id(nid) else None

    def contacts(self) -> list[tuple[bytes, str, int]]:
        """The routing table as (node id, ip, port)."""
        return [(n.id, n.ip, n.port) for n in self.protocol.router.all_contacts()]
