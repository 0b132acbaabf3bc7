"""The Swarm: topics in, authenticated RPC connections out.

``join`` announces us under a topic and/or looks the topic up and connects to
the peers found; ``connect``/``request`` reach a peer by public key (direct
TCP to the addresses in its signed record, Noise-authenticated against that
key); topic-addressed requests pick a peer announcing the topic and
re-resolve on failure. Connections are pooled and deduplicated with a rule
both sides compute the same way: of two connections between A and B, the one
dialled by the lower public key survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from swarmd.dht.node import AnnounceResult, DhtNode
from swarmd.dht.records import PeerRecord, RecordError, Unannounce, make_record, topic_from_name
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_NOT_FOUND,
    ERR_UNAVAILABLE,
    SwarmdError,
    retryable,
)
from swarmd.net.punch import PathAttempt
from swarmd.node.deadline import within
from swarmd.node.identity import Identity
from swarmd.node.supervisor import LOG, Supervisor
from swarmd.node.trust import Trust
from swarmd.rpc import CallContext, Methods, RpcPeer, RpcServer, connect
from swarmd.rpc.local import LocalPeer
from swarmd.rpc.registry import ConnectionRegistry
from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.paths import PATH_RANK, PathMetrics, path_of, path_rank
from swarmd.topics import ROLE_TOPICS, peer_topic, topic_role

Firewall = Callable[[bytes], Awaitable[bool]]  # True admits the peer (by its public key)
RETIRE_QUIET = 1.0  # s without a call in flight or a message either way before a replaced connection closes
RETIRE_MAX = 300.0  # s a replaced connection may keep finishing its calls and streams
RETIRE_ASK = 20.0  # s the dialler waits for the other side to agree to retire a connection


async def _until(cond: Callable[[], bool], deadline: float) -> None:
    """Poll cond (RpcPeer's tables raise no event) until true or the loop time passes deadline."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)


def _busy(peer: RpcPeer) -> bool:
    """Anything in flight on a connection: calls we wait on, streams, handlers running, requests held."""
    return bool(peer._pending or peer._pending_streams or peer._running or peer._backlog)


@dataclass(frozen=True)
class ConnectionEvent:
    """A connection opened or closed. topics: the joined topics under which we
    saw this peer's record (may be empty for an inbound peer we never looked up)."""

    kind: str  # "open" | "close"
    public_key: bytes
    peer: RpcPeer
    topics: frozenset[bytes]
    inbound: bool


class ConnectionEvents:
    """An async iterator of ConnectionEvent, subscribed when created so no event
    between subscribing and the first ``__anext__`` is lost."""

    def __init__(self, swarm: Swarm) -> None:
        self._swarm = swarm
        self._queue: asyncio.Queue[ConnectionEvent] = asyncio.Queue(swarm.config.event_queue)
        swarm._subscribers.append(self._queue)

    def __aiter__(self) -> ConnectionEvents:
        return self

    async def __anext__(self) -> ConnectionEvent:
        if self._queue not in self._swarm._subscribers:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        with contextlib.suppress(ValueError):
            self._swarm._subscribers.remove(self._queue)


@dataclass
class _Joined:
    topic: bytes
    announce: bool
    lookup: bool
    payload: dict[str, Any] | None
    seq: int = 0
    role: str | None = None  # the role its announcers must hold (swarmd.topics.topic_role)
    live: bool = False  # short-lived record, refreshed often (SwarmConfig.live_*)
    first_round: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    last: AnnounceResult | None = None


def _topic_bytes(topic: bytes | str, secret: bytes | None) -> bytes:
    if isinstance(topic, bytes) and len(topic) == 32:
        return topic
    if isinstance(topic, str):
        return topic_from_name(topic, secret)
    raise SwarmdError(ERR_BAD_REQUEST, "topic must be a 32-byte hash or a name (str)")


class Swarm:
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
        # as hashes; a joined topic keeps its role in _Joined (names from requests never land here)
        self._topic_roles: dict[bytes, str] = {self.topic(name): role for name, role in ROLE_TOPICS.items()}
        self._refused: set[bytes] = set()  # keys whose records a role lookup ignored (logged once)
        self.firewall = firewall
        self.on_connection = on_connection
        self._registry = ConnectionRegistry(self.public_key)  # dedupes: dialled-by-smaller-key wins
        self.path_metrics = PathMetrics()  # connections by path, upgrades (swarm.traversal counts the rest)
        self.traversal: Any = None  # swarmd.swarm.traversal.Traversal: punched/relayed paths when direct fails
        self.mapped_addresses: list[tuple[str, int]] = []  # ports our router forwards to us (swarm/mapping.py)
        self._dialing: dict[bytes, asyncio.Future[RpcPeer]] = {}
        self._topics: dict[bytes, _Joined] = {}
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

    # -- topics -----------------------------------------------------------------------

    def topic(self, name: bytes | str) -> bytes:
        """The 32-byte topic of a name under this swarm's secret."""
        return _topic_bytes(name, self.config.secret)

    def role_of(self, topic: bytes | str) -> str | None:
        """The role announcers of this topic must be admitted to (None: any key)."""
        if isinstance(topic, str):
            return topic_role(topic)
        joined = self._topics.get(topic)
        return joined.role if joined is not None and joined.role else self._topic_roles.get(topic)

    async def join(
        self,
        topic: bytes | str,
        announce: bool = True,
        lookup: bool = True,
        payload: dict[str, Any] | None = None,
        *,
        live: bool = False,
    ) -> bytes:
        """Announce under and/or look up a topic, then keep doing so until leave().
        Returns the 32-byte topic. Use flush() to wait for the first round.

        live=True: our record says "this node is up now" (a worker, a store); it
        lives config.live_record_ttl and is refreshed every live_reannounce_interval,
        so a node that dies without leaving drops out of lookups within the TTL."""
        await self.start()
        t = self.topic(topic)
        role = self.role_of(topic)
        old = self._topics.pop(t, None)
        if old is not None and old.task is not None:
            old.task.cancel()
            await asyncio.gather(old.task, return_exceptions=True)
        joined = _Joined(t, announce, lookup, payload, seq=old.seq if old else 0, role=role, live=live)
        self._topics[t] = joined
        joined.task = self._spawn(self._topic_loop(joined), f"swarm-topic-{t.hex()[:8]}")
        return t

    async def update(self, topic: bytes | str, payload: dict[str, Any] | None) -> AnnounceResult:
        """Re-announce a joined topic now with a new payload (seq + 1): live load."""
        t = self.topic(topic)
        joined = self._topics.get(t)
        if joined is None or not joined.announce:
            raise SwarmdError(ERR_NOT_FOUND, "topic is not joined with announce=True")
        joined.payload = payload
        return await self._announce(joined)

    async def reannounce(self) -> None:
        """Announce every joined topic again now: our addresses changed (a port mapped or lost)."""
        for joined in list(self._topics.values()):
            if joined.announce:
                with contextlib.suppress(SwarmdError):
                    await self._announce(joined)

    async def leave(self, topic: bytes | str) -> None:
        """Stop announcing and looking up; withdraw our record from the DHT."""
        t = self.topic(topic)
        joined = self._topics.pop(t, None)
        if joined is None:
            return
        if joined.task is not None:
            joined.task.cancel()
            await asyncio.gather(joined.task, return_exceptions=True)
        if joined.announce and joined.seq:
            await self.dht.unannounce(Unannounce.make(self.identity, t, joined.seq))
        self._seen.pop(t, None)

    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (API contract)
        """True once every joined topic has stored its announcement and done its
        first lookup round (connections attempted); False on timeout."""
        waits = [j.first_round.wait() for j in self._topics.values()]
        if not waits:
            return True
        try:
            await within(asyncio.gather(*waits), timeout or self.config.flush_timeout)
            return True
        except TimeoutError:
            return False

    def _next_seq(self, joined: _Joined) -> int:
        # time-based floor: a restarted node's records replace its own older ones
        joined.seq = max(joined.seq + 1, int(time.time() * 1000))
        return joined.seq

    async def _announce(self, joined: _Joined) -> AnnounceResult:
        rec = make_record(
            self.identity,
            joined.topic,
            self.addresses(),
            self.trust.with_grants(joined.payload),
            self._next_seq(joined),
            self.config.live_record_ttl if joined.live else self.config.record_ttl,
            time.time(),
            self.dht.config.max_payload,
            self.dht.config.max_addresses,
        )
        joined.last = await self.dht.announce(rec)
        return joined.last

    async def _topic_loop(self, joined: _Joined) -> None:
        cfg = self.config
        next_announce = 0.0
        rounds = 0
        while True:
            now = time.monotonic()
            work = []
            if joined.announce and now >= next_announce:
                work.append(self._announce(joined))
                if joined.live:
                    every, jitter = cfg.live_reannounce_interval, cfg.live_reannounce_jitter
                else:
                    every, jitter = cfg.reannounce_interval, cfg.reannounce_jitter
                next_announce = now + every + random.uniform(0, jitter)
            if joined.lookup:
                work.append(self._lookup_and_connect(joined.topic))
            results = await asyncio.gather(*work, return_exceptions=True)
            for r in results:
                if isinstance(r, (SwarmdError, RecordError, OSError)):
                    self._log.bind(event="topic_round_failed", error=str(r)).warning("topic round failed")
                elif isinstance(r, BaseException):
                    raise r
            joined.first_round.set()
            # peers that join at the same moment miss each other's first announce:
            # look again soon, then back off to the steady interval
            relookup = min(cfg.relookup_interval, cfg.relookup_initial * 2**rounds)
            rounds = min(rounds + 1, 30)
            wait = relookup if joined.lookup else max(0.05, next_announce - time.monotonic())
            if joined.announce:
                wait = min(wait, max(0.05, next_announce - time.monotonic()))
            await asyncio.sleep(wait)

    async def _lookup_and_connect(self, topic: bytes) -> None:
        """One lookup round: connect to new peers, then make the round's
        results the topic's known peers (peers that left drop out, so they are
        no longer reconnected)."""
        dials = []
        found: dict[bytes, PeerRecord] = {}
        seen = self._seen.setdefault(topic, {})
        async with aclosing(self.lookup(topic)) as it:
            async for rec in it:
                if rec.public_key == self.public_key:
                    continue
                found[rec.public_key] = rec
                seen[rec.public_key] = rec  # before dialling, so the open event names the topic
                if self._registry.get(rec.public_key) is not None:
                    continue
                if len(self._registry) + len(self._dialing) >= self.config.max_peers:
                    continue
                dial = self._spawn(self._quiet_connect(rec), "swarm-dial")
                if dial is not None:
                    dials.append(dial)
        if topic in self._topics:
            self._seen[topic] = found
        if dials:
            await asyncio.gather(*dials, return_exceptions=True)

    async def _quiet_connect(self, rec: PeerRecord) -> None:
        try:
            await self.connect(rec.public_key, rec)
        except SwarmdError as e:
            self._log.bind(event="connect_failed", peer=rec.public_key.hex()[:16], code=e.code).info(
                "could not connect to peer found by lookup"
            )

    async def lookup(self, topic: bytes | str, role: str | None = None) -> AsyncIterator[PeerRecord]:
        """Records of peers announcing topic, each as soon as it arrives
        (newest seq per peer, each peer once).

        The admission point of the swarm: on a role's topic (swarmd.topics.topic_role,
        or `role` given) only records of keys our trust admits to that role are
        yielded; the others are ignored as if never announced."""
        t = self.topic(topic)
        need = role or self.role_of(topic if isinstance(topic, str) else t)
        trust = self.trust
        async with aclosing(self.dht.lookup(t)) as it:
            async for rec in it:
                if need is not None and not trust.admits_record(rec, need):
                    self._not_admitted(rec, need)
                    continue
                yield rec

    def _not_admitted(self, rec: PeerRecord, role: str) -> None:
        if rec.public_key in self._refused:
            return
        if len(self._refused) >= 4096:
            self._refused.clear()
        self._refused.add(rec.public_key)
        self._log.bind(event="peer_not_admitted", peer=rec.public_key.hex()[:16], role=role).info(
            "ignoring a record: its key holds no valid grant for this role"
        )

    async def lookup_all(
        self, topic: bytes | str, timeout: float | None = None, role: str | None = None  # noqa: ASYNC109
    ) -> list[PeerRecord]:
        """Every record a full lookup finds (partial on timeout), admitted as lookup() does."""
        out: dict[bytes, PeerRecord] = {}

        async def run() -> None:
            async with aclosing(self.lookup(topic, role)) as it:
                async for rec in it:
                    if rec.public_key not in out or out[rec.public_key].seq < rec.seq:
                        out[rec.public_key] = rec

        with contextlib.suppress(TimeoutError):
            await within(run(), timeout or self.config.lookup_timeout)
        return list(out.values())

    # -- connections ------------------------------------------------------------------

    def peers(self) -> list[tuple[bytes, RpcPeer, frozenset[bytes], bool]]:
        """Live connections as (public key, peer, matched topics, inbound)."""
        return [
            (p.remote_public_key, p, self._topics_of(p.remote_public_key), not p.conn.initiator)
            for p in self._registry.peers()
        ]

    def _topics_of(self, pk: bytes) -> frozenset[bytes]:
        return frozenset(t for t, recs in self._seen.items() if pk in recs)

    def connections(self) -> ConnectionEvents:
        """Connection events (open and close) from the moment of this call on;
        iterate with ``async for``, stop with ``aclose()``."""
        return ConnectionEvents(self)

    def _emit(self, ev: ConnectionEvent) -> None:
        for q in self._subscribers:
            if q.full():
                q.get_nowait()  # a slow consumer loses the oldest event, never blocks the swarm
            q.put_nowait(ev)
        if self.on_connection is not None:
            try:
                self.on_connection(ev)
            except Exception as e:  # a user callback must not break the pool
                self._log.bind(event="on_connection_failed", error=str(e)).warning(
                    "connection callback raised"
                )

    async def connect(self, public_key: bytes, record: PeerRecord | None = None) -> RpcPeer:
        """A pooled, authenticated connection to the peer with this key: reused
        if open, joined if being dialled, else dialled at the record's addresses
        (looked up on the peer's own topic when no record is given)."""
        if public_key == self.public_key:
            return self.local_peer()
        current = self._registry.get(public_key)
        if current is not None:
            return current
        pending = self._dialing.get(public_key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[RpcPeer] = asyncio.get_running_loop().create_future()
        self._dialing[public_key] = fut
        try:
            peer = await self._dial(public_key, record)
            fut.set_result(peer)
            return peer
        except BaseException as e:
            fut.set_exception(
                e if isinstance(e, SwarmdError) else SwarmdError(ERR_CLOSED, "connect cancelled")
            )
            fut.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            self._dialing.pop(public_key, None)

    def local_peer(self) -> LocalPeer:
        """Our own method table as a peer (calls and streams in-process): what connecting to
        our own key gives, so co-located roles are reached like remote ones, minus the socket."""
        if self._local is None or self._local.is_closed:
            self._local = LocalPeer(self.methods, self.public_key, self.server.config, self.server.instance_id)
        return self._local

    async def _resolve(self, public_key: bytes) -> PeerRecord:
        topic = self.topic(peer_topic(public_key.hex()))
        async with aclosing(self.dht.lookup(topic)) as it:
            async for rec in it:
                if rec.public_key == public_key:
                    return rec
        raise SwarmdError(ERR_UNAVAILABLE, f"no record for peer {public_key.hex()[:16]}… on the DHT")

    async def _dial(self, public_key: bytes, record: PeerRecord | None) -> RpcPeer:
        if record is None:
            record = await within(self._resolve(public_key), self.config.lookup_timeout)
        t0 = time.monotonic()
        if self.traversal is None:
            return await self._dial_addresses(public_key, record, self.config.connect_timeout)
        # With NAT traversal: dial the addresses while asking the peer's own record
        # whether that can work at all; "behind NAT" cancels the dial instead of
        # waiting for its timeout, and costs nothing when the dial wins first.
        direct = asyncio.ensure_future(
            self._dial_addresses(
                public_key, record, min(self.config.connect_timeout, self.traversal.config.direct_timeout)
            )
        )
        verdict = asyncio.ensure_future(self.traversal.skip_direct(public_key, record))
        try:
            await asyncio.wait({direct, verdict}, return_when=asyncio.FIRST_COMPLETED)
            if not direct.done() and verdict.done() and verdict.exception() is None and verdict.result() is not None:
                direct.cancel()
                await asyncio.gather(direct, return_exceptions=True)
                skipped = PathAttempt("direct", False, time.monotonic() - t0, "skipped: the peer's record says it is behind NAT")
                return await self.traversal.dial(public_key, record, skipped, verdict.result())
            try:
                return await direct
            except SwarmdError as e:
                attempt = PathAttempt("direct", False, time.monotonic() - t0, e.message)
            try:
                own = await verdict
            except (SwarmdError, TimeoutError):
                own = None
            return await self.traversal.dial(public_key, record, attempt, own)
        finally:
            for t in (direct, verdict):
                if not t.done():
                    t.cancel()
            await asyncio.gather(direct, verdict, return_exceptions=True)

    async def _dial_addresses(self, public_key: bytes, record: PeerRecord, timeout: float) -> RpcPeer:  # noqa: ASYNC109
        """Direct TCP to each advertised address in turn."""
        last: SwarmdError | None = None
        if not record.addresses:
            last = SwarmdError(ERR_UNAVAILABLE, f"peer {public_key.hex()[:16]}… advertises no address")
        for host, port in record.addresses:
            try:
                peer = await connect(
                    self.identity,
                    host,
                    port,
                    remote_public_key=public_key,
                    methods=self.methods,
                    firewall=self.server.firewall,
                    timeout=timeout,
                )
            except SwarmdError as e:
                last = e
                continue
            if self.traversal is not None:
                self.traversal.label_direct(peer, record, (host, port))  # a port the peer's router forwards?
            return self._register(peer, inbound=False)
        assert last is not None
        raise SwarmdError(last.code, f"cannot reach peer {public_key.hex()[:16]}…: {last.message}")

    async def admitted(self, peer: RpcPeer) -> bool:
        """The firewall's verdict on a peer that connected to us, on any path (direct, punched,
        relayed): False closes it. Its calls wait (peer.hold(), set when the connection was
        made) until the caller releases it; none is dispatched before this answers."""
        try:
            pk = peer.remote_public_key
        except SwarmdError:
            return False
        if self._closing:
            await peer.close()
            return False
        if self.firewall is not None:
            try:
                allowed = await within(self.firewall(pk), self.config.connect_timeout)
            except Exception as e:  # a failing firewall denies
                self._log.bind(event="firewall_failed", error=str(e)).warning(
                    "firewall callback failed; denying"
                )
                allowed = False
            if not allowed:
                self._log.bind(event="peer_denied", peer=pk.hex()[:16]).info("firewall denied inbound peer")
                await peer.close()
                return False
        return True

    async def _admit_inbound(self, peer: RpcPeer) -> None:
        if not await self.admitted(peer):
            return
        self._admit(peer)
        if not peer.is_closed:
            peer.release()

    def _admit(self, peer: RpcPeer) -> None:
        """Register an inbound peer the firewall (if any) admitted, within max_peers."""
        try:
            pk = peer.remote_public_key
        except SwarmdError:
            return
        if self._closing:
            self._spawn(peer.close(), "swarm-close-peer")
            return
        if self._registry.get(pk) is None and len(self._registry) >= self.config.max_peers:
            self._log.bind(event="peer_limit", peer=pk.hex()[:16]).info("max peers reached; closing inbound")
            self._spawn(peer.close(), "swarm-close-peer")
            return
        self._register(peer, inbound=True)

    def _register(self, peer: RpcPeer, inbound: bool) -> RpcPeer:
        """Add a connection to the pool. Of two connections between us and a
        peer, both sides keep the one dialled by the smaller public key (the
        rpc layer's ConnectionRegistry rule); a replacement is announced as a
        new "open" event carrying the connection to use from then on."""
        pk = peer.remote_public_key
        if getattr(peer.conn, "path_rank", None) is None:
            peer.conn.path_rank = PATH_RANK["direct"]  # type: ignore[attr-defined]  # dialled or accepted TCP
        before = self._registry.get(pk)
        if before is not None and before is not peer and path_rank(peer) > path_rank(before):
            # an upgrade (e.g. relayed -> punched): new calls take the better path from now
            # on, calls and streams in flight on the old one finish there, then it closes
            self._registry.remove(pk, before)
            self._spawn(self._retire(before), "swarm-retire")
        kept = self._registry.add(peer)
        if kept is peer and kept is not before:
            self.path_metrics.opened[path_of(peer)] = self.path_metrics.opened.get(path_of(peer), 0) + 1
            peer.closed.add_done_callback(lambda _f, p=peer, k=pk: self._on_closed(k, p))
            self._emit(ConnectionEvent("open", pk, peer, self._topics_of(pk), inbound))
        return kept

    async def _retire(self, peer: RpcPeer) -> None:
        """Close a replaced connection without failing a call on it.

        The side that dialled it asks the other (`nat.retire`, on the old connection
        itself) to stop using it; the answer comes after every request the other side
        sent on it (ordered), so once it arrives and nothing is in flight here, the
        connection is closed. The other side only waits for that close. A peer
        without `nat.retire` gets the old rule: closed after RETIRE_QUIET with nothing
        in flight and no message either way. Bounded by RETIRE_MAX."""
        loop = asyncio.get_running_loop()
        heard = [loop.time()]
        deliver = peer.conn.on_message

        def on_message(data: Any) -> None:
            heard[0] = loop.time()
            if deliver is not None:
                deliver(data)

        peer.conn.on_message = on_message
        deadline = loop.time() + RETIRE_MAX
        agreed = False
        if peer.conn.initiator:
            try:
                await peer.call("nat.retire", None, timeout=RETIRE_ASK)
                agreed = True
            except SwarmdError:
                agreed = False  # an older peer, or the connection is gone already
        while not peer.is_closed and loop.time() < deadline:
            if peer.conn.initiator and not _busy(peer) and (agreed or loop.time() - heard[0] >= RETIRE_QUIET):
                break  # the dialler closes
            if not peer.conn.initiator and loop.time() - heard[0] >= RETIRE_MAX / 2 and not _busy(peer):
                break  # the dialler never closed it (it lost the new path?): give up on it, idle
            await asyncio.sleep(0.05)
        self._log.bind(event="connection_retired", peer=peer.remote_public_key.hex()[:16], path=path_of(peer),
                       agreed=agreed, closed_by="peer" if peer.is_closed else "us").info(
            "replaced connection closed after its calls finished"
        )
        await peer.close()

    async def retire_asked(self, old: RpcPeer) -> None:
        """The dialler of `old` replaced it and asks us to stop using it: wait (bounded)
        until the replacement reached us too, stop handing `old` out, let our own calls
        on it finish; the caller answers then, and the dialler closes `old`."""
        loop = asyncio.get_running_loop()
        pk = old.remote_public_key
        deadline = loop.time() + RETIRE_ASK / 2
        await _until(lambda: self._registry.get(pk) is not old, deadline)
        self._registry.remove(pk, old)
        await _until(lambda: not (old._pending or old._pending_streams), deadline)

    def _on_closed(self, pk: bytes, peer: RpcPeer) -> None:
        current = self._registry.get(pk)
        if current is not None and current is not peer:
            return  # replaced by a deduplicated twin: the peer is still connected
        self._emit(ConnectionEvent("close", pk, peer, self._topics_of(pk), not peer.conn.initiator))
        if not self._closing and self._still_wanted(pk) and pk not in self._reconnecting:
            self._spawn(self._reconnect(pk), "swarm-reconnect")

    async def _reconnect(self, pk: bytes) -> None:
        """Re-dial a peer found by a lookup, with exponential backoff and jitter."""
        cfg = self.config
        self._reconnecting.add(pk)
        try:
            delay = cfg.reconnect_initial
            for _ in range(cfg.reconnect_attempts):
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                if self._registry.get(pk) is not None or not self._still_wanted(pk):
                    return
                record = self._latest_record(pk)
                try:
                    await self.connect(pk, record)
                    return
                except SwarmdError:
                    delay = min(cfg.reconnect_max, delay * 2)
        finally:
            self._reconnecting.discard(pk)

    def _still_wanted(self, pk: bytes) -> bool:
        return any(pk in self._seen.get(t, {}) for t, j in self._topics.items() if j.lookup)

    def _latest_record(self, pk: bytes) -> PeerRecord | None:
        now_ms = int(time.time() * 1000)
        best = None
        for recs in self._seen.values():
            rec = recs.get(pk)
            if rec is not None and rec.expiry_ms > now_ms and (best is None or rec.seq > best.seq):
                best = rec
        return best

    # -- requests ---------------------------------------------------------------------

    async def request(
        self, public_key: bytes, method: str, params: Any = None, timeout: float | None = None
    ) -> Any:  # noqa: ASYNC109
        """Call method on the peer with this key (our own key: the local peer, no socket).
        A connection that closes under the call is re-dialled once."""
        t = timeout or self.config.request_timeout
        if public_key == self.public_key:
            return await self.local_peer().call(method, params, timeout=t)
        for attempt in (0, 1):
            peer = self._registry.get(public_key) or await self.connect(
                public_key, self._latest_record(public_key)
            )
            try:
                return await peer.call(method, params, timeout=t)
            except SwarmdError as e:
                if e.code != ERR_CLOSED or attempt:
                    raise
        raise SwarmdError(ERR_CLOSED, "unreachable")  # pragma: no cover

    async def request_topic(
        self,
        topic: bytes | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Call method on one peer announcing topic (connected peers first);
        on a retryable failure re-resolve the topic and try another peer."""
        t = self.topic(topic)
        role = self.role_of(topic)
        tried: set[bytes] = set()
        last: SwarmdError | None = None
        for _ in range(self.config.request_retries + 1):
            recs = [r for r in await self._candidates(t, fresh=bool(tried), role=role) if r.public_key not in tried]
            if not recs:
                break
            recs.sort(
                key=lambda r: (
                    r.public_key != self.public_key and self._registry.get(r.public_key) is None,
                    random.random(),
                )
            )
            rec = recs[0]
            tried.add(rec.public_key)
            try:
                return await self.request(rec.public_key, method, params, timeout)
            except SwarmdError as e:
                if not retryable(e):
                    raise
                last = e
        if last is not None:
            raise last
        raise SwarmdError(ERR_UNAVAILABLE, "no peer announces this topic")

    async def _candidates(self, topic: bytes, fresh: bool, role: str | None = None) -> list[PeerRecord]:
        now_ms = int(time.time() * 1000)
        cached = [r for r in self._seen.get(topic, {}).values() if r.expiry_ms > now_ms]
        if cached and not fresh:
            return cached
        return await self.lookup_all(topic, role=role)

    async def request_all_topic(
        self,
        topic: bytes | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[bytes, Any]:
        """Call method on every peer announcing topic; maps each public key to
        its result or to the SwarmdError it failed with."""
        recs = await self.lookup_all(self.topic(topic), role=self.role_of(topic))

        async def one(rec: PeerRecord) -> Any:
            try:
                if rec.public_key != self.public_key and self._registry.get(rec.public_key) is None:
                    await self.connect(rec.public_key, rec)
                return await self.request(rec.public_key, method, params, timeout)
            except SwarmdError as e:
                return e

        results = await asyncio.gather(*(one(r) for r in recs))
        return {r.public_key: res for r, res in zip(recs, results, strict=True)}

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
