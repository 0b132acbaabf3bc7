"""Stable error codes shared by every layer, the wire and the HTTP gateway.

A code is part of the protocol: peers and clients branch on it, so codes are
never renamed. Messages are for people and say what was wrong and what was
expected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import Enum
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

# How the gateways answer a code: (HTTP status, gRPC status name). A code not here
# (a peer's own, or one no client request can cause) is answered 502 / UNKNOWN.
GATEWAY_STATUS: dict[str, tuple[int, str]] = {
    ERR_BAD_REQUEST: (400, "INVALID_ARGUMENT"),
    ERR_INVALID_MODEL: (400, "INVALID_ARGUMENT"),
    ERR_UNAUTHORIZED: (401, "UNAUTHENTICATED"),
    ERR_FORBIDDEN: (403, "PERMISSION_DENIED"),
    ERR_NOT_FOUND: (404, "NOT_FOUND"),
    ERR_CONFLICT: (409, "ALREADY_EXISTS"),
    ERR_TOO_LARGE: (413, "RESOURCE_EXHAUSTED"),
    ERR_RATE_LIMITED: (429, "RESOURCE_EXHAUSTED"),
    ERR_INTERNAL: (500, "INTERNAL"),
    ERR_NOT_IMPLEMENTED: (501, "UNIMPLEMENTED"),
    ERR_CORRUPT: (502, "UNKNOWN"),
    ERR_PROTOCOL: (502, "UNKNOWN"),
    ERR_OVERLOADED: (503, "UNAVAILABLE"),
    ERR_NOT_READY: (503, "UNAVAILABLE"),
    ERR_UNAVAILABLE: (503, "UNAVAILABLE"),
    ERR_CLOSED: (503, "UNAVAILABLE"),
    ERR_TIMEOUT: (504, "DEADLINE_EXCEEDED"),
}


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

    @classmethod
    def refuse_if(cls, section: Any, name: str, keys: str, bad: Callable[[Any], bool], must: str) -> None:
        """The one shape of a section's validate() rule: raise naming the first of `keys` (fields of
        `section`, space-separated) whose value is `bad`: "[name].key must <must>, got <value>"."""
        for key in keys.split():
            value = getattr(section, key)
            if bad(value):
                raise cls(f"{name}.{key} must {must}, got {value!r}")


def bad_request(message: str, data: Any = None) -> SwarmdError:
    """The caller's input is malformed: ERR_BAD_REQUEST with a message that says what and why."""
    return SwarmdError(ERR_BAD_REQUEST, message, data)


# -- which failures another peer may not share: the one definition of "retryable" --
# The router, the gateway, the swarm's topic requests and the client library all ask
# classify() (or retryable()).

# Peer-side failures: the request itself was fine, another peer can serve it. Refused and
# closed connections, a handshake the peer never finished (it died or restarted under us),
# timeouts, a full queue.
RETRYABLE_CODES = frozenset({ERR_CLOSED, ERR_HANDSHAKE, ERR_TIMEOUT, ERR_OVERLOADED, ERR_UNAVAILABLE})
# Answers that are about this peer, not the request, yet no sign of ill health: it does not
# have that model (or version) after all, or it is loading / draining since we chose it.
ELSEWHERE_CODES = frozenset({ERR_NOT_FOUND, ERR_NOT_READY})


class Unreached(SwarmdError):
    """The call never reached the peer: no connection could be made (refused, no route,
    handshake cut, dial timeout). Retryable like any peer failure, and cheap: a router does
    not count it against its attempts, so stale records of dead peers cannot use them up."""


class Verdict(Enum):
    RETRY = "retry"  # the worker failed; count it against the worker and try another
    ELSEWHERE = "elsewhere"  # the worker is fine but cannot serve this; try another, blame nobody
    FINAL = "final"  # the worker answered with a caller error; hand it back as is


def classify(exc: BaseException) -> tuple[Verdict, str]:
    """(verdict, error code) for an exception raised by a call to a worker."""
    if isinstance(exc, Unreached):
        return Verdict.RETRY, exc.code
    if isinstance(exc, SwarmdError):
        if exc.code in RETRYABLE_CODES:
            return Verdict.RETRY, exc.code
        return (Verdict.ELSEWHERE if exc.code in ELSEWHERE_CODES else Verdict.FINAL), exc.code
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Verdict.RETRY, ERR_TIMEOUT
    if isinstance(exc, (ConnectionError, OSError, EOFError)):  # refused, reset, unreachable
        return Verdict.RETRY, ERR_CLOSED
    return Verdict.FINAL, type(exc).__name__


def retryable(exc: BaseException) -> bool:
    """Whether another peer may succeed where this one failed (RETRY or ELSEWHERE)."""
    return classify(exc)[0] is not Verdict.FINAL
