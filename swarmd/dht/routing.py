"""Who we know on the DHT: contact validation, kademlia's routing table with
its neighbour search fixed, and the shortlist of closest nodes a lookup walks.

Every reply a lookup reads lists up to k contacts, and every request a node
serves asks for its k closest contacts to a key, so these run once per DHT
message on both sides; they are written for that (a flat snapshot of the
table for the k-closest search, a shortlist with O(1) membership, addresses
checked with ``inet_pton`` rather than ``ipaddress``).
"""

from __future__ import annotations

import bisect
import heapq
import socket
from collections.abc import Iterable, Iterator
from typing import Any

from kademlia.node import Node
from kademlia.routing import RoutingTable

ID_SIZE = 20


def _first(item: tuple[int, Node]) -> int:
    return item[0]


_MAX_NEAR_KEYS = 256  # keys whose k closest contacts a table keeps ranked

_KNOWN_IPS: set[str] = set()  # addresses valid_ip accepted: contacts repeat the same few
_MAX_KNOWN_IPS = 4096


_KNOWN_CONTACTS: dict[tuple[bytes, str, int], Node] = {}  # (id, ip, port) parse_contacts accepted
_MAX_KNOWN_CONTACTS = 8192


def valid_ip(host: Any) -> bool:
    """An IPv4 or IPv6 address literal (no names, no scope ids)."""
    if not isinstance(host, str):
        return False
    if host in _KNOWN_IPS:
        return True
    if not 0 < len(host) <= 64:
        return False
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    if len(_KNOWN_IPS) >= _MAX_KNOWN_IPS:
        _KNOWN_IPS.clear()  # bounded: a peer naming many addresses only costs inet_pton again
    _KNOWN_IPS.add(host)
    return True


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def valid_port(port: Any) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and 0 < port <= 65535


def valid_id(node_id: Any) -> bool:
    return isinstance(node_id, bytes) and len(node_id) == ID_SIZE


def parse_contacts(raw: Any, limit: int) -> list[Node] | None:
    """Contacts from a find reply: a list of [id, ip, port]. None when the reply
    is not a list at all; malformed entries are dropped, the rest capped.

    Replies name the same contacts again and again, so each valid one is built
    (and its id turned into an int) once and shared: nothing changes a Node."""
    if not isinstance(raw, list):
        return None
    out: list[Node] = []
    seen: set[bytes] = set()
    known = _KNOWN_CONTACTS
    for item in raw[: limit * 4]:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            continue
        nid, ip, port = item
        if type(nid) is bytes and type(ip) is str and type(port) is int:
            # exact types first: True == 1 and 1.0 == 1 must not find a known contact
            node = known.get((nid, ip, port))
            if node is not None:
                if nid not in seen:
                    seen.add(nid)
                    out.append(node)
                    if len(out) >= limit:
                        break
                continue
        if valid_id(nid) and valid_port(port) and nid not in seen and valid_ip(ip):
            seen.add(nid)
            node = Node(nid, ip, port)
            if len(known) >= _MAX_KNOWN_CONTACTS:
                known.clear()  # bounded: a peer naming many contacts only costs building them again
            known[(nid, ip, port)] = node
            out.append(node)
            if len(out) >= limit:
                break
    return out


class SwarmdRoutingTable(RoutingTable):
    """kademlia's table with a correct k-closest search, owned ping tasks and a per-IP cap."""

    max_per_ip = 0  # contacts one non-loopback IP may hold (0: no cap); the protocol sets it from config
    ip_capped = 0  # contacts refused by that cap

    def flush(self) -> None:
        super().flush()
        self._flat: list[tuple[int, Node]] | None = None
        self._keys: list[int] = []
        self._near: dict[bytes, tuple[int | None, list[Node], list[list[Any]], bool]] = {}

    def _changed(self) -> None:
        self._flat = None
        self._near.clear()

    def _contacts_flat(self) -> list[tuple[int, Node]]:
        """(long id, node) of every contact by id; rebuilt only after the table changed."""
        if self._flat is None:
            self._flat = sorted(((n.long_id, n) for b in self.buckets for n in b.nodes.values()), key=_first)
            self._keys = [lid for lid, _ in self._flat]
        return self._flat

    def _around(self, target: int, want: int) -> list[tuple[int, Node]]:
        """The contacts sharing the longest id prefix with target that still number at
        least `want` (all of them when fewer): every contact inside such a prefix is
        closer by XOR than any outside it, so the `want` closest are among these."""
        flat = self._contacts_flat()
        if len(flat) <= 4 * want:
            return flat
        keys = self._keys
        lo, hi = 0, len(flat)
        shortest, longest = 0, 160  # prefix lengths: 0 holds everyone
        while shortest < longest:
            m = (shortest + longest + 1) // 2
            shift = 160 - m
            base = (target >> shift) << shift
            i = bisect.bisect_left(keys, base)
            j = bisect.bisect_left(keys, base + (1 << shift), i)
            if j - i >= want:
                shortest, lo, hi = m, i, j
            else:
                longest = m - 1
        return flat[lo:hi]

    def _nearest(self, key: bytes, target: int) -> tuple[int | None, list[Node], list[list[Any]], bool]:
        """The k + 2 contacts closest to key (the key's own id left out), their [id, ip, port]
        wire form, its bucket's index, and whether the table held more than those. Kept per key
        until the table changes: a node answers the same few keys (the topics it serves, the ids
        newcomers look up) over and over, and each answer would rank the table again."""
        entry = self._near.get(key)
        if entry is None:
            want = self.ksize + 2
            index = None
            for i, bucket in enumerate(self.buckets):  # get_bucket_for, without a Node for the key
                if target <= bucket.range[1]:
                    index = i
                    break
            # distances of distinct ids differ, so the tuples never compare their nodes
            ranked = heapq.nsmallest(want, [(lid ^ target, n) for lid, n in self._around(target, want)])
            nodes = [n for dist, n in ranked if dist != 0]
            entry = (index, nodes, [[n.id, n.ip, n.port] for n in nodes], len(ranked) == want)
            if len(self._near) >= _MAX_NEAR_KEYS:
                self._near.clear()  # bounded: many distinct keys only cost the ranking again
            self._near[key] = entry
        return entry

    def closest(
        self, key: bytes, exclude: tuple[str, int] | None = None, k: int | None = None
    ) -> tuple[list[Node], list[list[Any]]]:
        """The k contacts closest to key (by XOR), none of them at address `exclude` nor
        with the key as id, and their [id, ip, port] wire form (shared lists: read only)."""
        k = k or self.ksize
        target = int.from_bytes(key, "big")
        if k <= self.ksize:
            index, nodes, wires, more = self._nearest(key, target)
        else:  # wider than the cache holds (not asked by the protocol): rank now
            ranked = heapq.nsmallest(k + 2, [(lid ^ target, n) for lid, n in self._around(target, k + 2)])
            index = self.get_bucket_for(Node(key))
            nodes = [n for dist, n in ranked if dist != 0]
            wires = [[n.id, n.ip, n.port] for n in nodes]
            more = len(ranked) == k + 2
        if index is not None:
            self.buckets[index].touch_last_updated()
        if exclude is None:
            return nodes[:k], wires[:k]
        ip, port = exclude
        keep = [i for i, n in enumerate(nodes) if n.port != port or n.ip != ip]
        if len(keep) == len(nodes):
            return nodes[:k], wires[:k]
        if len(keep) >= k or not more:
            keep = keep[:k]
            return [nodes[i] for i in keep], [wires[i] for i in keep]
        # more than two were excluded (one address holding several ids): the slow, exact way
        out = heapq.nsmallest(
            k,
            (n for _, n in self._contacts_flat()
             if n.id != key and (n.ip != ip or n.port != port)),
            key=lambda n: n.long_id ^ target,
        )  # fmt: skip
        return out, [[n.id, n.ip, n.port] for n in out]

    def find_neighbors(self, node: Node, k: int | None = None, exclude: Node | None = None) -> list[Node]:
        """The k contacts closest to node (by XOR), over all buckets: kademlia walks the
        buckets outwards and stops early, so at a few hundred contacts it returns too few."""
        return self.closest(node.id, None if exclude is None else (exclude.ip, exclude.port), k)[0]

    def get_bucket_for(self, node: Node) -> int | None:
        # ranges are inclusive on both ends after a split; kademlia tests `<` the upper bound
        for index, bucket in enumerate(self.buckets):
            if node.long_id <= bucket.range[1]:
                return index
        return None

    def ip_full(self, node: Node) -> bool:
        """True when this node's IP already holds max_contacts_per_ip other ids here (loopback exempt)."""
        cap = self.max_per_ip
        if cap <= 0 or is_loopback(node.ip):
            return False
        same = 0
        for _, n in self._contacts_flat():
            if n.ip == node.ip and n.id != node.id:
                same += 1
                if same >= cap:
                    return True
        return False

    def split_bucket(self, index: int) -> None:
        super().split_bucket(index)
        self._changed()

    def remove_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        if index is not None:
            self.buckets[index].remove_node(node)
            self._changed()

    def add_contact(self, node: Node) -> None:
        if self.ip_full(node):
            self.ip_capped += 1
            return
        index = self.get_bucket_for(node)
        if index is None:
            return
        bucket = self.buckets[index]
        if bucket.add_node(node):
            self._changed()
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self._changed()  # the newcomer waits among the bucket's replacement nodes
            self.protocol.spawn(self.protocol.call_ping(bucket.head()), "dht-ping")

    def all_contacts(self) -> list[Node]:
        return [n for _, n in self._contacts_flat()]


class Shortlist:
    """The nodes a lookup knows closest to its target, nearest first, at most
    `size` of them uncontacted-or-answered at a time (kademlia's NodeHeap, whose
    membership test and every read scan all nodes ever pushed).

    At most `per_ip` of them from one IP address (loopback exempt; 0: no cap), as
    in the routing table: ids are claimed, not proven, and each node that answers
    holds up to max_contacts_per_ip ids of one IP, so the union of several replies
    could otherwise give one address every place near a target (docs/dht.md)."""

    def __init__(self, target: Node, size: int, per_ip: int = 0) -> None:
        self.target = target.long_id
        self.size = size
        self.per_ip = per_ip
        self._ranked: list[tuple[int, bytes]] = []  # (distance, id), sorted
        self._nodes: dict[bytes, Node] = {}
        self._ips: dict[str, int] = {}  # held nodes per capped IP
        self.contacted: set[bytes] = set()
        self.ip_capped = 0  # ids refused: their IP already held per_ip places

    def push(self, nodes: Iterable[Node]) -> None:
        per_ip = self.per_ip
        for node in nodes:
            if node.id in self._nodes:
                continue
            dist = node.long_id ^ self.target
            if len(self._ranked) >= 4 * self.size and dist > self._ranked[-1][0]:
                continue  # far behind what we already hold: never among the closest
            if per_ip and not is_loopback(node.ip):
                held = self._ips.get(node.ip, 0)
                if held >= per_ip:
                    self.ip_capped += 1
                    continue
                self._ips[node.ip] = held + 1
            self._nodes[node.id] = node
            bisect.insort(self._ranked, (dist, node.id))
            if len(self._ranked) > 4 * self.size:
                self._forget(self._ranked.pop()[1])

    def _forget(self, nid: bytes) -> None:
        node = self._nodes.pop(nid)
        n = self._ips.get(node.ip)
        if n is not None:
            if n > 1:
                self._ips[node.ip] = n - 1
            else:
                del self._ips[node.ip]

    def remove(self, ids: Iterable[bytes]) -> None:
        gone = set(ids) & self._nodes.keys()
        if gone:
            self._ranked = [e for e in self._ranked if e[1] not in gone]
            for nid in gone:
                self._forget(nid)

    def mark_contacted(self, node: Node) -> None:
        self.contacted.add(node.id)

    def __iter__(self) -> Iterator[Node]:
        nodes = self._nodes
        return iter([nodes[nid] for _, nid in self._ranked[: self.size]])

    def __len__(self) -> int:
        return min(len(self._ranked), self.size)

    def __contains__(self, node: object) -> bool:
        return isinstance(node, Node) and node.id in self._nodes

    def get_uncontacted(self) -> list[Node]:
        nodes, contacted = self._nodes, self.contacted
        return [nodes[nid] for _, nid in self._ranked[: self.size] if nid not in contacted]

    def has_uncontacted(self) -> bool:
        contacted = self.contacted
        return any(nid not in contacted for _, nid in self._ranked[: self.size])


__all__ = [
    "Shortlist",
    "SwarmdRoutingTable",
    "is_loopback",
    "parse_contacts",
    "valid_id",
    "valid_ip",
    "valid_port",
]
