"""Iterative lookups: the k closest nodes to an id, and a topic's records.

Both walk the same way: alpha requests in flight towards the target, each
reply read as soon as it lands (kademlia gathers whole rounds, so one departed
node in a round costs the round a full request timeout), and a request
unanswered after a short stall stops counting against alpha. Requests still
out when a walk ends are left to their timeouts: the protocol evicts a contact
that never answers whoever still waits (SwarmdProtocol.ask), so the next
lookup does not wait on it.

A topic walk yields each record as soon as its reply is read, before that
reply's contacts are: the first peer reaches the caller one parse earlier.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from kademlia.node import Node

from swarmd.dht.records import TOKEN_SIZE, PeerRecord, RecordError, decode_record, topic_target
from swarmd.dht.routing import Shortlist, parse_contacts

if TYPE_CHECKING:
    from swarmd.dht.protocol import SwarmdProtocol

Reply = tuple[bool, Any]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Crawl:
    """The walk both lookups share; subclasses say what to ask and read the replies."""

    def __init__(self, protocol: SwarmdProtocol, target: Node, peers: list[Node], ksize: int, alpha: int) -> None:
        self.protocol = protocol
        self.node = target
        self.ksize = ksize
        self.alpha = alpha
        self.nearest = Shortlist(target, ksize, protocol.router.max_per_ip)
        self.nearest.push(peers)
        # a request unanswered after `stall` stops counting against alpha, so a
        # dead contact costs one stall period, not a whole request timeout
        self.stall = min(0.25, protocol._wait_timeout / 4)
        self._inflight: dict[asyncio.Future[Reply], tuple[Node, float]] = {}
        self._ready: deque[asyncio.Future[Reply]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def _ask(self, peer: Node) -> asyncio.Future[Reply]:
        raise NotImplementedError

    def _send(self, peer: Node, fut: asyncio.Future[Reply], now: float) -> None:
        self._inflight[fut] = (peer, now)  # its reply reaches _landed (ask's `then`)

    def _landed(self, fut: asyncio.Future[Reply]) -> None:
        if fut in self._inflight:
            self._ready.append(fut)
            if self._waiter is not None:
                _wake(self._waiter)

    def _stalled(self, now: float) -> int:
        stall = self.stall
        return sum(1 for _, started in self._inflight.values() if now - started >= stall)

    def _fill(self, now: float, stalled: int) -> None:
        room = self.alpha - (len(self._inflight) - stalled)
        if room <= 0:
            return
        for peer in self.nearest.get_uncontacted():
            self.nearest.mark_contacted(peer)
            self._send(peer, self._ask(peer), now)
            room -= 1
            if room == 0:
                return

    async def _next(self, now: float) -> None:
        """Until a reply has landed or the next request in flight stalls."""
        if self._ready:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        due = [started + self.stall - now for _, started in self._inflight.values() if now - started < self.stall]
        timer = loop.call_later(min(due), _wake, waiter) if due else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _replies(self) -> Iterator[tuple[Node, Reply]]:
        while self._ready:
            fut = self._ready.popleft()
            peer, _ = self._inflight.pop(fut)
            yield peer, ((False, None) if fut.cancelled() else fut.result())

    def _close(self) -> None:
        # what is still out lands on the protocol's bookkeeping alone (ask), not here
        self._inflight.clear()
        self._ready.clear()


class NodeCrawl(Crawl):
    """The k closest nodes to a target id that answer."""

    def _ask(self, peer: Node) -> asyncio.Future[Reply]:
        return self.protocol.ask_find_node(peer, self.node.id, then=self._landed)

    async def find(self) -> list[Node]:
        proto = self.protocol
        me = proto.source_node.id
        loop = asyncio.get_running_loop()
        answered = 0
        try:
            while True:
                now = loop.time()
                stalled = self._stalled(now)
                self._fill(now, stalled)
                if not self._inflight or (
                    answered and stalled == len(self._inflight) and not self.nearest.has_uncontacted()
                ):
                    silent = {peer.id for peer, _ in self._inflight.values()}
                    return [n for n in self.nearest if n.id not in silent]
                await self._next(now)
                for peer, (ok, reply) in self._replies():
                    contacts = parse_contacts(reply, self.ksize) if ok else None
                    if contacts is None:
                        self.nearest.remove([peer.id])
                        continue
                    answered += 1
                    self.nearest.push([c for c in proto.not_dead(contacts) if c.id != me])
        finally:
            self._close()


class TopicCrawl(Crawl):
    """A topic's records from the k closest nodes to it, streamed as replies land,
    newest seq per peer (`best`: public key -> seq already yielded, shared with the
    caller so records it already has are not yielded again)."""

    def __init__(
        self,
        protocol: SwarmdProtocol,
        topic: bytes,
        peers: list[Node],
        ksize: int,
        alpha: int,
        best: dict[bytes, int] | None = None,
    ) -> None:
        super().__init__(protocol, Node(topic_target(topic)), peers, ksize, alpha)
        self.topic = topic
        self.best: dict[bytes, int] = best if best is not None else {}
        self.responders: dict[bytes, tuple[Node, bytes | None]] = {}
        self._verified: set[bytes] = set()
        self._asked_again: set[bytes] = set()

    def _ask(self, peer: Node) -> asyncio.Future[Reply]:
        return self.protocol.ask_topic_get(peer, self.topic, then=self._landed)

    async def stream(self, admit: Callable[[PeerRecord], bool] | None = None) -> AsyncIterator[PeerRecord]:
        """Records as they arrive; `admit` (if given) drops the records it refuses."""
        proto = self.protocol
        cfg = proto.config
        me = proto.source_node.id
        loop = asyncio.get_running_loop()
        try:
            while True:
                now_l = loop.time()
                stalled = self._stalled(now_l)
                self._fill(now_l, stalled)
                if not self._inflight:
                    return
                answered = len(self.responders)
                if (
                    stalled == len(self._inflight)
                    and (answered >= self.ksize // 2 or answered * 2 > answered + stalled)
                    and not self.nearest.has_uncontacted()
                ):
                    # only silent (likely dead) contacts left and enough of the closest
                    # nodes answered (half of k, or most of a swarm smaller than k, where
                    # every node holds every record): stop waiting for timeouts
                    return
                await self._next(now_l)
                for peer, (ok, reply) in self._replies():
                    if not ok or not isinstance(reply, dict):
                        self.nearest.remove([peer.id])
                        continue
                    raw = reply.get("r")
                    if isinstance(raw, list):
                        now = time.time()
                        for obj in raw[: cfg.max_records_per_topic]:
                            rec = self._accept(obj, now)
                            if rec is not None and (admit is None or admit(rec)):
                                yield rec
                    contacts = parse_contacts(reply.get("n"), self.ksize) or []
                    self.nearest.push([c for c in proto.not_dead(contacts) if c.id != me])
                    tk = reply.get("tk")
                    tk = tk if isinstance(tk, bytes) and len(tk) == TOKEN_SIZE else None
                    self.responders[peer.id] = (peer, tk)
                    if reply.get("more") is True and tk is not None and peer.id not in self._asked_again:
                        # the node holds more records than it sends an unproven address: ask with its token
                        self._asked_again.add(peer.id)
                        self._send(peer, proto.ask_topic_get(peer, self.topic, tk, self._landed), loop.time())
        finally:
            self._close()

    def _accept(self, obj: Any, now: float) -> PeerRecord | None:
        """The record if it is valid, for this topic and newer than what was yielded for its key."""
        proto = self.protocol
        cfg = proto.config
        sig = obj.get("g") if isinstance(obj, dict) else None
        if isinstance(sig, bytes) and sig in self._verified:
            return None  # the same signed record from another node
        try:
            rec = decode_record(
                obj, now, cfg.max_payload, cfg.max_addresses, cfg.max_record_ttl, cfg.clock_skew, proto.verified
            )
        except RecordError as e:
            proto.rlog.warn("bad_record", "dropped record in lookup reply", code=e.code, reason=e.message)
            return None
        if rec.topic != self.topic:
            proto.rlog.warn("bad_record", "dropped record for another topic in lookup reply")
            return None
        if len(self._verified) < 4 * cfg.max_records_per_topic:
            self._verified.add(rec.signature)
        if self.best.get(rec.public_key, -1) >= rec.seq:
            return None
        self.best[rec.public_key] = rec.seq
        return rec

    def closest_with_tokens(self) -> list[tuple[Node, bytes]]:
        items = [(n, tk) for n, tk in self.responders.values() if tk is not None]
        items.sort(key=lambda it: it[0].distance_to(self.node))
        return items[: self.ksize]


__all__ = ["Crawl", "NodeCrawl", "TopicCrawl"]
