"""RPC messages on channel 0 (sans-IO): encode and validate.

Every message is one msgpack array whose first element is its kind:

- request  ``[0, id, method, params, timeout_ms | nil, channel, meta?]`` (channel 0 = plain call,
  otherwise the stream channel the caller opened for this call; meta, optional, a map of
  cross-cutting context such as the W3C trace context, ignored when unknown or malformed;
  elements after it are ignored too, so later versions can append fields)
- response ``[1, id, result]``
- error    ``[2, id, {"code", "message", "data"?}]``
- event    ``[3, method, params]`` (fire and forget, no answer)
- cancel   ``[4, id]`` (the caller gave up; the callee stops the handler)

Deadlines travel as the time left in milliseconds, not as an absolute time:
the two peers' clocks need not agree.
"""

from __future__ import annotations

from typing import Any

import msgpack

from swarmd.errors import ERR_PROTOCOL, SwarmdError
from swarmd.rpc.codec import ext_hook, packb

REQUEST = 0
RESPONSE = 1
ERROR = 2
EVENT = 3
CANCEL = 4

MAX_ID = (1 << 63) - 1
MAX_METHOD_LEN = 256


class EnvelopeError(SwarmdError):
    """A message from the peer that is not a valid envelope.

    `request_id` is set when the message was a request with a readable id;
    `kind` and `message_id` tell what a message with an undecodable part (a
    malformed tensor, an unknown ext type) was, so the receiver can fail that
    one request, answer or event instead of the whole connection.
    """

    def __init__(
        self, message: str, request_id: int | None = None, kind: int | None = None, message_id: int | None = None
    ) -> None:
        super().__init__(ERR_PROTOCOL, message)
        self.request_id = request_id
        self.kind = kind
        self.message_id = message_id


def request(
    req_id: int, method: str, params: Any, timeout_ms: int | None, channel: int = 0, meta: dict[str, Any] | None = None
) -> bytes:
    if meta is None:
        return packb([REQUEST, req_id, method, params, timeout_ms, channel])
    return packb([REQUEST, req_id, method, params, timeout_ms, channel, meta])


def request_meta(msg: list[Any]) -> dict[str, Any] | None:
    """A decoded request's meta map; None when it has none, or one that is not a map (ignored)."""
    if len(msg) > 6 and type(msg[6]) is dict:
        return msg[6]
    return None


def response(req_id: int, result: Any) -> bytes:
    return packb([RESPONSE, req_id, result])


def error(req_id: int, err: SwarmdError) -> bytes:
    return packb([ERROR, req_id, err.to_wire()])


def event(method: str, params: Any) -> bytes:
    return packb([EVENT, method, params])


def cancel(req_id: int) -> bytes:
    return packb([CANCEL, req_id])


def request_fields_ok(rid: Any, method: Any, timeout_ms: Any, channel: Any) -> bool:
    """Whether a request's id, method, timeout and channel are all valid: the one rule,
    used by decode and by RpcPeer._on_message's inline path for a plain request."""
    return (
        type(rid) is int
        and 0 <= rid <= MAX_ID
        and type(method) is str
        and 0 < len(method) <= MAX_METHOD_LEN
        and (timeout_ms is None or (type(timeout_ms) is int and -(1 << 62) <= timeout_ms <= 1 << 62))
        and type(channel) is int
        and 0 <= channel < 1 << 32
    )


def _check_id(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_ID:
        raise EnvelopeError(f"message id must be an integer 0..2^63-1, got {type(v).__name__}")
    return v


def _check_method(v: Any, req_id: int | None) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_METHOD_LEN:
        raise EnvelopeError(f"method name must be a string of 1..{MAX_METHOD_LEN} characters", req_id)
    return v


_unpackb = msgpack.unpackb  # codec.unpackb's call, inlined: one Python frame fewer per message


def _ignore_ext(code: int, data: bytes) -> None:
    return None


def _undecodable(data: bytes, cause: Exception) -> EnvelopeError:
    """The error for a message that did not decode, naming its kind and id when the
    envelope itself is sound and only an ext (a tensor) inside it was malformed."""
    text = f"undecodable RPC message: {cause}"
    try:
        msg = msgpack.unpackb(data, raw=False, ext_hook=_ignore_ext, strict_map_key=False, use_list=True)
    except Exception:
        return EnvelopeError(text)
    if type(msg) is not list or len(msg) < 2 or type(msg[0]) is not int or msg[0] not in (REQUEST, RESPONSE, ERROR, EVENT):
        return EnvelopeError(text)
    kind, mid = msg[0], msg[1]
    if kind == EVENT:
        return EnvelopeError(text, kind=EVENT)
    if type(mid) is not int or not 0 <= mid <= MAX_ID:
        return EnvelopeError(text)
    return EnvelopeError(text, mid if kind == REQUEST else None, kind, mid)


def decode(data: bytes) -> list[Any]:
    """Decode and validate one message; returns the list with checked field types.

    Raises EnvelopeError; its request_id is set when the message was a request
    with a readable id, so the caller can answer that request with an error.
    RpcPeer._on_message dispatches a plain request (request_fields_ok, the same rule)
    and an answer to a call it made inline, and calls this for everything else.
    """
    try:
        msg = _unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=False, use_list=True)
    except Exception as e:
        raise _undecodable(data, e) from None
    if type(msg) is not list or not msg:
        raise EnvelopeError("RPC message must be a non-empty msgpack array")
    kind = msg[0]
    if type(kind) is not int:  # (not only ==: a peer's tensor in this place would compare as an array)
        raise EnvelopeError(f"unknown RPC message kind {kind!r:.20}")
    n = len(msg)
    if kind == RESPONSE:
        if n != 3:
            raise EnvelopeError(f"response must have 3 elements, got {n}")
        rid = msg[1]
        if type(rid) is not int or not 0 <= rid <= MAX_ID:
            _check_id(rid)
        return msg
    if kind == REQUEST:
        if n < 6:
            raise EnvelopeError(
                f"request must have at least 6 elements, got {n}", msg[1] if n > 1 and type(msg[1]) is int else None
            )
        if request_fields_ok(msg[1], msg[2], msg[4], msg[5]):
            return msg
        # which field is wrong, in order (the message says it)
        req_id = _check_id(msg[1])
        _check_method(msg[2], req_id)
        t = msg[4]
        if t is not None and (type(t) is not int or t < -(1 << 62) or t > 1 << 62):
            raise EnvelopeError("request timeout_ms must be an integer or nil", req_id)
        ch = msg[5]
        if type(ch) is not int or not 0 <= ch < 1 << 32:
            raise EnvelopeError("request channel must be an integer 0..2^32-1", req_id)
        return msg
    if kind == ERROR:
        if n != 3:
            raise EnvelopeError(f"error must have 3 elements, got {n}")
        _check_id(msg[1])
        return msg
    if kind == EVENT:
        if n != 3:
            raise EnvelopeError(f"event must have 3 elements, got {n}")
        _check_method(msg[1], None)
        return msg
    if kind == CANCEL:
        if n != 2:
            raise EnvelopeError(f"cancel must have 2 elements, got {n}")
        _check_id(msg[1])
        return msg
    raise EnvelopeError(f"unknown RPC message kind {kind!r:.20}")
