"""HTTP/2 framing (RFC 9113), the part a gRPC server needs: the frame vocabulary and codec.

The connection preface, frame types, flags, error codes and settings identifiers, the
9-byte frame head and `frame()` that writes one; `ConnectionError_` is how the core says
the peer broke HTTP/2 badly enough to end the connection. No state lives here: the
state machine is gateway/grpc_wire.py, header blocks are gateway/h2hpack.py, what gRPC
puts in them is gateway/grpc_http2.py.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 §6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes (RFC 9113 §7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
# settings identifiers
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
FRAME_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload



class ConnectionError_(Exception):  # noqa: N801  (kept apart from the builtin ConnectionError)
    """The peer broke HTTP/2 in a way that ends the connection (RFC 9113 §5.4.1)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message



__all__ = [
    "ACK", "CANCEL", "COMPRESSION_ERROR", "CONTINUATION", "DATA", "DEFAULT_WINDOW", "END_HEADERS", "END_STREAM",
    "ENHANCE_YOUR_CALM", "FLOW_CONTROL_ERROR", "FRAME_HEAD", "FRAME_SIZE_ERROR", "GOAWAY", "HEADERS",
    "INTERNAL_ERROR", "MAX_WINDOW", "NO_ERROR", "PADDED", "PING", "PREFACE", "PRIORITY", "PRIORITY_FLAG",
    "PROTOCOL_ERROR", "PUSH_PROMISE", "REFUSED_STREAM", "RST_STREAM", "SETTINGS", "STREAM_CLOSED",
    "S_ENABLE_PUSH", "S_HEADER_TABLE_SIZE", "S_INITIAL_WINDOW_SIZE", "S_MAX_CONCURRENT_STREAMS",
    "S_MAX_FRAME_SIZE", "S_MAX_HEADER_LIST_SIZE", "WINDOW_UPDATE", "ConnectionError_", "frame",
]
