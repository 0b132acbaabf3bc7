"""Topic membership of a Swarm: join, announce, look up, leave.

A joined topic runs one loop (a task of the swarm's scope) that re-announces
our signed record before it expires and looks the topic up, connecting to the
peers found; lookups of a role's topic yield only the records of keys our trust
admits to that role. `Membership` is a mixin of `Swarm`; the state lives there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from swarmd.dht.node import AnnounceResult, DhtNode
from swarmd.dht.records import PeerRecord, RecordError, Unannounce, make_record, topic_from_name
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_NOT_FOUND,
    SwarmdError,
)
from swarmd.node.deadline import within
from swarmd.node.identity import Identity
from swarmd.node.trust import Trust
from swarmd.rpc import RpcPeer
from swarmd.rpc.registry import ConnectionRegistry
from swarmd.swarm.config import SwarmConfig
from swarmd.topics import topic_role


@dataclass
class Joined:
    """A topic this node joined: what it does there and its loop."""

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


class Membership:
    """join/update/leave/flush/lookup: the topics this node is in."""

    identity: Identity
    public_key: bytes
    dht: DhtNode
    config: SwarmConfig
    trust: Trust
    _topics: dict[bytes, Joined]
    _topic_roles: dict[bytes, str]
    _seen: dict[bytes, dict[bytes, PeerRecord]]
    _refused: set[bytes]
    _dialing: dict[bytes, asyncio.Future[RpcPeer]]
    _registry: ConnectionRegistry
    _log: Any

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
        joined = Joined(t, announce, lookup, payload, seq=old.seq if old else 0, role=role, live=live)
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

    def _next_seq(self, joined: Joined) -> int:
        # time-based floor: a restarted node's records replace its own older ones
        joined.seq = max(joined.seq + 1, int(time.time() * 1000))
        return joined.seq

    async def _announce(self, joined: Joined) -> AnnounceResult:
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

    async def _topic_loop(self, joined: Joined) -> None:
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
                    if len(dials) == 1 and self.config.first_dial_lead > 0:
                        # the first peer's dial goes ahead of the rest of the lookup, whose
                        # replies would otherwise be read (and their nodes asked) in between
                        # its handshake's steps, here and on the nodes asked; bounded, so a slow
                        # dial delays finding the other peers by at most first_dial_lead
                        await asyncio.wait({dial}, timeout=self.config.first_dial_lead)
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

    async def lookup(
        self, topic: bytes | str, role: str | None = None, *, admit: bool = True
    ) -> AsyncIterator[PeerRecord]:
        """Records of peers announcing topic, each as soon as it arrives
        (newest seq per peer, each peer once).

        The admission point of the swarm: on a role's topic (swarmd.topics.topic_role,
        or `role` given) only records of keys our trust admits to that role are
        yielded; the others are ignored as if never announced. admit=False yields
        every record, for a tool that shows each one's admission (never to pick peers by)."""
        check = self._admission(topic, role) if admit else None
        async with aclosing(self.dht.lookup(self.topic(topic), check)) as it:
            async for rec in it:
                yield rec

    def _admission(self, topic: bytes | str, role: str | None) -> Callable[[PeerRecord], bool] | None:
        """The trust check lookups of topic apply (None: any key may announce it)."""
        need = role or self.role_of(topic if isinstance(topic, str) else self.topic(topic))
        if need is None:
            return None
        trust = self.trust

        def admit(rec: PeerRecord) -> bool:
            if trust.admits_record(rec, need):
                return True
            self._not_admitted(rec, need)
            return False

        return admit

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
        self,
        topic: bytes | str,
        timeout: float | None = None,
        role: str | None = None,  # noqa: ASYNC109
    ) -> list[PeerRecord]:
        """Every record a full lookup finds (partial on timeout), admitted as lookup() does."""
        t = self.topic(topic)
        return await self.dht.lookup_all(t, timeout or self.config.lookup_timeout, self._admission(topic, role))
