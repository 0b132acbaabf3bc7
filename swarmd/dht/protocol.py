"""Our kademlia protocol: the package's routing, buckets and crawling, with
its defects fixed and the topic-record RPCs added.

Defects of kademlia 2.2.3 / rpcudp fixed here (each has a test that fails on
the unpatched class, tests/test_dht_defects.py):

- ``RoutingTable.find_neighbors`` walks buckets left/right alternately and
  stops as soon as the right side is exhausted, and keeps the first k nodes it
  meets rather than the k closest: at N >= 200 lookups start from too few or no
  contacts and silently send no RPC. We take the k closest over all buckets.
- ``welcome_if_new`` hashes stored keys a second time when deciding whether to
  hand values to a new node. We use the key as stored.
- A ``find_node`` reply listing a contact with ``ip=None`` makes the next
  ``sendto`` raise TypeError, which asyncio treats as fatal and closes the
  socket. Contacts are type-checked (and capped at k) before use
  (``routing.parse_contacts``), and sendto is guarded (``wire``).
- Each undecodable datagram ends a task with an exception (a traceback per
  packet). ``wire`` decodes synchronously, bounds the size and logs one
  rate-limited line.
- ``Server.set`` treats the ``(False, None)`` tuple of a timed-out store as
  success (a non-empty tuple is truthy); fixed in ``DhtNode.set_digest``.
- A departed node stays in every table that has not itself timed out on it,
  so each newcomer learns it from find replies and pays a timeout for it, for
  as long as the table keeps it (tests/test_dht_dead_contacts.py). Here a
  contact that timed out is evicted and remembered as dead (not re-learned
  from others' replies for ``dead_contact_memory``), and a contact we hand out
  in a reply that has been silent for ``contact_check_after`` is pinged, so
  the holder evicts it after one newcomer paid, not never.

The datagram RPC underneath (framing, limits, request matching) is
``swarmd.dht.wire``; the routing table and contact checks ``swarmd.dht.routing``;
the lookups ``swarmd.dht.crawl``; STUN on the same socket ``swarmd.dht.reflexive``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import ForgetfulStorage

from swarmd.dht.config import DhtConfig
from swarmd.dht.records import (
    RecordError,
    RecordStore,
    TokenIssuer,
    Unannounce,
    VerifiedCache,
    decode_record,
    topic_target,
)
from swarmd.dht.routing import SwarmdRoutingTable, parse_contacts, valid_id
from swarmd.dht.wire import DatagramRpc, Notify, Reply
from swarmd.node.ratelimit import RateLimiter
from swarmd.node.supervisor import Supervisor

MAX_CONTACT_CHECKS = 16  # liveness pings of silent contacts in flight at once


def _is_list(reply: Any) -> bool:
    return isinstance(reply, list)


def _is_dict(reply: Any) -> bool:
    return isinstance(reply, dict)


class SwarmdProtocol(DatagramRpc, KademliaProtocol):
    """kademlia's protocol on our datagram RPC, with contact liveness and the topic RPCs."""

    def __init__(
        self,
        source_node: Node,
        config: DhtConfig,
        bind: dict[str, Any] | None = None,
        tasks: Supervisor | None = None,
    ) -> None:
        """`tasks`: the scope its background work (pings, record hand-offs) runs in; failures
        there are logged, rate-limited, and never stop the node."""
        DatagramRpc.__init__(self, config, bind, tasks)
        self.ksize = config.ksize
        self.router = SwarmdRoutingTable(self, config.ksize, source_node)
        self.router.max_per_ip = config.max_contacts_per_ip
        self.storage = ForgetfulStorage()
        self.source_node = source_node
        self.records = RecordStore(
            config.max_records_per_topic, config.max_records_per_source, config.max_records
        )
        self.tokens = TokenIssuer(config.token_rotation, time.time())
        self.client_mode = False
        self.verified = VerifiedCache()  # record signatures already checked (lookups meet them again)
        self.last_seen: dict[bytes, float] = {}  # contact id -> monotonic time it last answered or asked
        self.dead: dict[bytes, float] = {}  # contact id -> monotonic time it timed out (not re-learned)
        self._checking: set[bytes] = set()
        self._check_budget = RateLimiter(config.contact_checks_per_s, 4.0, 1)  # one bucket: all checks
        self._handlers = {
            "ping": self.rpc_ping,
            "find_node": self.rpc_find_node,
            "topic_get": self.rpc_topic_get,
            "topic_put": self.rpc_topic_put,
            "topic_del": self.rpc_topic_del,
        }

    @property
    def wire_id(self) -> bytes:
        """Our id as sent in requests; empty in client mode so that others do not
        add an unreachable node to their routing tables."""
        return b"" if self.client_mode else self.source_node.id

    # rpcudp resolves these through __getattr__; explicit methods use our framing
    def ping(self, address: tuple[str, int], nodeid: bytes) -> asyncio.Future[tuple[bool, Any]]:
        return self.request(address, "ping", self.wire_id)

    def find_node(
        self, address: tuple[str, int], nodeid: bytes, key: bytes
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self.request(address, "find_node", self.wire_id, key)

    def store(
        self, address: tuple[str, int], nodeid: bytes, key: bytes, value: Any
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self.request(address, "store", self.wire_id, key, value)

    def find_value(
        self, address: tuple[str, int], nodeid: bytes, key: bytes
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self.request(address, "find_value", self.wire_id, key)

    def ask(
        self,
        node: Node,
        method: str,
        *args: Any,
        well_formed: Callable[[Any], bool] | None = None,
        then: Notify | None = None,
    ) -> Reply:
        """A request to a contact whose outcome updates the table when it lands, whoever
        still waits for it (a lookup that ended early does not): an answer marks the
        contact seen and welcomes it, a timeout or an answer `well_formed` refuses evicts
        it. No task per request: the bookkeeping, then `then(future)`, run as it lands."""
        return self.request(
            (node.ip, node.port), method, *args, notify=lambda f: self._landed(f, node, well_formed, then)
        )

    def _landed(self, fut: Reply, node: Node, well_formed: Callable[[Any], bool] | None, then: Notify | None) -> None:
        if not fut.cancelled() and not self._closing:
            ok, reply = fut.result()
            if ok and well_formed is not None and not well_formed(reply):
                self.rlog.warn("bad_reply", "dropped a malformed dht reply", peer=str(node))
                ok = False
            self.handle_call_response((ok, reply if ok else None), node)
        if then is not None:
            then(fut)

    def ask_find_node(self, node: Node, key: bytes, then: Notify | None = None) -> Reply:
        """find_node; the reply is a contact list (parse_contacts) or evicts the contact."""
        return self.ask(node, "find_node", self.wire_id, key, well_formed=_is_list, then=then)

    def ask_topic_get(self, node: Node, topic: bytes, token: bytes | None = None, then: Notify | None = None) -> Reply:
        """topic_get; the reply is a map or evicts the contact."""
        args: tuple[Any, ...] = (self.wire_id, topic) if token is None else (self.wire_id, topic, token)
        return self.ask(node, "topic_get", *args, well_formed=_is_dict, then=then)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        # an answer from another id means another node now answers at that address
        ok, nid = await self.ask(node_to_ask, "ping", self.wire_id, well_formed=lambda r: r == node_to_ask.id)
        return (ok and nid == node_to_ask.id, nid)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        ok, reply = await self.ask_find_node(node_to_ask, node_to_find.id)
        contacts = parse_contacts(reply, self.ksize) if ok else None
        if contacts is None:
            return (False, None)
        return (True, [tuple(c) for c in self.not_dead(contacts)])

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        return await self.ask(node_to_ask, "store", self.wire_id, key, value)

    async def call_topic_get(self, node: Node, topic: bytes, token: bytes | None = None) -> tuple[bool, Any]:
        ok, reply = await self.ask_topic_get(node, topic, token)
        return (True, reply) if ok and isinstance(reply, dict) else (False, None)

    async def call_topic_put(self, node: Node, token: bytes, record_wire: dict[str, Any]) -> bool:
        ok, reply = await self.ask(node, "topic_put", self.wire_id, token, record_wire)
        return bool(ok and isinstance(reply, dict) and reply.get("ok") is True)

    async def call_topic_del(self, node: Node, token: bytes, un_wire: dict[str, Any]) -> bool:
        ok, reply = await self.ask(node, "topic_del", self.wire_id, token, un_wire)
        return bool(ok and isinstance(reply, dict) and reply.get("ok") is True)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        if not result[0]:
            self.mark_dead(node)
            return result
        self._seen(node.id)
        self.welcome_if_new(node)
        return result

    # -- contact liveness --------------------------------------------------------

    def _seen(self, node_id: bytes) -> None:
        self.dead.pop(node_id, None)
        self.last_seen.pop(node_id, None)  # re-insert: the dict stays ordered oldest first
        self.last_seen[node_id] = time.monotonic()
        while len(self.last_seen) > 8 * self.ksize * 160:  # bounded: about the largest table
            self.last_seen.pop(next(iter(self.last_seen)))

    def mark_dead(self, node: Node) -> None:
        """A request to node timed out: evict it and do not take it back from others' replies."""
        self.router.remove_contact(node)
        self.last_seen.pop(node.id, None)
        self.dead.pop(node.id, None)
        self.dead[node.id] = time.monotonic()
        while len(self.dead) > 4096:
            self.dead.pop(next(iter(self.dead)))

    def is_dead(self, node_id: bytes) -> bool:
        at = self.dead.get(node_id)
        if at is None:
            return False
        if time.monotonic() - at > self.config.dead_contact_memory:
            del self.dead[node_id]
            return False
        return True

    def not_dead(self, contacts: list[Node]) -> list[Node]:
        return [c for c in contacts if not self.is_dead(c.id)] if self.dead else contacts

    def _check_stale(self, contacts: list[Node]) -> None:
        """Ping contacts we are about to hand out that have been silent a while; one that
        does not answer is evicted (handle_call_response), so we hand it out at most
        until then instead of for as long as it stays in the table."""
        stale = self.config.contact_check_after
        if stale <= 0:
            return
        now = time.monotonic()
        checking = self._checking
        seen = self.last_seen.get
        for node in contacts:
            if now - seen(node.id, 0.0) < stale or node.id in checking:
                continue  # the usual case: answered or asked us lately
            if len(checking) >= MAX_CONTACT_CHECKS:
                return
            if not self._check_budget.allow("checks", now):
                return  # bounded cost: a busy node hands out many silent-but-alive contacts
            self._checking.add(node.id)
            self.last_seen.pop(node.id, None)  # checked now; not again before contact_check_after
            self.last_seen[node.id] = now
            self.spawn(self._check(node))

    async def _check(self, node: Node) -> None:
        try:
            await self.call_ping(node)
        finally:
            self._checking.discard(node.id)

    # -- served RPCs -----------------------------------------------------------

    def _welcome_sender(self, sender: tuple[str, int], nodeid: Any) -> Node | None:
        if not valid_id(nodeid) or nodeid == self.source_node.id:
            return None  # client-mode peers send an empty id and stay out of tables
        node = Node(nodeid, sender[0], sender[1])
        self._seen(nodeid)
        self.welcome_if_new(node)
        return node

    def rpc_ping(self, sender: tuple[str, int], nodeid: Any = b"", *_: Any) -> bytes:
        self._welcome_sender(sender, nodeid)
        return self.source_node.id

    def _closest(self, key: bytes, sender: tuple[str, int]) -> list[list[Any]]:
        nodes, wires = self.router.closest(key, sender)
        self._check_stale(nodes)
        return wires

    def rpc_find_node(self, sender: tuple[str, int], nodeid: Any, key: Any, *_: Any) -> list[list[Any]]:
        if not valid_id(key):
            raise ValueError("find_node key must be 20 bytes")
        self._welcome_sender(sender, nodeid)
        return self._closest(key, sender)

    def rpc_topic_get(
        self, sender: tuple[str, int], nodeid: Any, topic: Any, token: Any = None, *_: Any
    ) -> dict[str, Any]:
        """Closest nodes, a write token and the topic's records. Without a token
        proving the sender receives at this address, records are capped at
        unproven_budget bytes (``more: true`` says there are others), so a
        spoofed small request cannot reflect a large reply at a victim."""
        if not isinstance(topic, bytes) or len(topic) != 32:
            raise ValueError("topic_get topic must be 32 bytes")
        self._welcome_sender(sender, nodeid)
        now = time.time()
        out: dict[str, Any] = {"n": self._closest(topic_target(topic), sender)}
        if not self.client_mode:
            out["tk"] = self.tokens.issue(sender, now)
            proven = token is not None and self.tokens.check(token, sender, now)
            budget = self.config.reply_budget if proven else self.config.unproven_budget
            recs = self.records.get(topic, now, budget)
            if recs:
                out["r"] = [r.to_wire() for r in recs]
            if not proven and self.records.wire_size(topic, now) > budget:
                out["more"] = True
        return out

    def rpc_topic_put(
        self, sender: tuple[str, int], nodeid: Any, token: Any, record: Any, *_: Any
    ) -> dict[str, Any]:
        self._welcome_sender(sender, nodeid)
        if self.client_mode:
            return {
                "ok": False,
                "code": "ERR_UNAVAILABLE",
                "message": "node is in client mode and holds no records",
            }
        now = time.time()
        if not self.tokens.check(token, sender, now):
            self.rlog.warn(
                "bad_token", "refused topic_put with a token not issued to this address", source=sender[0]
            )
            return {
                "ok": False,
                "code": "ERR_FORBIDDEN",
                "message": "token missing, expired or issued to another address",
            }
        cfg = self.config
        try:
            rec = decode_record(
                record, now, cfg.max_payload, cfg.max_addresses, cfg.max_record_ttl, cfg.clock_skew, self.verified
            )
            self.records.put(rec, sender[0], now)
        except RecordError as e:
            self.rlog.warn("bad_record", "refused record", code=e.code, reason=e.message, source=sender[0])
            return {"ok": False, "code": e.code, "message": e.message}
        return {"ok": True}

    def rpc_topic_del(
        self, sender: tuple[str, int], nodeid: Any, token: Any, un: Any, *_: Any
    ) -> dict[str, Any]:
        self._welcome_sender(sender, nodeid)
        if not self.tokens.check(token, sender, time.time()):
            return {
                "ok": False,
                "code": "ERR_FORBIDDEN",
                "message": "token missing, expired or issued to another address",
            }
        try:
            removed = self.records.remove(Unannounce.from_wire(un))
        except RecordError as e:
            self.rlog.warn(
                "bad_unannounce", "refused unannounce", code=e.code, reason=e.message, source=sender[0]
            )
            return {"ok": False, "code": e.code, "message": e.message}
        return {"ok": True, "removed": removed}

    # -- hand-off to new nodes --------------------------------------------------

    def _should_hand_off(self, node: Node, key: bytes) -> bool:
        keynode = Node(key)  # the key as stored: kademlia hashes it a second time here
        neighbors = self.router.find_neighbors(keynode)
        if not neighbors:
            return True
        new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
        this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
        return new_node_close and this_closest

    def welcome_if_new(self, node: Node) -> None:
        """Add a node to the table; if it is now among the closest for keys we
        hold, hand it those values (kademlia storage) and topic records."""
        if node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        if self.router.ip_full(node):  # no hand-off to, nor table slot for, one more id from this IP
            self.router.ip_capped += 1
            return
        for key, value in self.storage:
            if self._should_hand_off(node, key):
                self.spawn(self.call_store(node, key, value), "dht-store")
        if not self.client_mode:
            topics = [t for t in self.records.topics() if self._should_hand_off(node, topic_target(t))]
            if topics:
                self.spawn(self._hand_off_records(node, topics), "dht-hand-off")
        self.router.add_contact(node)

    async def _hand_off_records(self, node: Node, topics: list[bytes]) -> None:
        now = time.time()
        for topic in topics:
            ok, reply = await self.call_topic_get(node, topic)
            token = reply.get("tk") if ok else None
            if not isinstance(token, bytes):
                return
            for rec in self.records.get(topic, now, self.config.reply_budget):
                await self.call_topic_put(node, token, rec.to_wire())

__all__ = ["SwarmdProtocol"]
