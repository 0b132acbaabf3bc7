"""gRPC over HTTP/2 (PROTOCOL-HTTP2.md), as the lean lane reads and writes it: no state.

Reading a call: `request_head` checks a request's header fields against RFC 9113 §8
(pseudo-headers, lower-case names, no connection-specific field), `request_verdict` says
what they ask of gRPC (the method path, metadata, `grpc-timeout` via `parse_timeout`,
`grpc-encoding`, or the HTTP status of a request that is not gRPC). Writing the answer:
fixed header blocks that never touch the client's HPACK table (`RESPONSE_HEADERS`,
`OK_TRAILERS`, `trailers_block` with a percent-encoded grpc-message), and the byte layout
of a whole unary answer (`UNARY_HEAD` + message + `OK_TAIL`: HEADERS, DATA and trailers
packed in one go, the lane's fast path). `GRPC_STATUS` names the status codes.
"""

from __future__ import annotations

import struct

from swarmd.gateway.h2hpack import hpack_int, literal

# gRPC status codes (grpc/status.h), by name
GRPC_STATUS: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# headers HTTP/2 forbids (RFC 9113 §8.2.2): a request carrying one is malformed
CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})


def grpc_message_text(text: str) -> bytes:
    """grpc-message percent-encoding (PROTOCOL-HTTP2.md): UTF-8, bytes outside 0x20-0x7E and '%' escaped."""
    out = bytearray()
    for b in text.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


# fixed header blocks of the answers: :status 200 is static table entry 8; content-type is name index 31
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + hpack_int(len(b"application/grpc"), 7) + b"application/grpc"
OK_TRAILERS = literal(b"grpc-status", b"0")
# a unary answer's HEADERS frame with its block, then the head of its DATA frame and the message prefix
UNARY_HEAD = struct.Struct(f">BHBBL{len(RESPONSE_HEADERS)}sBHBBLBI")
OK_TAIL = struct.Struct(f">BHBBL{len(OK_TRAILERS)}s")  # the trailers frame of a successful call


def trailers_block(status: int, message: str) -> bytes:
    block = literal(b"grpc-status", str(status).encode())
    if message:
        block += literal(b"grpc-message", grpc_message_text(message))
    return block


def parse_timeout(value: str) -> float:
    """grpc-timeout ("1-8 digits and a unit") in seconds; ValueError saying what is wrong."""
    if not (2 <= len(value) <= 9) or not value[:-1].isascii() or not value[:-1].isdigit() \
            or value[-1] not in TIMEOUT_UNITS:
        raise ValueError(f"grpc-timeout {value[:20]!r} is not 1-8 digits and a unit (H, M, S, m, u, n)")
    return int(value[:-1]) * TIMEOUT_UNITS[value[-1]]


def request_head(fields: list[tuple[bytes, bytes]]) -> tuple[str, dict[bytes, bytes], dict[str, str]]:
    """(problem, pseudo-headers, metadata) of a request's header fields; problem is "" when the
    head is well formed (RFC 9113 §8.1.1, §8.2.2: pseudo-headers first, known, once; lower-case
    names; no connection-specific field), and the three pseudo-headers a request needs are there."""
    pseudo: dict[bytes, bytes] = {}
    metadata: dict[str, str] = {}
    for name, value in fields:
        if name[:1] == b":":
            if metadata or name in pseudo or name not in (b":method", b":scheme", b":path", b":authority"):
                return f"pseudo-header {name.decode('latin-1')!r} misplaced, repeated or unknown", pseudo, metadata
            pseudo[name] = value
            continue
        key = name.decode("latin-1")
        if key != key.lower() or key in CONNECTION_HEADERS or (key == "te" and value != b"trailers"):
            return f"header {key!r} is not allowed in HTTP/2 (upper case or connection-specific)", pseudo, metadata
        text = value.decode("utf-8", "replace")
        metadata[key] = f"{metadata[key]},{text}" if key in metadata else text
    if b":method" not in pseudo or b":path" not in pseudo or b":scheme" not in pseudo:
        return "request lacks :method, :scheme or :path", pseudo, metadata
    return "", pseudo, metadata


def request_verdict(fields: list[tuple[bytes, bytes]]) -> tuple[str, bytes, str, dict[str, str], float | str | None, str]:
    """What a call's header fields say, computed once per distinct head (a client repeats its
    heads; GrpcConnection caches this with the decoded block): (problem: "" when well formed,
    the HTTP status of a request that is not gRPC (b"405" not POST, b"415" not
    application/grpc) or b"", the method path, the metadata, the grpc-timeout in seconds
    (None: none sent; a str: why it is malformed), the grpc-encoding)."""
    problem, pseudo, metadata = request_head(fields)
    if problem:
        return problem, b"", "", metadata, None, "identity"
    if pseudo[b":method"] != b"POST":
        return "", b"405", "", metadata, None, "identity"
    if not metadata.get("content-type", "").startswith("application/grpc"):
        return "", b"415", "", metadata, None, "identity"
    timeout: float | str | None = None
    if "grpc-timeout" in metadata:
        try:
            timeout = parse_timeout(metadata["grpc-timeout"])
        except ValueError as e:
            timeout = str(e)
    return "", b"", pseudo[b":path"].decode("latin-1"), metadata, timeout, metadata.get("grpc-encoding", "identity")



__all__ = [
    "CONNECTION_HEADERS", "GRPC_STATUS", "OK_TAIL", "OK_TRAILERS", "RESPONSE_HEADERS", "TIMEOUT_UNITS", "UNARY_HEAD",
    "grpc_message_text", "parse_timeout", "request_head", "request_verdict", "trailers_block",
]
