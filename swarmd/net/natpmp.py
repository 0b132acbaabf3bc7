"""NAT-PMP (RFC 6886), sans-IO: the requests a LAN host sends its router, and the answers.

A host asks the router on UDP 5351 for its external address (opcode 0) or to
map a port (opcode 1 UDP, 2 TCP) for a lifetime; a lifetime of 0 removes the
mapping. Every answer carries the router's epoch (seconds since its mapping
table started; a jump backwards means it rebooted and forgot our mappings).
The same port serves PCP (swarmd/net/pcp.py); a PCP server answers a NAT-PMP
request, and a NAT-PMP-only router answers a PCP request with "unsupported
version" in this format, which is how a client falls back.

Parsers raise ValueError with a sentence naming what was wrong.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
OPCODES = {"udp": OP_MAP_UDP, "tcp": OP_MAP_TCP}

RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized / refused",
    3: "network failure (the router has no external address)",
    4: "out of resources",
    5: "unsupported opcode",
}
RESULT_UNSUPPORTED_VERSION = 1
MAX_LIFETIME = 0xFFFFFFFF
RETRIES = (0.25, 0.5, 1.0)  # RFC 6886 3.1 starts at 250 ms and doubles; three tries are plenty on a LAN


@dataclass(frozen=True)
class ExternalAddress:
    epoch: int
    address: str


@dataclass(frozen=True)
class MapResult:
    protocol: str  # "udp" | "tcp"
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


class NatPmpError(ValueError):
    """The router answered with a non-zero result code (a well-formed refusal)."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"NAT-PMP result {code}: {RESULTS.get(code, 'unknown result code')}")


def _check_port(port: int, what: str, allow_zero: bool = False) -> None:
    if not isinstance(port, int) or not (0 if allow_zero else 1) <= port <= 0xFFFF:
        raise ValueError(f"{what} must be an integer port {'0' if allow_zero else '1'}..65535, got {port!r}")


def encode_external_address_request() -> bytes:
    return bytes([VERSION, OP_EXTERNAL_ADDRESS])


def encode_map_request(protocol: str, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A mapping request; lifetime 0 (with external_port 0) deletes it."""
    if protocol not in OPCODES:
        raise ValueError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
    _check_port(internal_port, "internal port")
    _check_port(external_port, "suggested external port", allow_zero=True)
    if not isinstance(lifetime, int) or not 0 <= lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime must be 0..{MAX_LIFETIME} seconds, got {lifetime!r}")
    return struct.pack("!BBHHHI", VERSION, OPCODES[protocol], 0, internal_port, external_port, lifetime)


def _header(data: bytes, opcode: int) -> tuple[int, int]:
    """(result code, epoch) of an answer to `opcode`, checked."""
    if len(data) < 4:
        raise ValueError(f"NAT-PMP answer is {len(data)} bytes, shorter than its 4-byte header")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise ValueError(f"NAT-PMP answer has version {version}, expected {VERSION}")
    if op != 128 + opcode:
        raise ValueError(f"NAT-PMP answer has opcode {op}, expected {128 + opcode} (answer to {opcode})")
    if result != 0:
        raise NatPmpError(result)
    if len(data) < 8:
        raise ValueError(f"NAT-PMP answer is {len(data)} bytes, too short for its epoch")
    return result, struct.unpack_from("!I", data, 4)[0]


def parse_external_address(data: bytes) -> ExternalAddress:
    _, epoch = _header(data, OP_EXTERNAL_ADDRESS)
    if len(data) != 12:
        raise ValueError(f"NAT-PMP external address answer is {len(data)} bytes, expected 12")
    addr = ipaddress.IPv4Address(data[8:12])
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise ValueError(f"NAT-PMP external address {addr} is not a usable unicast address")
    return ExternalAddress(epoch, str(addr))


def parse_map_response(data: bytes, protocol: str, internal_port: int) -> MapResult:
    """The answer to encode_map_request(protocol, internal_port, ...), checked against it."""
    if protocol not in OPCODES:
        raise ValueError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
    _, epoch = _header(data, OPCODES[protocol])
    if len(data) != 16:
        raise ValueError(f"NAT-PMP mapping answer is {len(data)} bytes, expected 16")
    iport, eport, lifetime = struct.unpack_from("!HHI", data, 8)
    if iport != internal_port:
        raise ValueError(f"NAT-PMP mapping answer is for internal port {iport}, we asked for {internal_port}")
    if lifetime and not eport:
        raise ValueError("NAT-PMP mapping answer grants a lifetime on external port 0")
    return MapResult(protocol, epoch, iport, eport, lifetime)
