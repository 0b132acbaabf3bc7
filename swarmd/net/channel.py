"""A flow-controlled byte stream inside a secure connection (mux channel).

The credit and window arithmetic lives in the sans-IO `mux.SendCredit` and
`mux.RecvWindow`; a `Channel` holds the received chunks, wakes the task waiting
for data or credit, and queues its frames on the connection's bulk queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import msgpack

from swarmd.errors import ERR_CLOSED, ERR_PROTOCOL, SwarmdError
from swarmd.net import mux
from swarmd.node.memory import tune_for_bulk

if TYPE_CHECKING:
    from swarmd.net.connection import SecureConnection


class Channel:
    """A flow-controlled byte stream inside a connection (both directions)."""

    def __init__(self, conn: SecureConnection, channel_id: int, peer_opened: bool = False) -> None:
        self.conn = conn
        self.id = channel_id
        self.peer_opened = peer_opened  # its window counts against the process's stream buffer cap
        self._credit = mux.SendCredit()
        self._window = mux.RecvWindow()
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None  # recv waiting for data/end
        self._credit_waiter: asyncio.Future[None] | None = None
        self.remote_ended = False
        self.local_ended = False
        self.error: SwarmdError | None = None  # set on reset / connection loss

    # -- application side --------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send bytes, waiting for credit and pipe room; raises ERR_CLOSED after reset/end.

        `bytes` are queued without copying (they are immutable); other buffers
        are copied once so the caller may reuse them.
        """
        view = memoryview(data if type(data) is bytes else bytes(data))
        conn = self.conn
        pack = mux.HEADER.pack
        chunk_max = mux.STREAM_CHUNK
        while view:
            self._check_can_send()
            credit = self._credit
            if credit.available <= 0:
                await self._wait_credit()
                continue
            n = credit.take(min(len(view), chunk_max))
            conn._queue_bulk(pack(mux.MSG, self.id, n), view[:n])
            view = view[n:]
            if conn._write_paused:
                await conn.drain()

    def _check_can_send(self) -> None:
        if self.error is not None:
            raise self.error
        if self.local_ended:
            raise SwarmdError(ERR_CLOSED, f"stream {self.id} already ended by this side")

    async def _wait_credit(self) -> None:
        fut = self.conn._loop.create_future()
        self._credit_waiter = fut
        try:
            await fut
        finally:
            self._credit_waiter = None

    async def recv(self) -> bytes | None:
        """Next chunk of bytes; None once the peer ended its side."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.remote_ended:
                self._maybe_release()
                return None
            fut = self.conn._loop.create_future()
            self._waiter = fut
            try:
                await fut
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        window = self._window
        grant = window.consume(len(chunk))
        if window.read >= window.window << 1:  # a bulk stream: grow its window while the caps allow
            extra = window.growth(self.conn.config.max_stream_window)
            if extra and not self.remote_ended and self.conn._may_grow_window(self, extra):
                grant += window.grow(extra)
                tune_for_bulk()  # once per process: a bulk stream arrives here
        if grant and not self.remote_ended and self.error is None:
            self.conn._queue_urgent(mux.encode_credit(self.id, grant))
        return chunk

    def end(self) -> None:
        """Half-close: this side sends nothing more."""
        if self.local_ended or self.error is not None:
            return
        self.local_ended = True
        self.conn._queue_bulk(mux.encode(mux.END, self.id), b"")
        self._maybe_release()

    def reset(self, error: SwarmdError | None = None) -> None:
        """Abort both directions and tell the peer."""
        if self.error is not None:
            return
        payload = msgpack.packb(error.to_wire()) if error is not None else b""
        if self.conn.error is None:
            self.conn._queue_bulk(mux.encode(mux.RESET, self.id, payload), b"")
        self._fail(error or SwarmdError(ERR_CLOSED, f"stream {self.id} reset by this side"))

    @property
    def done(self) -> bool:
        return self.error is not None or (self.local_ended and self.remote_ended)

    # -- connection side ---------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_credit(self) -> None:
        w = self._credit_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_data(self, payload: bytes) -> None:
        if self.remote_ended:
            raise SwarmdError(ERR_PROTOCOL, f"data on stream {self.id} after its END")
        self._window.received(len(payload))
        if self.error is not None:
            return  # locally reset: drop, the peer learns from our RESET
        self._chunks.append(payload)
        self._wake()

    def _on_end(self) -> None:
        self.remote_ended = True
        self._wake()
        self._maybe_release()

    def _fail(self, error: SwarmdError) -> None:
        if self.error is None:
            self.error = error
        self._chunks.clear()
        self._wake()
        self._wake_credit()
        self.conn._drop_channel(self.id)

    def _maybe_release(self) -> None:
        if self.local_ended and self.remote_ended and not self._chunks:
            self.conn._drop_channel(self.id)
