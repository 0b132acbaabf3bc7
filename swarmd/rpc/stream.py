"""Stream: a byte stream tied to one RPC call, over one mux channel."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from swarmd.errors import ERR_CANCELLED, SwarmdError
from swarmd.net.channel import Channel

if TYPE_CHECKING:
    from swarmd.rpc.peer import RpcPeer


class Stream:
    """A byte stream tied to one call: `send`, `recv` (None at end), `close`, and the call's `result`."""

    def __init__(
        self, peer: RpcPeer, channel: Channel, result: asyncio.Future[Any] | None = None, request_id: int = 0
    ) -> None:
        self.peer = peer
        self.channel = channel
        self._result = result
        self._rid = request_id

    @property
    def id(self) -> int:
        return self.channel.id

    async def send(self, data: bytes) -> None:
        await self.channel.send(data)

    async def recv(self) -> bytes | None:
        return await self.channel.recv()

    async def close(self) -> None:
        """Half-close: we send nothing more; the other side's recv() returns None."""
        self.channel.end()

    def abort(self, error: SwarmdError | None = None) -> None:
        """Reset the channel; on the caller side also cancel the call (its result raises ERR_CANCELLED)."""
        err = error or SwarmdError(ERR_CANCELLED, "stream aborted")
        self.channel.reset(err)
        res = self._result
        if res is not None and not res.done():
            res.set_exception(err)
            res.exception()  # retrieved: aborting is not an unhandled error
            if self.peer._forget(self._rid) is not None:
                self.peer._send_cancel(self._rid)

    async def result(self) -> Any:
        """Caller side: the handler's return value (raises its SwarmdError)."""
        if self._result is None:
            raise RuntimeError("result() is for the side that opened the stream")
        return await self._result

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        if et is not None:
            self.abort()
