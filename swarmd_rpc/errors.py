"""One exception class per stable error code, so callers branch with `except`.

Every class subclasses swarmd.errors.SwarmdError, so code that catches
SwarmdError (and reads `.code`) keeps working; the library raises the
subclass that matches the code a peer sent. `Timeout` is also a builtin
TimeoutError and `Unavailable`/`Closed` are ConnectionErrors, so generic
network code catches them too.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_CLOSED,
    ERR_CONFLICT,
    ERR_CORRUPT,
    ERR_FORBIDDEN,
    ERR_HANDSHAKE,
    ERR_INTERNAL,
    ERR_INVALID_MODEL,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_PROTOCOL,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNAUTHORIZED,
    ERR_UNAVAILABLE,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)


class ClientError(SwarmdError):
    """Base of the per-code classes; `code` is the class's code unless the peer sent a more specific one."""

    CODE: str = ERR_INTERNAL

    def __init__(self, message: str = "", data: Any = None, *, code: str | None = None) -> None:
        super().__init__(code or self.CODE, message, data)


class BadRequest(ClientError):
    """The params were malformed or did not match the model's signature: fix the call, do not retry."""

    CODE = ERR_BAD_REQUEST


class NotFound(ClientError):
    """No such model, version, peer, topic or thing."""

    CODE = ERR_NOT_FOUND


class UnknownMethod(ClientError):
    """The peer serves no method of that name (wrong peer, or a role it does not run)."""

    CODE = ERR_UNKNOWN_METHOD


class Timeout(ClientError, TimeoutError):
    """The deadline passed before an answer; the work may still have happened on the peer."""

    CODE = ERR_TIMEOUT


class Forbidden(ClientError):
    """The peer's access list does not let this key do that (e.g. a read-only key writing)."""

    CODE = ERR_FORBIDDEN


class Unauthorized(ClientError):
    """No or unknown credentials."""

    CODE = ERR_UNAUTHORIZED


class Overloaded(ClientError):
    """Every worker tried had a full queue: retry later or add workers."""

    CODE = ERR_OVERLOADED


class RateLimited(ClientError):
    """A per-key or per-source rate limit was hit."""

    CODE = ERR_RATE_LIMITED


class Closed(ClientError, ConnectionError):
    """The connection closed under the call, or the client was closed."""

    CODE = ERR_CLOSED


class Cancelled(ClientError):
    """The call was cancelled."""

    CODE = ERR_CANCELLED


class Conflict(ClientError):
    """E.g. a version pushed again with different bytes (versions are immutable)."""

    CODE = ERR_CONFLICT


class TooLarge(ClientError):
    """A message, record or model over its limit."""

    CODE = ERR_TOO_LARGE


class ProtocolError(ClientError):
    """The peer broke the wire protocol."""

    CODE = ERR_PROTOCOL


class HandshakeFailed(ClientError, ConnectionError):
    """The Noise handshake failed: most often the peer is not the key we asked for."""

    CODE = ERR_HANDSHAKE


class Unavailable(ClientError, ConnectionError):
    """No peer (worker, store, orchestrator) could be reached or could serve this now."""

    CODE = ERR_UNAVAILABLE


class NotReady(ClientError):
    """A model is still loading, or the node is starting or draining: retry shortly."""

    CODE = ERR_NOT_READY


class Corrupt(ClientError):
    """Stored or received bytes failed their digest check."""

    CODE = ERR_CORRUPT


class InvalidModel(ClientError):
    """A model file onnx cannot parse."""

    CODE = ERR_INVALID_MODEL


class InternalError(ClientError):
    """A bug on the peer's side (logged there with a traceback)."""

    CODE = ERR_INTERNAL


BY_CODE: dict[str, type[ClientError]] = {
    cls.CODE: cls
    for cls in (
        BadRequest, NotFound, UnknownMethod, Timeout, Forbidden, Unauthorized, Overloaded, RateLimited,
        Closed, Cancelled, Conflict, TooLarge, ProtocolError, HandshakeFailed, Unavailable, NotReady,
        Corrupt, InvalidModel, InternalError,
    )
}


def translate(exc: BaseException) -> BaseException:
    """The library's exception for exc: a SwarmdError becomes the class of its code (same code,
    message and data); a bare TimeoutError becomes Timeout and an OSError Unavailable. Anything
    else (and an already translated error) comes back unchanged."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, SwarmdError):
        cls = BY_CODE.get(exc.code, ClientError)
        out: BaseException = cls(exc.message, exc.data, code=exc.code)
    elif isinstance(exc, TimeoutError):
        out = Timeout(str(exc) or "the operation timed out")
    elif isinstance(exc, OSError):
        out = Unavailable(f"{type(exc).__name__}: {exc}")
    else:
        return exc
    out.__cause__ = exc
    return out


P = ParamSpec("P")
R = TypeVar("R")


def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Raise the library's per-code exception classes instead of bare SwarmdError/TimeoutError/OSError."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (SwarmdError, TimeoutError, OSError) as e:
            out = translate(e)
            if out is e:
                raise
            raise out from e

    return wrapper


__all__ = ["BY_CODE", "ClientError", "translate", "translated", *sorted(c.__name__ for c in BY_CODE.values())]
