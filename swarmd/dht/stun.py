"""Sans-IO STUN (RFC 5389) binding requests and responses.

DHT nodes answer STUN on their UDP port so a peer learns its reflexive
(public) address from nodes it already talks to, and any RFC 5389 client
can use any DHT node as their STUN server. Only what that needs is here:
Binding request/success, XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, FINGERPRINT,
and RFC 5780's OTHER-ADDRESS: a DHT node also answers STUN on a second UDP
port and names it there, so a client that knows a single DHT node can still
ask two endpoints and tell a cone from a symmetric NAT. Only the port of
OTHER-ADDRESS is used; its IP is the one the client asked (a node bound to a
wildcard does not know which of its addresses the client reached).
The NAT traversal layer builds on ``encode_*``/``parse_message``.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import struct
from dataclasses import dataclass, field

MAGIC_COOKIE = 0x2112A442
COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E
MAX_MESSAGE = 1024  # a binding request/response is < 100 bytes; anything far larger is refused

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_OTHER_ADDRESS = 0x802C  # RFC 5780: where the server answers from its alternate port

FAMILY_V4 = 0x01
FAMILY_V6 = 0x02


def looks_like_stun(datagram: bytes) -> bool:
    """Cheap demultiplexing test: the two top bits are zero, the magic cookie
    sits at bytes 4..8 and the length field matches. rpcudp datagrams put a
    random message id there, so a collision is a 2**-32 event (and our own
    message ids are generated to never collide)."""
    if len(datagram) < HEADER_LENGTH or len(datagram) > MAX_MESSAGE:
        return False
    if datagram[0] & 0xC0 or datagram[4:8] != COOKIE_BYTES:
        return False
    (length,) = struct.unpack_from("!H", datagram, 2)
    return length % 4 == 0 and HEADER_LENGTH + length == len(datagram)


@dataclass
class StunMessage:
    """A parsed STUN message: type, transaction id and raw attributes."""

    msg_type: int
    transaction_id: bytes
    attributes: dict[int, bytes] = field(default_factory=dict)

    @property
    def mapped_address(self) -> tuple[str, int] | None:
        """The reflexive address in the response (XOR-MAPPED preferred)."""
        raw = self.attributes.get(ATTR_XOR_MAPPED_ADDRESS)
        if raw is not None:
            return _unpack_address(raw, self.transaction_id, xor=True)
        raw = self.attributes.get(ATTR_MAPPED_ADDRESS)
        if raw is not None:
            return _unpack_address(raw, self.transaction_id, xor=False)
        return None

    @property
    def other_port(self) -> int | None:
        """The server's alternate STUN port (RFC 5780 OTHER-ADDRESS), or None."""
        raw = self.attributes.get(ATTR_OTHER_ADDRESS)
        if raw is None:
            return None
        _host, port = _unpack_address(raw, self.transaction_id, xor=False)
        if not 0 < port <= 65535:
            raise ValueError(f"STUN OTHER-ADDRESS port {port} is not 1..65535")
        return port


def new_transaction_id() -> bytes:
    return os.urandom(12)


def _pack_attrs(attrs: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for attr_type, value in attrs:
        out += struct.pack("!HH", attr_type, len(value)) + value
        out += b"\x00" * (-len(value) % 4)
    return bytes(out)


def _finish(msg_type: int, transaction_id: bytes, attrs: list[tuple[int, bytes]], fingerprint: bool) -> bytes:
    body = _pack_attrs(attrs)
    if not fingerprint:
        return struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + transaction_id + body
    # the CRC covers the header with a length that already counts the fingerprint attribute
    head = struct.pack("!HHI", msg_type, len(body) + 8, MAGIC_COOKIE) + transaction_id
    crc = (binascii.crc32(head + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return head + body + struct.pack("!HHI", ATTR_FINGERPRINT, 4, crc)


def encode_binding_request(transaction_id: bytes, fingerprint: bool = False) -> bytes:
    if len(transaction_id) != 12:
        raise ValueError(f"STUN transaction id must be 12 bytes, got {len(transaction_id)}")
    return _finish(BINDING_REQUEST, transaction_id, [], fingerprint)


def encode_binding_response(
    transaction_id: bytes, address: tuple[str, int], other_port: int | None = None
) -> bytes:
    """Success response carrying the requester's address as XOR-MAPPED-ADDRESS
    (and MAPPED-ADDRESS for RFC 3489 clients); with other_port, an OTHER-ADDRESS
    naming the port this server also answers on (IP 0.0.0.0: "the one you asked")."""
    xor = _pack_address(address, transaction_id, xor=True)
    plain = _pack_address(address, transaction_id, xor=False)
    attrs = [(ATTR_XOR_MAPPED_ADDRESS, xor), (ATTR_MAPPED_ADDRESS, plain)]
    if other_port is not None:
        if not 0 < other_port <= 65535:
            raise ValueError(f"STUN alternate port must be 1..65535, got {other_port}")
        attrs.append((ATTR_OTHER_ADDRESS, _pack_address(("0.0.0.0", other_port), transaction_id, xor=False)))
    attrs.append((ATTR_SOFTWARE, b"swarmd"))
    return _finish(BINDING_SUCCESS, transaction_id, attrs, fingerprint=True)


def parse_message(data: bytes) -> StunMessage:
    """Parse a STUN message; raises ValueError with the reason on malformed input."""
    if len(data) < HEADER_LENGTH:
        raise ValueError(f"STUN message shorter than its 20-byte header ({len(data)} bytes)")
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"STUN message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    msg_type, length, cookie = struct.unpack_from("!HHI", data, 0)
    if msg_type & 0xC000:
        raise ValueError("STUN message type has its two top bits set")
    if cookie != MAGIC_COOKIE:
        raise ValueError("STUN magic cookie missing")
    if HEADER_LENGTH + length != len(data) or length % 4:
        raise ValueError("STUN message length does not match the datagram")
    tid = data[8:20]
    attrs: dict[int, bytes] = {}
    pos = HEADER_LENGTH
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError("STUN attribute header truncated")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        start = pos + 4
        end = start + attr_len
        if end > len(data):
            raise ValueError("STUN attribute value runs past the message end")
        if attr_type == ATTR_FINGERPRINT:
            if attr_len != 4:
                raise ValueError("STUN FINGERPRINT must be 4 bytes")
            head = data[:2] + struct.pack("!H", end - HEADER_LENGTH) + data[4:pos]
            expected = (binascii.crc32(head) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack_from("!I", data, start)[0] != expected:
                raise ValueError("STUN FINGERPRINT does not match the message")
        attrs.setdefault(attr_type, data[start:end])
        pos = end + (-attr_len % 4)
    return StunMessage(msg_type, tid, attrs)


def _pack_address(address: tuple[str, int], tid: bytes, xor: bool) -> bytes:
    host, port = address
    ip = ipaddress.ip_address(host)
    raw = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = COOKIE_BYTES + tid
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    family = FAMILY_V4 if ip.version == 4 else FAMILY_V6
    return struct.pack("!BBH", 0, family, port) + raw


def _unpack_address(raw: bytes, tid: bytes, xor: bool) -> tuple[str, int]:
    if len(raw) < 4:
        raise ValueError("STUN address attribute shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", raw, 0)
    want = {FAMILY_V4: 4, FAMILY_V6: 16}.get(family)
    if want is None:
        raise ValueError(f"STUN address family {family} is neither IPv4 (1) nor IPv6 (2)")
    addr = raw[4:]
    if len(addr) != want:
        raise ValueError(f"STUN address of family {family} must be {want} bytes, got {len(addr)}")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = COOKIE_BYTES + tid
        addr = bytes(a ^ b for a, b in zip(addr, mask, strict=False))
    return str(ipaddress.ip_address(addr)), port
