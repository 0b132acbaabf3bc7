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

BY_CODE: dict[str, type[ClientError]] = {}  # filled by the class statements below, one per code


class ClientError(SwarmdError):
    """Base of the per-code classes; `code` is the class's code unless the peer sent a more specific one."""

    CODE: str = ERR_INTERNAL

    def __init_subclass__(cls, code: str | None = None, **kw: Any) -> None:
        """`class NotFound(ClientError, code=ERR_NOT_FOUND)` makes it the class of that code; a
        subclass without `code` (a user's) keeps its parent's."""
        super().__init_subclass__(**kw)
        if code is not None:
            cls.CODE = code
            BY_CODE[code] = cls

    def __init__(self, message: str = "", data: Any = None, *, code: str | None = None) -> None:
        super().__init__(code or self.CODE, message, data)


class BadRequest(ClientError, code=ERR_BAD_REQUEST):
    """The params were malformed or did not match the model's signature: fix the call, do not retry."""


class NotFound(ClientError, code=ERR_NOT_FOUND):
    """No such model, version, peer, topic or thing."""


class UnknownMethod(ClientError, code=ERR_UNKNOWN_METHOD):
    """The peer serves no method of that name (wrong peer, or a role it does not run)."""


class Timeout(ClientError, TimeoutError, code=ERR_TIMEOUT):
    """The deadline passed before an answer; the work may still have happened on the peer."""


class Forbidden(ClientError, code=ERR_FORBIDDEN):
    """The peer's access list does not let this key do that (e.g. a read-only key writing)."""


class Unauthorized(ClientError, code=ERR_UNAUTHORIZED):
    """No or unknown credentials."""


class Overloaded(ClientError, code=ERR_OVERLOADED):
    """Every worker tried had a full queue: retry later or add workers."""


class RateLimited(ClientError, code=ERR_RATE_LIMITED):
    """A per-key or per-source rate limit was hit."""


class Closed(ClientError, ConnectionError, code=ERR_CLOSED):
    """The connection closed under the call, or the client was closed."""


class Cancelled(ClientError, code=ERR_CANCELLED):
    """The call was cancelled."""


class Conflict(ClientError, code=ERR_CONFLICT):
    """E.g. a version pushed again with different bytes (versions are immutable)."""


class TooLarge(ClientError, code=ERR_TOO_LARGE):
    """A message, record or model over its limit."""


class ProtocolError(ClientError, code=ERR_PROTOCOL):
    """The peer broke the wire protocol."""


class HandshakeFailed(ClientError, ConnectionError, code=ERR_HANDSHAKE):
    """The Noise handshake failed: most often the peer is not the key we asked for."""


class Unavailable(ClientError, ConnectionError, code=ERR_UNAVAILABLE):
    """No peer (worker, store, orchestrator) could be reached or could serve this now."""


class NotReady(ClientError, code=ERR_NOT_READY):
    """A model is still loading, or the node is starting or draining: retry shortly."""


class Corrupt(ClientError, code=ERR_CORRUPT):
    """Stored or received bytes failed their digest check."""


class InvalidModel(ClientError, code=ERR_INVALID_MODEL):
    """A model file onnx cannot parse."""


class InternalError(ClientError, code=ERR_INTERNAL):
    """A bug on the peer's side (logged there with a traceback)."""


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
