"""Stable error codes shared by every layer, the wire and the HTTP gateway.

A code is part of the protocol: peers and clients branch on it, so codes are
never renamed. Messages are for people and say what was wrong and what was
expected.
"""

from __future__ import annotations

from typing import Any

ERR_BAD_REQUEST = "ERR_BAD_REQUEST"  # params/body malformed or of the wrong type
ERR_NOT_FOUND = "ERR_NOT_FOUND"  # model, version, thing, peer, topic unknown
ERR_UNKNOWN_METHOD = "ERR_UNKNOWN_METHOD"  # RPC method not registered
ERR_TIMEOUT = "ERR_TIMEOUT"  # deadline passed before an answer
ERR_FORBIDDEN = "ERR_FORBIDDEN"  # caller's key or API key lacks the permission
ERR_UNAUTHORIZED = "ERR_UNAUTHORIZED"  # no or unknown credentials (HTTP 401)
ERR_OVERLOADED = "ERR_OVERLOADED"  # queue full; retry elsewhere or later
ERR_RATE_LIMITED = "ERR_RATE_LIMITED"  # per-key/per-source limit hit
ERR_CLOSED = "ERR_CLOSED"  # the connection or channel closed under the call
ERR_CANCELLED = "ERR_CANCELLED"  # the caller cancelled the call
ERR_CONFLICT = "ERR_CONFLICT"  # e.g. an immutable version pushed with another digest
ERR_TOO_LARGE = "ERR_TOO_LARGE"  # frame, record, body or model over its limit
ERR_PROTOCOL = "ERR_PROTOCOL"  # peer broke the wire protocol (framing, mux, envelope)
ERR_HANDSHAKE = "ERR_HANDSHAKE"  # Noise handshake failed, wrong key or version
ERR_UNAVAILABLE = "ERR_UNAVAILABLE"  # no worker/store/peer can serve this now
ERR_NOT_READY = "ERR_NOT_READY"  # model loading, node starting or draining
ERR_CORRUPT = "ERR_CORRUPT"  # stored or received data failed its digest check
ERR_INVALID_MODEL = "ERR_INVALID_MODEL"  # a model file that onnx cannot parse
ERR_CONFIG = "ERR_CONFIG"  # bad configuration key, type or value
ERR_NOT_IMPLEMENTED = "ERR_NOT_IMPLEMENTED"  # a protocol feature this node does not offer (HTTP 501)
ERR_INTERNAL = "ERR_INTERNAL"  # a bug: logged with a traceback on the side that raised it

ALL_CODES: frozenset[str] = frozenset(
    v for k, v in dict(globals()).items() if k.startswith("ERR_") and isinstance(v, str)
)


class SwarmdError(Exception):
    """An error with a stable code that may cross the wire unchanged."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> SwarmdError:
        if not isinstance(obj, dict) or not isinstance(obj.get("code"), str):
            return cls(ERR_PROTOCOL, f"malformed error object from peer: {obj!r:.200}")
        msg = obj.get("message")
        return cls(obj["code"], msg if isinstance(msg, str) else "", obj.get("data"))


class ConfigError(SwarmdError):
    """Bad configuration: names the key and the source it came from."""

    def __init__(self, message: str) -> None:
        super().__init__(ERR_CONFIG, message)
