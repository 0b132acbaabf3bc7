"""PCP (RFC 6887), sans-IO: the MAP request a LAN host sends its router, and the answer.

PCP is NAT-PMP's successor on the same UDP port 5351 (swarmd/net/natpmp.py):
a 24-byte common header (version 2, opcode, requested lifetime, the client's
own address as an IPv4-mapped IPv6 address) and, for MAP, a 36-byte body with
a random 12-byte nonce that names the mapping (renewals and the delete repeat
it), the protocol, the internal port and a suggested external port/address.
The answer repeats the nonce and names the assigned external address and port.
A router that only speaks NAT-PMP answers version 2 with a NAT-PMP "unsupported
version" (first byte 0): `is_natpmp_answer` tells the client to fall back.

Parsers raise ValueError with a sentence naming what was wrong; options after
the MAP body are skipped (bounded: an answer is at most 1100 bytes).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass

PORT = 5351
VERSION = 2
OP_MAP = 1
PROTOCOLS = {"tcp": 6, "udp": 17}
MAX_ANSWER = 1100  # RFC 6887 7: PCP messages are at most 1100 bytes
HEADER = 24
MAP_BODY = 36
NONCE_SIZE = 12

RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide the external address/port",
    12: "address mismatch (the router saw another source address)",
    13: "excessive remote peers",
}
RESULT_UNSUPPORTED_VERSION = 1


@dataclass(frozen=True)
class MapResult:
    nonce: bytes
    protocol: str  # "udp" | "tcp"
    internal_port: int
    external_port: int
    external_address: str
    lifetime: int
    epoch: int


class PcpError(ValueError):
    """The router answered with a non-zero result code (a well-formed refusal)."""

    def __init__(self, code: int, lifetime: int = 0) -> None:
        self.code = code
        self.lifetime = lifetime  # for errors: how long the router says the condition lasts
        super().__init__(f"PCP result {code}: {RESULTS.get(code, 'unknown result code')}")


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _mapped(address: str) -> bytes:
    """An IPv4 address as the IPv4-mapped IPv6 address PCP carries (::ffff:a.b.c.d)."""
    try:
        v4 = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"PCP client address must be an IPv4 address, got {address!r}") from None
    return b"\x00" * 10 + b"\xff\xff" + v4.packed


def encode_map_request(
    nonce: bytes, protocol: str, client_address: str, internal_port: int, external_port: int, lifetime: int,
    external_address: str = "0.0.0.0",
) -> bytes:
    """A MAP request; lifetime 0 (same nonce) deletes the mapping."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"PCP nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
    if not isinstance(internal_port, int) or not 1 <= internal_port <= 0xFFFF:
        raise ValueError(f"internal port must be 1..65535, got {internal_port!r}")
    if not isinstance(external_port, int) or not 0 <= external_port <= 0xFFFF:
        raise ValueError(f"suggested external port must be 0..65535, got {external_port!r}")
    if not isinstance(lifetime, int) or not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime must be 0..4294967295 seconds, got {lifetime!r}")
    header = struct.pack("!BBHI", VERSION, OP_MAP, 0, lifetime) + _mapped(client_address)
    body = nonce + struct.pack("!B3xHH", PROTOCOLS[protocol], internal_port, external_port) + _mapped(external_address)
    return header + body


def is_natpmp_answer(data: bytes) -> bool:
    """A NAT-PMP-only router's "unsupported version" answer to a PCP request."""
    return len(data) >= 4 and data[0] == 0 and struct.unpack_from("!H", data, 2)[0] == RESULT_UNSUPPORTED_VERSION


def _unmapped(raw: bytes) -> str:
    if raw[:12] != b"\x00" * 10 + b"\xff\xff":
        raise ValueError(f"PCP external address {ipaddress.IPv6Address(raw)} is not an IPv4-mapped address")
    return str(ipaddress.IPv4Address(raw[12:]))


def parse_map_response(data: bytes, nonce: bytes, protocol: str, internal_port: int) -> MapResult:
    """The answer to our MAP request with this nonce, checked against what we asked."""
    if len(data) > MAX_ANSWER:
        raise ValueError(f"PCP answer is {len(data)} bytes, more than {MAX_ANSWER}")
    if len(data) < HEADER:
        raise ValueError(f"PCP answer is {len(data)} bytes, shorter than its {HEADER}-byte header")
    version, r_op, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != VERSION:
        raise ValueError(f"PCP answer has version {version}, expected {VERSION}")
    if not r_op & 0x80:
        raise ValueError("PCP message is a request, not an answer (R bit clear)")
    if r_op & 0x7F != OP_MAP:
        raise ValueError(f"PCP answer has opcode {r_op & 0x7F}, expected MAP ({OP_MAP})")
    if result != 0:
        raise PcpError(result, lifetime)
    if len(data) < HEADER + MAP_BODY:
        raise ValueError(f"PCP MAP answer is {len(data)} bytes, shorter than header + MAP body ({HEADER + MAP_BODY})")
    if (len(data) - HEADER - MAP_BODY) % 4:
        raise ValueError("PCP answer options are not a multiple of 4 bytes")
    body = data[HEADER : HEADER + MAP_BODY]
    if body[:NONCE_SIZE] != nonce:
        raise ValueError("PCP answer carries another mapping nonce than ours")
    proto, iport, eport = struct.unpack_from("!B3xHH", body, NONCE_SIZE)
    if proto != PROTOCOLS.get(protocol):
        raise ValueError(f"PCP answer is for protocol {proto}, we asked for {protocol}")
    if iport != internal_port:
        raise ValueError(f"PCP answer is for internal port {iport}, we asked for {internal_port}")
    address = _unmapped(body[20:36])
    if lifetime:
        if not eport:
            raise ValueError("PCP answer grants a lifetime on external port 0")
        if ipaddress.IPv4Address(address).is_unspecified:
            raise ValueError("PCP answer grants a mapping on external address 0.0.0.0")
    return MapResult(nonce, protocol, iport, eport, address, lifetime, epoch)
