"""LocalPeer: our own methods, called the way a remote peer's are, minus the socket.

Connecting to our own public key gives one of these, so a co-located role (a
worker, a store, an orchestrator in the same process) is reached through
exactly the code that reaches a remote one: `call` and `open_stream`.
Calls run the handler in the caller's Task under asyncio.timeout (no second
Task, no encoding); a stream runs its handler in a Task the LocalPeer owns and
joins the two ends with bounded in-memory pipes, so a fast sender waits for
the reader as it would on a mux channel. close() cancels and awaits what runs.
"""

from __future__ import annotations

import asyncio
import itertools
import traceback
import uuid
from collections import deque
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_CLOSED,
    ERR_INTERNAL,
    ERR_TIMEOUT,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.node.loglimit import hostile
from swarmd.rpc.builtins import BUILTINS
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.methods import CallContext, Method, Methods
from swarmd.rpc.stream import CallStream

PIPE_CHUNKS = 8  # chunks in flight per direction of a local stream (a mux channel's window, in chunks)


class _Pipe:
    """One direction of a local stream: bounded; ends with None; fails with an error."""

    def __init__(self, limit: int = PIPE_CHUNKS) -> None:
        self._items: deque[bytes | None] = deque()
        self._limit = limit
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.error: SwarmdError | None = None
        self.ended = False  # the writer sent its end (or will send nothing more)
        self.dropped = False  # the reader is gone: what is sent is thrown away

    async def put(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.ended:
            raise SwarmdError(ERR_CLOSED, "stream already closed for sending")
        while len(self._items) >= self._limit and not self.dropped and self.error is None:
            self._writable.clear()
            await self._writable.wait()
        if self.error is not None:
            raise self.error
        if not self.dropped:
            self._items.append(bytes(data))
            self._readable.set()

    def end(self) -> None:
        if not self.ended and self.error is None:
            self.ended = True
            self._items.append(None)
            self._readable.set()

    def fail(self, err: SwarmdError) -> None:
        if self.error is None:
            self.error = err
            self._items.clear()
            self._readable.set()
            self._writable.set()

    def drop(self) -> None:
        """The reader stops reading: wake a waiting writer and discard what is queued."""
        self.dropped = True
        self._items.clear()
        self._writable.set()

    async def get(self) -> bytes | None:
        while not self._items:
            if self.error is not None:
                raise self.error
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        if item is None:
            self._items.appendleft(None)  # every later recv() sees the end too
        return item


class LocalStream(CallStream):
    """One end of a local stream, over two pipes: the interface of swarmd.rpc.Stream."""

    def __init__(self, sid: int, out: _Pipe, into: _Pipe, result: asyncio.Future[Any] | None = None,
                 handler: asyncio.Task[Any] | None = None) -> None:
        super().__init__(out.put, into.get, out.end, result)
        self.id = sid
        self._out = out
        self._in = into
        self._handler = handler

    def abort(self, error: SwarmdError | None = None) -> None:
        """Reset both directions; on the caller's end also cancel the handler (result raises ERR_CANCELLED)."""
        err = error or SwarmdError(ERR_CANCELLED, "stream aborted")
        self._out.fail(err)
        self._in.fail(err)
        self._fail_result(err)
        if self._handler is not None and not self._handler.done():
            self._handler.cancel()


class LocalPeer:
    """Our own method table as a peer: what Swarm.connect(our own key) returns."""

    def __init__(
        self, methods: Methods, public_key: bytes, config: RpcConfig | None = None, instance_id: str | None = None
    ) -> None:
        self.methods = methods
        self.remote_public_key = public_key
        self.config = config or RpcConfig()
        self.instance_id = instance_id or uuid.uuid4().hex
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[SwarmdError] = self._loop.create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._log = logger.bind(component="rpc", peer="local")

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    @property
    def closed(self) -> asyncio.Future[SwarmdError]:
        return self._closed

    def _method(self, name: str, stream: bool) -> Method:
        if self.is_closed:
            raise SwarmdError(ERR_CLOSED, "this node is stopping")
        m = BUILTINS.get(name) or self.methods.get(name)
        if m is None:
            raise SwarmdError(ERR_UNKNOWN_METHOD, f"no method {name!r} on this node")
        if m.stream != stream:
            raise SwarmdError(
                ERR_BAD_REQUEST,
                f"{name!r} is a stream method: open it as a stream" if m.stream else f"{name!r} is not a stream method: call it",
            )
        return m

    def _context(self, method: str, seconds: float) -> CallContext:
        return CallContext(self.remote_public_key, method, 0, self._loop.time() + seconds, self)  # type: ignore[arg-type]

    def _error(self, method: str, exc: BaseException) -> SwarmdError:
        """What a remote caller would receive for this handler exception."""
        if isinstance(exc, SwarmdError):
            return exc
        if hostile.allow(f"{method}:{type(exc).__name__}") is not None:
            tb = "".join(traceback.format_exception(exc)).rstrip()
            self._log.bind(method=method, error=type(exc).__name__).error(f"handler raised: {tb}")
        return SwarmdError(ERR_INTERNAL, f"{method!r} failed: {type(exc).__name__}")

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Run the handler in this Task, bounded by timeout (RpcConfig.default_timeout by default)."""
        seconds = self.config.default_timeout if timeout is None else timeout
        m = self._method(method, stream=False)
        try:
            async with asyncio.timeout(seconds):
                return await m.handler(self._context(method, seconds), params)
        except TimeoutError:
            raise SwarmdError(ERR_TIMEOUT, f"{method!r} did not answer within {seconds:g} s") from None
        except Exception as e:  # noqa: BLE001 - a handler may raise anything; the caller sees a SwarmdError
            raise self._error(method, e) from None

    async def open_stream(self, method: str, params: Any = None, *, timeout: float | None = None) -> LocalStream:  # noqa: ASYNC109
        """Start a stream call: the handler runs in a Task of this peer, joined by two bounded pipes."""
        seconds = self.config.stream_timeout if timeout is None else timeout
        m = self._method(method, stream=True)
        up, down = _Pipe(), _Pipe()  # caller -> handler, handler -> caller
        sid = next(self._ids)
        result: asyncio.Future[Any] = self._loop.create_future()
        theirs = LocalStream(sid, down, up)

        async def run() -> Any:
            try:
                async with asyncio.timeout(seconds):
                    value = await m.handler(self._context(method, seconds), params, theirs)
            except TimeoutError:
                raise SwarmdError(ERR_TIMEOUT, f"{method!r} ran past its deadline") from None
            except Exception as e:  # noqa: BLE001 - becomes the SwarmdError a remote caller would see
                raise self._error(method, e) from None
            finally:
                up.drop()  # the handler reads no more: later sends are thrown away, as a callee drops frames
            down.end()
            return value

        def settle(task: asyncio.Task[Any]) -> None:
            """The call's result from its handler Task, however it ended (even cancelled before it ran)."""
            self._tasks.discard(task)
            if task.cancelled():
                err = SwarmdError(ERR_CANCELLED, "handler cancelled")
            else:
                exc = task.exception()
                if exc is None:
                    if not result.done():
                        result.set_result(task.result())
                    return
                err = exc if isinstance(exc, SwarmdError) else SwarmdError(ERR_INTERNAL, str(exc))
            up.drop()
            down.fail(err)
            if not result.done():
                result.set_exception(err)
                result.exception()  # retrieved here: a caller that never asks is not an error

        task = self._loop.create_task(run(), name=f"local-stream-{method}")
        self._tasks.add(task)
        task.add_done_callback(settle)
        return LocalStream(sid, up, down, result, task)

    async def close(self) -> None:
        """Refuse new calls; cancel and await the stream handlers still running."""
        if not self._closed.done():
            self._closed.set_result(SwarmdError(ERR_CLOSED, "local peer closed"))
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["LocalPeer", "LocalStream"]
