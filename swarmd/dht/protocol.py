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
  socket. Contacts are type-checked (and capped at k) before use, and sendto
  is guarded.
- Each undecodable datagram ends a task with an exception (a traceback per
  packet). We decode synchronously, bound the size and log one rate-limited
  line.
- ``Server.set`` treats the ``(False, None)`` tuple of a timed-out store as
  success (a non-empty tuple is truthy); fixed in ``DhtNode.set_digest``.
- A departed node stays in every table that has not itself timed out on it,
  so each newcomer learns it from find replies and pays a timeout for it, for
  as long as the table keeps it (tests/test_dht_dead_contacts.py). Here a
  contact that timed out is evicted and remembered as dead (not re-learned
  from others' replies for ``dead_contact_memory``), and a contact we hand out
  in a reply that has been silent for ``contact_check_after`` is pinged, so
  the holder evicts it after one newcomer paid, not never.

Wire format (same framing as rpcudp, so documented in docs/dht.md): a request
is ``0x00 | 20-byte id | msgpack([method, [args...]])``, a response
``0x01 | id | msgpack(result)``; datagrams with the STUN magic cookie are STUN.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import ForgetfulStorage
from rpcudp.protocol import RPCProtocol

from swarmd.dht import stun
from swarmd.dht.config import DhtConfig
from swarmd.dht.ratelimit import RateLimitedLog, SourceLimiter
from swarmd.dht.records import (
    RecordError,
    RecordStore,
    TokenIssuer,
    Unannounce,
    decode_record,
    topic_target,
)
from swarmd.node.supervisor import LOG, Supervisor

ID_SIZE = 20
REQUEST = 0x00
RESPONSE = 0x01
MAX_PENDING_STUN = 64
MAX_CONTACT_CHECKS = 16  # liveness pings of silent contacts in flight at once
MAX_STUN_ALTERNATES = 256  # alternate STUN ports remembered from other nodes' answers


def valid_ip(host: Any) -> bool:
    if not isinstance(host, str) or not 0 < len(host) <= 64:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def valid_port(port: Any) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and 0 < port <= 65535


def valid_id(node_id: Any) -> bool:
    return isinstance(node_id, bytes) and len(node_id) == ID_SIZE


def parse_contacts(raw: Any, limit: int) -> list[Node] | None:
    """Contacts from a find reply: a list of [id, ip, port]. None when the reply
    is not a list at all; malformed entries are dropped, the rest capped."""
    if not isinstance(raw, list):
        return None
    out: list[Node] = []
    seen: set[bytes] = set()
    for item in raw[: limit * 4]:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            continue
        nid, ip, port = item
        if valid_id(nid) and valid_ip(ip) and valid_port(port) and nid not in seen:
            seen.add(nid)
            out.append(Node(nid, ip, port))
            if len(out) >= limit:
                break
    return out


class SwarmdRoutingTable(RoutingTable):
    """kademlia's table with a correct k-closest search, owned ping tasks and a per-IP cap."""

    max_per_ip = 0  # contacts one non-loopback IP may hold (0: no cap); the protocol sets it from config
    ip_capped = 0  # contacts refused by that cap

    def find_neighbors(self, node: Node, k: int | None = None, exclude: Node | None = None) -> list[Node]:
        k = k or self.ksize
        index = self.get_bucket_for(node)
        if index is not None:
            self.buckets[index].touch_last_updated()
        candidates = (
            n
            for b in self.buckets
            for n in b.nodes.values()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        )
        return heapq.nsmallest(k, candidates, key=node.distance_to)

    def get_bucket_for(self, node: Node) -> int | None:
        # ranges are inclusive on both ends after a split; kademlia tests `<` the upper bound
        for index, bucket in enumerate(self.buckets):
            if node.long_id <= bucket.range[1]:
                return index
        return None

    def ip_full(self, node: Node) -> bool:
        """True when this node's IP already holds max_contacts_per_ip other ids here (loopback exempt)."""
        cap = self.max_per_ip
        if cap <= 0 or _is_loopback(node.ip):
            return False
        same = 0
        for b in self.buckets:
            for n in b.nodes.values():
                if n.ip == node.ip and n.id != node.id:
                    same += 1
                    if same >= cap:
                        return True
        return False

    def add_contact(self, node: Node) -> None:
        if self.ip_full(node):
            self.ip_capped += 1
            return
        index = self.get_bucket_for(node)
        if index is None:
            return
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.spawn(self.protocol.call_ping(bucket.head()), "dht-ping")

    def all_contacts(self) -> list[Node]:
        return [n for b in self.buckets for n in b.nodes.values()]


Handler = Callable[..., Any]


async def _settle(requests: list[asyncio.Future[Any]]) -> None:
    await asyncio.gather(*requests, return_exceptions=True)


class SwarmdProtocol(KademliaProtocol):
    """rpcudp/kademlia protocol with hostile-input handling and topic RPCs."""

    def __init__(
        self,
        source_node: Node,
        config: DhtConfig,
        bind: dict[str, Any] | None = None,
        tasks: Supervisor | None = None,
    ) -> None:
        """`tasks`: the scope its background work (pings, record hand-offs) runs in; failures
        there are logged, rate-limited, and never stop the node."""
        RPCProtocol.__init__(self, wait_timeout=config.request_timeout)
        self.config = config
        self.ksize = config.ksize
        self.router = SwarmdRoutingTable(self, config.ksize, source_node)
        self.router.max_per_ip = config.max_contacts_per_ip
        self.storage = ForgetfulStorage()
        self.source_node = source_node
        self.records = RecordStore(
            config.max_records_per_topic, config.max_records_per_source, config.max_records
        )
        self.tokens = TokenIssuer(config.token_rotation, time.time())
        self.rlog = RateLimitedLog(**(bind or {}))
        self.limiter = SourceLimiter(
            config.per_source_rate, config.per_source_burst, config.max_sources_tracked
        )
        self.ip_limiter = SourceLimiter(config.per_ip_rate, config.per_ip_burst, config.max_sources_tracked)
        self.client_mode = False
        self.last_seen: dict[bytes, float] = {}  # contact id -> monotonic time it last answered or asked
        self.dead: dict[bytes, float] = {}  # contact id -> monotonic time it timed out (not re-learned)
        self._checking: set[bytes] = set()
        self._check_budget = SourceLimiter(config.contact_checks_per_s, 4.0, 1)  # one bucket: all checks
        self.closed = asyncio.get_running_loop().create_future()
        owner = tasks if tasks is not None else Supervisor(name="dht", policy=LOG)
        self.tasks = owner.scope("protocol", LOG, report=self._report)
        self._stun_pending: dict[bytes, asyncio.Future[tuple[str, int]]] = {}
        # RFC 5780 style: a second socket that answers STUN only (see AltStunProtocol)
        self.stun_alt: asyncio.DatagramTransport | None = None
        self.stun_alt_port: int | None = None
        # alternate STUN ports other nodes named in their answers: (ip, port) -> alt port
        self.stun_alternates: dict[tuple[str, int], int] = {}
        self._handlers: dict[str, Handler] = {
            "ping": self.rpc_ping,
            "find_node": self.rpc_find_node,
            "topic_get": self.rpc_topic_get,
            "topic_put": self.rpc_topic_put,
            "topic_del": self.rpc_topic_del,
        }

    # -- task ownership ------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "dht-task") -> asyncio.Task[Any] | None:
        """Run a background coroutine in this protocol's scope (cancelled on close)."""
        if self.transport is None or self.transport.is_closing():
            coro.close()
            return None
        try:
            return self.tasks.spawn(coro, name)
        except RuntimeError:  # the scope is closed: we are stopping
            return None

    def _report(self, where: str, exc: BaseException) -> None:
        self.rlog.warn("task_error", "dht background task failed", task=where, error=f"{type(exc).__name__}: {exc}")

    def adopt(self, requests: list[asyncio.Future[Any]]) -> None:
        """Own requests already sent (a lookup's last ones), left to time out in this
        protocol's scope so that a silent contact is evicted; cancelled on close."""
        pending = [r for r in requests if not r.done()]
        if not pending:
            return
        if self.spawn(_settle(pending), "dht-lookup-tail") is None:
            for r in pending:
                r.cancel()

    async def aclose(self) -> None:
        await self.tasks.close()
        for fut, timer, _dest in list(self._outstanding.values()):
            timer.cancel()
            if not fut.done():
                fut.set_result((False, None))
        self._outstanding.clear()
        for fut in self._stun_pending.values():
            if not fut.done():
                fut.cancel()
        self._stun_pending.clear()
        if self.stun_alt is not None:
            self.stun_alt.close()
            self.stun_alt = None
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the request simply times out
        self.rlog.warn("socket_error", "dht socket error", error=str(exc))

    # -- datagram path -------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        # asyncio closes a datagram transport when this raises: nothing a peer
        # sends may get that far, whatever slipped past the typed checks below
        try:
            self._datagram(data, addr)
        except Exception as e:
            self.rlog.warn(
                "internal", "dropped datagram that broke its handler", error=f"{type(e).__name__}: {e}"[:160]
            )

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > self.config.max_datagram:
            self.rlog.warn("oversized", "dropped oversized datagram", size=len(data), source=addr[0])
            return
        if not _is_loopback(addr[0]) and not self.ip_limiter.allow(addr[0]):
            self.rlog.warn("flood_ip", "dropped datagram over the per-IP rate", source=addr[0])
            return
        if not self.limiter.allow(addr[:2]):
            self.rlog.warn(
                "flood", "dropped datagram over the per-source rate", source=f"{addr[0]}:{addr[1]}"
            )
            return
        if stun.looks_like_stun(data):
            self._on_stun(data, addr)
            return
        if len(data) < 22 or data[0] not in (REQUEST, RESPONSE):
            self.rlog.warn(
                "garbage", "dropped datagram that is neither rpc nor stun", size=len(data), source=addr[0]
            )
            return
        msg_id = data[1:21]
        try:
            body = msgpack.unpackb(
                data[21:],
                raw=False,
                strict_map_key=False,
                max_ext_len=0,
            )
        except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, StackError...
            self.rlog.warn(
                "undecodable", "dropped undecodable datagram", error=type(e).__name__, source=addr[0]
            )
            return
        if data[0] == RESPONSE:
            self._on_response(msg_id, body, addr)
        else:
            self._on_request(msg_id, body, addr)

    def _on_response(self, msg_id: bytes, body: Any, addr: tuple[str, int]) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is None:
            self.rlog.warn("unsolicited", "dropped response to no outstanding request", source=addr[0])
            return
        future, timer, dest = entry
        if (addr[0], addr[1]) != dest:
            self.rlog.warn("spoofed", "dropped response from another address than asked", source=addr[0])
            return
        timer.cancel()
        del self._outstanding[msg_id]
        if not future.done():
            future.set_result((True, body))

    def _on_request(self, msg_id: bytes, body: Any, addr: tuple[str, int]) -> None:
        if (
            not isinstance(body, list)
            or len(body) != 2
            or not isinstance(body[0], str)
            or not isinstance(body[1], list)
        ):
            self.rlog.warn("malformed", "dropped malformed rpc request", source=addr[0])
            return
        name, args = body
        handler = self._handlers.get(name)
        if handler is None:
            self.rlog.warn(
                "unknown_method", "dropped request for unknown dht method", method=name[:32], source=addr[0]
            )
            return
        try:
            result = handler((addr[0], addr[1]), *args)
        except (TypeError, ValueError, AttributeError) as e:
            self.rlog.warn(
                "bad_args", "dropped dht request with bad arguments", method=name, error=str(e)[:120]
            )
            return
        self._send(RESPONSE, msg_id, result, (addr[0], addr[1]))

    def _send(self, kind: int, msg_id: bytes, obj: Any, addr: tuple[str, int]) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        data = bytes([kind]) + msg_id + msgpack.packb(obj, use_bin_type=True)
        if len(data) > self.config.max_datagram:
            self.rlog.warn("reply_too_large", "refused to send datagram over the size cap", size=len(data))
            return False
        try:
            self.transport.sendto(data, addr)
        except (OSError, TypeError, ValueError) as e:
            self.rlog.warn("send_error", "dht send failed", error=str(e)[:120])
            return False
        return True

    # -- outgoing requests ---------------------------------------------------

    def _new_msg_id(self) -> bytes:
        while True:
            mid = os.urandom(ID_SIZE)
            if mid[3:7] != stun.COOKIE_BYTES:  # keep rpc datagrams distinguishable from STUN
                return mid

    def request(self, address: tuple[str, int], method: str, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        """Send one request; the future resolves to (True, result) or (False, None)
        after the configured timeout. Never raises for a bad address."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        if not (
            isinstance(address, (tuple, list))
            and len(address) == 2
            and valid_ip(address[0])
            and valid_port(address[1])
        ):
            future.set_result((False, None))
            return future
        dest = (address[0], address[1])
        msg_id = self._new_msg_id()
        if not self._send(REQUEST, msg_id, [method, list(args)], dest):
            future.set_result((False, None))
            return future
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer, dest)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

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

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        result = await self.ping((node_to_ask.ip, node_to_ask.port), self.wire_id)
        if result[0] and result[1] != node_to_ask.id:
            result = (False, None)  # another node now answers at that address
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        result = await self.find_node((node_to_ask.ip, node_to_ask.port), self.wire_id, node_to_find.id)
        if result[0]:
            contacts = parse_contacts(result[1], self.ksize)
            if contacts is None:
                self.rlog.warn("bad_reply", "find_node reply is not a contact list", peer=str(node_to_ask))
                result = (False, None)
            else:
                result = (True, [tuple(c) for c in self.not_dead(contacts)])
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        result = await self.store((node_to_ask.ip, node_to_ask.port), self.wire_id, key, value)
        return self.handle_call_response(result, node_to_ask)

    async def call_topic_get(self, node: Node, topic: bytes, token: bytes | None = None) -> tuple[bool, Any]:
        args: tuple[Any, ...] = (self.wire_id, topic) if token is None else (self.wire_id, topic, token)
        result = await self.request((node.ip, node.port), "topic_get", *args)
        if result[0] and not isinstance(result[1], dict):
            self.rlog.warn("bad_reply", "topic_get reply is not a map", peer=str(node))
            result = (False, None)
        return self.handle_call_response(result, node)

    async def call_topic_put(self, node: Node, token: bytes, record_wire: dict[str, Any]) -> bool:
        result = await self.request((node.ip, node.port), "topic_put", self.wire_id, token, record_wire)
        self.handle_call_response(result, node)
        return bool(result[0] and isinstance(result[1], dict) and result[1].get("ok") is True)

    async def call_topic_del(self, node: Node, token: bytes, un_wire: dict[str, Any]) -> bool:
        result = await self.request((node.ip, node.port), "topic_del", self.wire_id, token, un_wire)
        self.handle_call_response(result, node)
        return bool(result[0] and isinstance(result[1], dict) and result[1].get("ok") is True)

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
        for node in contacts:
            if len(self._checking) >= MAX_CONTACT_CHECKS:
                return
            if node.id in self._checking or now - self.last_seen.get(node.id, 0.0) < stale:
                continue
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
        exclude = Node(b"\x00" * ID_SIZE, sender[0], sender[1])
        nodes = self.router.find_neighbors(Node(key), exclude=exclude)
        self._check_stale(nodes)
        return [[n.id, n.ip, n.port] for n in nodes]

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
                record, now, cfg.max_payload, cfg.max_addresses, cfg.max_record_ttl, cfg.clock_skew
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

    # -- STUN -----------------------------------------------------------------

    def _on_stun(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = stun.parse_message(data)
        except ValueError as e:
            self.rlog.warn("bad_stun", "dropped malformed STUN message", error=str(e), source=addr[0])
            return
        if msg.msg_type == stun.BINDING_REQUEST:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(
                    stun.encode_binding_response(msg.transaction_id, (addr[0], addr[1]), self.stun_alt_port),
                    addr,
                )
        elif msg.msg_type == stun.BINDING_SUCCESS:
            fut = self._stun_pending.pop(msg.transaction_id, None)
            if fut is None or fut.done():
                return
            try:
                mapped = msg.mapped_address
                other = msg.other_port
            except ValueError:
                mapped, other = None, None
            if mapped is None:
                fut.cancel()
                return
            if other is not None and other != addr[1]:
                if len(self.stun_alternates) >= MAX_STUN_ALTERNATES:
                    self.stun_alternates.pop(next(iter(self.stun_alternates)))
                self.stun_alternates[(addr[0], addr[1])] = other
            fut.set_result(mapped)

    def stun_alt_request_ok(self, addr: tuple[str, int]) -> bool:
        """The alternate STUN socket applies the same per-IP and per-source limits."""
        if not _is_loopback(addr[0]) and not self.ip_limiter.allow(addr[0]):
            return False
        return self.limiter.allow(addr[:2])

    async def stun_request(
        self, address: tuple[str, int], wait: float | None = None
    ) -> tuple[str, int] | None:
        """Our reflexive address as seen by the node at address, or None."""
        if len(self._stun_pending) >= MAX_PENDING_STUN or self.transport is None:
            return None
        tid = stun.new_transaction_id()
        fut: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._stun_pending[tid] = fut
        try:
            self.transport.sendto(stun.encode_binding_request(tid), address)
            async with asyncio.timeout(wait or self._wait_timeout):
                return await fut
        except (TimeoutError, OSError, TypeError, ValueError):
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller was cancelled: never swallow that
            return None  # the answer's future was cancelled (no mapped address, or closing)
        finally:
            self._stun_pending.pop(tid, None)


class AltStunProtocol(asyncio.DatagramProtocol):
    """The DHT node's second UDP socket: answers STUN binding requests, nothing else.

    A client that knows one DHT node asks it on both ports; a NAT that maps each
    destination to a new port (symmetric) shows two mappings, a cone one. The main
    socket names this port in OTHER-ADDRESS. Same size in as out: no amplification.
    """

    def __init__(self, main: SwarmdProtocol) -> None:
        self.main = main
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            if not stun.looks_like_stun(data) or not self.main.stun_alt_request_ok(addr):
                return
            msg = stun.parse_message(data)
            if msg.msg_type == stun.BINDING_REQUEST and self.transport is not None:
                self.transport.sendto(stun.encode_binding_response(msg.transaction_id, (addr[0], addr[1])), addr)
        except ValueError as e:
            self.main.rlog.warn("bad_stun", "dropped malformed STUN message", error=str(e), source=addr[0])
        except Exception as e:  # asyncio closes the socket when this raises: never let a peer do that
            self.main.rlog.warn("internal", "dropped datagram that broke its handler", error=f"{type(e).__name__}: {e}"[:160])

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away: nothing to do


__all__ = ["AltStunProtocol", "SwarmdProtocol", "SwarmdRoutingTable", "parse_contacts"]
