"""Stream: a byte stream tied to one RPC call, over one mux channel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self

from swarmd.errors import ERR_CANCELLED, SwarmdError
from swarmd.net.channel import Channel

if TYPE_CHECKING:
    from swarmd.rpc.peer import RpcPeer


class CallStream:
    """What a stream over a mux channel (`Stream`) and one in-process (`rpc.local.LocalStream`)
    share: `send`, `recv` (None at end), `close` (half-close: the other side's recv() returns
    None), the call's `result` on the caller's side, and aborting on an error in `async with`.
    send and recv are the transport's own methods (no wrapper frame per chunk)."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]], recv: Callable[[], Awaitable[bytes | None]],
                 end: Callable[[], None], result: asyncio.Future[Any] | None) -> None:
        self.send = send
        self.recv = recv
        self._end = end
        self._result = result

    async def close(self) -> None:
        self._end()

    def abort(self, error: SwarmdError | None = None) -> None:
        raise NotImplementedError

    def _fail_result(self, err: SwarmdError) -> bool:
        """Fail the caller's result with err; False when there is none or it is settled."""
        res = self._result
        if res is None:
            return False
        if res.done():
            if not res.cancelled():
                res.exception()  # the caller gave the call up: an error it never awaits is not unhandled
            return False
        res.set_exception(err)
        res.exception()  # retrieved: aborting is not an unhandled error
        return True

    async def result(self) -> Any:
        """Caller side: the handler's return value (raises its SwarmdError). A wait given up
        (a timeout around it, a cancelled task) leaves the stream's result to a later call."""
        if self._result is None:
            raise RuntimeError("result() is for the side that opened the stream")
        return await asyncio.shield(self._result)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        if et is not None:
            self.abort()


class Stream(CallStream):
    """A byte stream tied to one call, over one mux channel."""

    def __init__(
        self, peer: RpcPeer, channel: Channel, result: asyncio.Future[Any] | None = None, request_id: int = 0
    ) -> None:
        super().__init__(channel.send, channel.recv, channel.end, result)
        self.peer = peer
        self.channel = channel
        self._rid = request_id

    @property
    def id(self) -> int:
        return self.channel.id

    def abort(self, error: SwarmdError | None = None) -> None:
        """Reset the channel; on the caller side also cancel the call (its result raises ERR_CANCELLED)."""
        err = error or SwarmdError(ERR_CANCELLED, "stream aborted")
        self.channel.reset(err)
        if self._fail_result(err) and self.peer._forget(self._rid) is not None:
            self.peer._send_cancel(self._rid)
