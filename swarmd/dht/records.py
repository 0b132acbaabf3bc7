"""Signed, expiring, multi-value topic records (sans-IO).

A topic is a 32-byte hash of a name (an HMAC with a shared secret for a private
swarm). Many peers announce under one topic; each announcement is a record
signed by the announcing peer's Ed25519 key, so a DHT node storing it cannot
forge or alter it, only drop it. A record says where to reach the peer
(addresses) and carries a small msgpack payload the roles use (worker state and
load, store digests, relay/signalling info).

Nothing here touches a socket or a clock: callers pass ``now`` so expiry,
caps and token rotation are testable and fuzzable without a network.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarmd.dht.routing import valid_ip
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    ERR_FORBIDDEN,
    ERR_OVERLOADED,
    ERR_TOO_LARGE,
    SwarmdError,
)
from swarmd.node.identity import Identity, verify

TOPIC_SIZE = 32
KEY_SIZE = 32
SIG_SIZE = 64
TOKEN_SIZE = 16
RECORD_DOMAIN = b"swarmd/record/v1\x00"
UNANNOUNCE_DOMAIN = b"swarmd/unannounce/v1\x00"
TOPIC_DOMAIN = b"swarmd/topic/v1\x00"
MAX_HOST_LEN = 64
MAX_SEQ = 2**63 - 1


class RecordError(SwarmdError):
    """A record or unannouncement a peer sent was refused; code says why."""


def topic_from_name(name: str | bytes, secret: bytes | None = None) -> bytes:
    """32-byte topic of a name. With a secret, outsiders who know the name but
    not the secret can neither find nor join the private swarm's topic."""
    raw = name.encode() if isinstance(name, str) else bytes(name)
    if secret:
        return hmac.new(secret, TOPIC_DOMAIN + raw, hashlib.sha256).digest()
    return hashlib.sha256(TOPIC_DOMAIN + raw).digest()


def topic_target(topic: bytes) -> bytes:
    """The 160-bit DHT key a topic's records live near (kademlia ids are 160 bits)."""
    return topic[:20]


@dataclass(frozen=True)
class PeerRecord:
    """One peer's signed announcement under one topic."""

    topic: bytes
    public_key: bytes
    addresses: tuple[tuple[str, int], ...]
    payload: dict[str, Any]
    seq: int
    expiry_ms: int
    signature: bytes
    payload_bytes: bytes = field(repr=False, default=b"")

    @property
    def expiry(self) -> float:
        return self.expiry_ms / 1000.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.topic,
            "k": self.public_key,
            "a": [[h, p] for h, p in self.addresses],
            "p": self.payload_bytes,
            "s": self.seq,
            "e": self.expiry_ms,
            "g": self.signature,
        }


def signing_bytes(
    topic: bytes,
    public_key: bytes,
    addresses: tuple[tuple[str, int], ...],
    payload_bytes: bytes,
    seq: int,
    expiry_ms: int,
) -> bytes:
    """Exact bytes a record's signature covers (documented in docs/dht.md)."""
    out = bytearray(RECORD_DOMAIN)
    out += topic + public_key + struct.pack("!QQB", seq, expiry_ms, len(addresses))
    for host, port in addresses:
        hb = host.encode()
        out += struct.pack("!B", len(hb)) + hb + struct.pack("!H", port)
    out += struct.pack("!I", len(payload_bytes)) + payload_bytes
    return bytes(out)


def unannounce_bytes(topic: bytes, public_key: bytes, seq: int) -> bytes:
    return UNANNOUNCE_DOMAIN + topic + public_key + struct.pack("!Q", seq)


def _check_addresses(addresses: Any, max_addresses: int) -> tuple[tuple[str, int], ...]:
    if not isinstance(addresses, (list, tuple)):
        raise RecordError(ERR_BAD_REQUEST, "record addresses must be a list of [host, port]")
    if len(addresses) > max_addresses:
        raise RecordError(
            ERR_TOO_LARGE, f"record has {len(addresses)} addresses, at most {max_addresses} allowed"
        )
    out = []
    for item in addresses:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise RecordError(ERR_BAD_REQUEST, "each record address must be [host, port]")
        host, port = item
        if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_LEN:
            raise RecordError(
                ERR_BAD_REQUEST, f"record address host must be a string of 1..{MAX_HOST_LEN} chars"
            )
        if not valid_ip(host):
            raise RecordError(ERR_BAD_REQUEST, f"record address host {host[:64]!r} is not an IP address")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
            raise RecordError(ERR_BAD_REQUEST, "record address port must be an integer in 1..65535")
        out.append((host, port))
    return tuple(out)


def _unpack_payload(payload_bytes: bytes, max_payload: int) -> dict[str, Any]:
    if len(payload_bytes) > max_payload:
        raise RecordError(
            ERR_TOO_LARGE, f"record payload is {len(payload_bytes)} bytes, the cap is {max_payload}"
        )
    if not payload_bytes:
        return {}
    try:
        payload = msgpack.unpackb(
            payload_bytes,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_payload,
            max_str_len=max_payload,
            max_array_len=max_payload,
            max_map_len=max_payload,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise RecordError(
            ERR_BAD_REQUEST, f"record payload is not valid msgpack: {type(e).__name__}"
        ) from None
    if not isinstance(payload, dict):
        raise RecordError(ERR_BAD_REQUEST, "record payload must be a msgpack map")
    return payload


def make_record(
    identity: Identity,
    topic: bytes,
    addresses: list[tuple[str, int]] | tuple[tuple[str, int], ...],
    payload: dict[str, Any] | None,
    seq: int,
    ttl: float,
    now: float,
    max_payload: int = 2048,
    max_addresses: int = 8,
) -> PeerRecord:
    """Sign an announcement. Raises RecordError when it would be refused by
    peers (too large, bad address), so the caller learns it locally."""
    if len(topic) != TOPIC_SIZE:
        raise RecordError(ERR_BAD_REQUEST, f"topic must be {TOPIC_SIZE} bytes, got {len(topic)}")
    addrs = _check_addresses([list(a) for a in addresses], max_addresses)
    payload_bytes = msgpack.packb(payload or {}, use_bin_type=True) if payload else b""
    _unpack_payload(payload_bytes, max_payload)
    expiry_ms = int((now + ttl) * 1000)
    pk = identity.public_key
    sig = identity.sign(signing_bytes(topic, pk, addrs, payload_bytes, seq, expiry_ms))
    return PeerRecord(topic, pk, addrs, dict(payload or {}), seq, expiry_ms, sig, payload_bytes)


def _bytes_field(obj: dict[str, Any], key: str, size: int, what: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise RecordError(ERR_BAD_REQUEST, f"record {what} must be {size} bytes")
    return value


def _int_field(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise RecordError(ERR_BAD_REQUEST, f"record {what} must be an integer in 0..2**63-1")
    return value


def _signed_fields(obj: Any, what: str) -> tuple[bytes, bytes, bytes, int]:
    """(topic, public key, signature, seq) of a record or an unannounce map."""
    if not isinstance(obj, dict):
        raise RecordError(ERR_BAD_REQUEST, f"{what} must be a map")
    return (_bytes_field(obj, "t", TOPIC_SIZE, "topic"), _bytes_field(obj, "k", KEY_SIZE, "public key"),
            _bytes_field(obj, "g", SIG_SIZE, "signature"), _int_field(obj, "s", "seq"))


class VerifiedCache:
    """Signatures this node already verified, by a digest of the signed bytes and the
    signature together: a record a lookup meets again (the same record from each of
    the k closest nodes, a topic looked up every few seconds) costs a hash, not an
    Ed25519 verify (~0.1-0.2 ms here). Only successes are kept; bounded, oldest out."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: dict[bytes, None] = {}

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        key = hashlib.blake2b(signature + message, digest_size=16).digest()
        if key in self._seen:
            return True
        if not verify(public_key, message, signature):
            return False
        if len(self._seen) >= self.size:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = None
        return True


def decode_record(
    obj: Any,
    now: float,
    max_payload: int = 2048,
    max_addresses: int = 8,
    max_ttl: float = 1800.0,
    skew: float = 60.0,
    verified: VerifiedCache | None = None,
) -> PeerRecord:
    """Validate a record received from a peer. Checks types, sizes, expiry and
    the signature (through `verified` when given); raises RecordError with a
    stable code otherwise."""
    topic, pk, sig, seq = _signed_fields(obj, "record")
    expiry_ms = _int_field(obj, "e", "expiry")
    addrs = _check_addresses(obj.get("a"), max_addresses)
    payload_bytes = obj.get("p", b"")
    if not isinstance(payload_bytes, bytes):
        raise RecordError(ERR_BAD_REQUEST, "record payload must be msgpack bytes")
    payload = _unpack_payload(payload_bytes, max_payload)
    now_ms = int(now * 1000)
    if expiry_ms <= now_ms:
        raise RecordError(ERR_BAD_REQUEST, "record expired")
    if expiry_ms > now_ms + int((max_ttl + skew) * 1000):
        raise RecordError(ERR_BAD_REQUEST, f"record expiry is more than {max_ttl + skew:.0f} s in the future")
    message = signing_bytes(topic, pk, addrs, payload_bytes, seq, expiry_ms)
    if not (verified.verify(pk, message, sig) if verified is not None else verify(pk, message, sig)):
        raise RecordError(ERR_FORBIDDEN, "record signature does not verify against its public key")
    return PeerRecord(topic, pk, addrs, payload, seq, expiry_ms, sig, payload_bytes)


@dataclass(frozen=True)
class Unannounce:
    """A signed request to drop a peer's record for a topic (seq >= stored)."""

    topic: bytes
    public_key: bytes
    seq: int
    signature: bytes

    @classmethod
    def make(cls, identity: Identity, topic: bytes, seq: int) -> Unannounce:
        pk = identity.public_key
        return cls(topic, pk, seq, identity.sign(unannounce_bytes(topic, pk, seq)))

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.topic, "k": self.public_key, "s": self.seq, "g": self.signature}

    @classmethod
    def from_wire(cls, obj: Any) -> Unannounce:
        topic, pk, sig, seq = _signed_fields(obj, "unannounce")
        if not verify(pk, unannounce_bytes(topic, pk, seq), sig):
            raise RecordError(ERR_FORBIDDEN, "unannounce signature does not verify against its public key")
        return cls(topic, pk, seq, sig)


@dataclass
class _Stored:
    record: PeerRecord
    source: str
    wire_size: int


class RecordStore:
    """Records a DHT node holds for others, with caps so one source or one
    topic cannot fill memory: per topic, per source address, and in total.
    A full topic admits a newcomer by evicting from its largest source (fair
    shares), so a few addresses cannot keep new peers out of a topic."""

    def __init__(self, max_per_topic: int = 256, max_per_source: int = 64, max_total: int = 20_000) -> None:
        self.max_per_topic = max_per_topic
        self.max_per_source = max_per_source
        self.max_total = max_total
        self._topics: dict[bytes, dict[bytes, _Stored]] = {}
        self._per_source: Counter[str] = Counter()
        self._total = 0
        self.evicted = 0  # records dropped from a full topic to admit another source's

    def __len__(self) -> int:
        return self._total

    def topics(self) -> list[bytes]:
        return list(self._topics)

    def put(self, record: PeerRecord, source: str, now: float) -> None:
        """Store or replace (newer seq wins). source is the sender's IP."""
        if record.expiry_ms <= int(now * 1000):
            raise RecordError(ERR_BAD_REQUEST, "record expired")
        bucket = self._topics.get(record.topic)
        old = bucket.get(record.public_key) if bucket else None
        if old is not None:
            if record.seq < old.record.seq:
                raise RecordError(
                    ERR_CONFLICT, f"record seq {record.seq} is older than the stored {old.record.seq}"
                )
            if record.seq == old.record.seq and record.signature != old.record.signature:
                # same seq, other content: keep the first, the announcer bumps seq on change
                if record.expiry_ms <= old.record.expiry_ms:
                    raise RecordError(
                        ERR_CONFLICT, f"record seq {record.seq} already stored with other content"
                    )
        else:
            if self._total >= self.max_total:
                self.expire(now)
                if self._total >= self.max_total:
                    raise RecordError(ERR_OVERLOADED, f"node holds its cap of {self.max_total} records")
            if bucket is not None and len(bucket) >= self.max_per_topic:
                self._expire_topic(record.topic, now)
                if len(bucket) >= self.max_per_topic and not self._evict_for(record.topic, bucket, source):
                    raise RecordError(ERR_OVERLOADED, f"topic holds its cap of {self.max_per_topic} records")
            if self._per_source[source] >= self.max_per_source:
                self.expire(now)
                if self._per_source[source] >= self.max_per_source:
                    raise RecordError(
                        ERR_OVERLOADED, f"source holds its cap of {self.max_per_source} records"
                    )
        size = len(msgpack.packb(record.to_wire(), use_bin_type=True))
        if bucket is None:
            bucket = self._topics[record.topic] = {}
        if old is not None:
            self._drop(record.topic, record.public_key)
            bucket = self._topics.setdefault(record.topic, {})
        bucket[record.public_key] = _Stored(record, source, size)
        self._per_source[source] += 1
        self._total += 1

    def _evict_for(self, topic: bytes, bucket: dict[bytes, _Stored], source: str) -> bool:
        """Make room in a full topic for a record from `source` by dropping one of the
        source holding the most records there, if that is fairer (it holds at least two
        more than `source`). A few addresses that filled a topic then cannot keep a new
        peer out: each source's share shrinks towards an equal one as others arrive.
        The dropped record is the one expiring first."""
        held: Counter[str] = Counter(st.source for st in bucket.values())
        biggest, most = held.most_common(1)[0]
        if most < held.get(source, 0) + 2:
            return False
        victim = min(
            (pk for pk, st in bucket.items() if st.source == biggest), key=lambda pk: bucket[pk].record.expiry_ms
        )
        self._drop(topic, victim)
        self.evicted += 1
        return True

    def _drop(self, topic: bytes, pk: bytes) -> None:
        bucket = self._topics.get(topic)
        if not bucket or pk not in bucket:
            return
        st = bucket.pop(pk)
        self._per_source[st.source] -= 1
        if self._per_source[st.source] <= 0:
            del self._per_source[st.source]
        self._total -= 1
        if not bucket:
            del self._topics[topic]

    def remove(self, un: Unannounce) -> bool:
        """Apply a verified unannouncement; True when a record was dropped."""
        bucket = self._topics.get(un.topic)
        st = bucket.get(un.public_key) if bucket else None
        if st is None or st.record.seq > un.seq:
            return False
        self._drop(un.topic, un.public_key)
        return True

    def _expire_topic(self, topic: bytes, now: float) -> None:
        now_ms = int(now * 1000)
        for pk, st in list(self._topics.get(topic, {}).items()):
            if st.record.expiry_ms <= now_ms:
                self._drop(topic, pk)

    def expire(self, now: float) -> int:
        before = self._total
        for topic in list(self._topics):
            self._expire_topic(topic, now)
        return before - self._total

    def wire_size(self, topic: bytes, now: float) -> int:
        """Total wire bytes of a topic's unexpired records."""
        self._expire_topic(topic, now)
        return sum(st.wire_size for st in self._topics.get(topic, {}).values())

    def get(self, topic: bytes, now: float, budget: int = 48_000) -> list[PeerRecord]:
        """Unexpired records of a topic whose wire size fits in budget bytes.
        When they do not all fit, a random subset is returned so the k nodes a
        lookup asks tend to return different subsets and the union grows."""
        self._expire_topic(topic, now)
        items = list(self._topics.get(topic, {}).values())
        total = sum(st.wire_size for st in items)
        if total > budget:
            rnd = list(items)
            random.shuffle(rnd)
            items = []
            used = 0
            for st in rnd:
                if used + st.wire_size > budget:
                    continue
                items.append(st)
                used += st.wire_size
        return [st.record for st in items]


_MAX_ISSUED = 4096  # addresses whose current token a TokenIssuer keeps


class TokenIssuer:
    """Write tokens bound to the sender's address: a store must present a
    token the node handed to that same (ip, port) in a recent lookup reply, so
    a spoofed source address cannot store (it never sees the token). Two
    secrets rotate so a token stays valid for one to two rotation periods."""

    def __init__(self, rotation: float, now: float) -> None:
        self.rotation = rotation
        self._secrets = [os.urandom(32), os.urandom(32)]
        self._rotated_at = now
        # address -> its token under the current secret: every lookup reply carries one, and
        # the same askers come back within a rotation (an HMAC per reply otherwise)
        self._issued: dict[tuple[str, int], bytes] = {}

    def _rotate(self, now: float) -> None:
        if now - self._rotated_at >= self.rotation:
            steps = 2 if now - self._rotated_at >= 2 * self.rotation else 1
            for _ in range(steps):
                self._secrets = [os.urandom(32), self._secrets[0]]
            self._rotated_at = now
            self._issued = {}

    @staticmethod
    def _mac(secret: bytes, addr: tuple[str, int]) -> bytes:
        # keyed BLAKE2b is a MAC by design; HMAC-SHA256 through OpenSSL 3 fetched its digest
        # by name on every call, ~20-30 us in a busy loop (a lookup reply carries a token)
        msg = f"{addr[0]}|{addr[1]}".encode()
        return hashlib.blake2b(msg, key=secret, digest_size=TOKEN_SIZE).digest()

    def issue(self, addr: tuple[str, int], now: float) -> bytes:
        self._rotate(now)
        token = self._issued.get(addr)
        if token is None:
            token = self._mac(self._secrets[0], addr)
            if len(self._issued) >= _MAX_ISSUED:
                self._issued = {}  # bounded: many askers only cost the HMAC again
            self._issued[addr] = token
        return token

    def check(self, token: Any, addr: tuple[str, int], now: float) -> bool:
        if not isinstance(token, bytes) or len(token) != TOKEN_SIZE:
            return False
        self._rotate(now)
        current = self._issued.get(addr)
        if current is not None and hmac.compare_digest(token, current):
            return True
        return any(hmac.compare_digest(token, self._mac(s, addr)) for s in self._secrets)
