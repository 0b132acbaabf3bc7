"""The connection pool of a Swarm: one authenticated connection per peer key.

`connect` reuses a pooled connection, joins a dial in progress, or dials the
addresses in the peer's signed record (then NAT traversal, when configured);
our own key gives the in-process LocalPeer. Two connections between the same
pair are deduplicated by a rule both sides compute (the one dialled by the
smaller key survives); a better path replaces a worse one after the calls on
it finish (`_retire`). Closed connections to peers still found by a lookup are
re-dialled with backoff. `Pool` is a mixin of `Swarm`; the state lives there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from swarmd.dht.node import DhtNode
from swarmd.dht.records import PeerRecord
from swarmd.errors import (
    ERR_CLOSED,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.net.punch import PathAttempt, PathInfo
from swarmd.node.deadline import within
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcPeer, RpcServer, connect
from swarmd.rpc.local import LocalPeer
from swarmd.rpc.registry import ConnectionRegistry
from swarmd.swarm.config import SwarmConfig
from swarmd.swarm.paths import MAPPED, PATH_RANK, PathMetrics, from_outside, path_of, path_rank
from swarmd.topics import peer_topic

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

    def __init__(self, swarm: Pool) -> None:
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


class Pool:
    """Pooled, deduplicated, reconnecting peer connections and their open/close events."""

    identity: Identity
    public_key: bytes
    dht: DhtNode
    config: SwarmConfig
    server: RpcServer
    methods: Methods
    firewall: Firewall | None
    on_connection: Callable[[ConnectionEvent], None] | None
    traversal: Any
    path_metrics: PathMetrics
    _registry: ConnectionRegistry
    _dialing: dict[bytes, asyncio.Future[RpcPeer]]
    _topics: dict[bytes, Any]
    _seen: dict[bytes, dict[bytes, PeerRecord]]
    _reconnecting: set[bytes]
    _subscribers: list[asyncio.Queue[ConnectionEvent]]
    _closing: bool
    _local: LocalPeer | None
    _log: Any

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
            self._local = LocalPeer(
                self.methods, self.public_key, self.server.config, self.server.instance_id
            )
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
            if (
                not direct.done()
                and verdict.done()
                and verdict.exception() is None
                and verdict.result() is not None
            ):
                direct.cancel()
                await asyncio.gather(direct, return_exceptions=True)
                skipped = PathAttempt(
                    "direct", False, time.monotonic() - t0, "skipped: the peer's record says it is behind NAT"
                )
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
                    config=self.server.config,  # the node's [rpc] settings hold for the connections it dials
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
        self._label_inbound(peer)
        self._register(peer, inbound=True)

    def _label_inbound(self, peer: RpcPeer) -> None:
        """An accepted TCP connection while our router forwards our port to us came through
        that forward, unless it comes from our own network: label it `mapped`, as the side
        that dialled it does (Dialer.label_direct), so both ends' path metrics are true."""
        mapped: list[tuple[str, int]] = getattr(self, "mapped_addresses", None) or []
        conn = peer.conn
        if not mapped or getattr(conn, "path_info", None) is not None:
            return
        pipe = getattr(conn, "_pipe", None)
        local = pipe.get_extra_info("sockname") if pipe is not None and hasattr(pipe, "get_extra_info") else None
        if not from_outside(conn.peername, local):
            return
        info = PathInfo(MAPPED, detail={"mapped": f"{mapped[0][0]}:{mapped[0][1]}", "inbound": True})
        conn.path_info = info  # type: ignore[attr-defined]
        conn.path_rank = PATH_RANK[MAPPED]  # type: ignore[attr-defined]
        traversal = getattr(self, "traversal", None)
        if traversal is not None:
            pk = peer.remote_public_key
            traversal.paths[pk] = info
            peer.closed.add_done_callback(lambda _f: traversal.paths.pop(pk, None) if traversal.paths.get(pk) is info else None)

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
        self._log.bind(
            event="connection_retired",
            peer=peer.remote_public_key.hex()[:16],
            path=path_of(peer),
            agreed=agreed,
            closed_by="peer" if peer.is_closed else "us",
        ).info("replaced connection closed after its calls finished")
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
