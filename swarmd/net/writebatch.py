"""Write batching for a secure connection: frames queued in one loop iteration share one write.

Up to `NetConfig.flush_frames` calls or answers share a write; past that they go at once, so
that with many calls in flight the peer works on the first ones while this side prepares the
rest (both processes busy at once instead of taking turns).

Calls, answers and credits go on the urgent queue, stream data on the bulk
queue; one flush per loop iteration seals all queued frames (one AEAD operation
per 64 KiB; bulk frames packed whole into messages, `NoiseSession.seal_frames`)
and makes one pipe write (a vectored one, `writelines`, when there is bulk). The pipe's pause/resume
(high/low water) is tracked here too, since `drain()` and the flush both read it.

`WriteBatcher` is a mixin of `SecureConnection` (like asyncio's own
`_FlowControlMixin`): the hot path stays one attribute lookup away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any

from swarmd.errors import SwarmdError
from swarmd.net import mux
from swarmd.net.busypoll import BusyPoll
from swarmd.net.noise import NoiseSession
from swarmd.node.memory import tune_for_bulk

_MSG0_HEADER = mux.MSG0_HEADER.pack
# headers of the messages shorter than this, packed once (~45 KiB per process): a list index
# instead of a struct call per message; calls and answers are mostly this small
_SMALL = 1024
_MSG0_SMALL = [_MSG0_HEADER(n) for n in range(_SMALL)]
_BULK_FLUSH_PIECES = 32  # a flush of this many bulk pieces (16 stream frames, ~1 MiB) is a bulk transfer
# wire pieces (length prefix, ciphertext) per writelines call: ~1 MiB. asyncio's selector transport
# (Python 3.11) joins them into one buffer; a join of a whole flush (up to 8 MiB) would be mmapped,
# faulted in and unmapped every time (tune_for_bulk maps blocks from 4 MiB up)
_WRITE_GROUP = 32


def _joined_writer(pipe: Any) -> Callable[[list[bytes]], None]:
    write = pipe.write
    return lambda pieces: write(b"".join(pieces))


class WriteBatcher:
    """The urgent and bulk frame queues, their flush, and write flow control."""

    session: NoiseSession
    error: SwarmdError | None
    on_writable: Callable[[], None] | None
    _loop: asyncio.AbstractEventLoop
    _pipe: Any
    _urgent: list[bytes]
    _bulk: list[bytes | memoryview]
    _flush_handle: asyncio.Handle | None
    _write_paused: bool
    _held_much: bool
    _drain_waiters: list[asyncio.Future[None]]
    _in_receive: bool
    _busy: BusyPoll | None  # polling for the peer's answer after a write (NetConfig.busy_poll_us)
    _flush_at: int  # entries of _urgent (a header and a payload per message) that start a write at once

    if TYPE_CHECKING:  # provided by PeerLimits

        def _check_write_buffer(self, pipe: Any) -> None: ...

    @property
    def write_paused(self) -> bool:
        """True while the pipe's buffer is above high water (the peer reads slower than we write)."""
        return self._write_paused

    def awaits_answers(self, pending: Sized) -> None:
        """The caller's calls in flight on this connection (the RPC layer's, by reference):
        while not empty, a write is followed by polling for up to NetConfig.busy_poll_answer_us
        instead of busy_poll_us (net/busypoll.py)."""
        if self._busy is not None:
            self._busy.awaiting = pending

    def send_message(self, payload: bytes, *, now: bool = False) -> None:
        """Queue one channel-0 message; written by the next flush.

        Frames queued in one loop iteration share one flush (one AEAD operation,
        one write). `now=True` writes at once, which saves a loop iteration for a
        lone call: when nothing else is queued the frame is sealed and written
        directly; inside data_received the flush at its end is used instead.
        """
        if self.error is not None:
            raise self.error
        n = len(payload)
        header = _MSG0_SMALL[n] if n < _SMALL else _MSG0_HEADER(n)
        urgent = self._urgent
        if self._in_receive:  # an answer from a handler run inline: the flush ending the read sends it
            urgent += (header, payload)
            if len(urgent) >= self._flush_at:  # ...or these go now, while we answer the rest
                self._flush()
            return
        if now:
            if not urgent and not self._bulk:
                pipe = self._pipe
                if pipe is not None and self.session.established:
                    pipe.write(self.session.encrypt(header + payload))
                    if self._busy is not None:
                        self._busy.wrote()
                    return
            urgent += (header, payload)
            self._flush()
            return
        urgent += (header, payload)
        if len(urgent) >= self._flush_at:  # the peer starts on these while we queue the rest
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    async def drain(self) -> None:
        """Wait until the pipe's write buffer fell below the low-water mark."""
        if not self._write_paused:
            if self.error is not None:
                raise self.error
            return
        fut = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def pause_writing(self) -> None:
        self._write_paused = True
        if not self._held_much:
            self._held_much = True
            tune_for_bulk()  # once per process: megabytes move through this pipe

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self.on_writable is not None and self.error is None:
            self.on_writable()

    def _queue_urgent(self, frame: bytes) -> None:
        if self.error is not None:
            return
        self._urgent.append(frame)
        if self._flush_handle is None and not self._in_receive:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _queue_bulk(self, header: bytes, payload: bytes | memoryview) -> None:
        if self.error is not None:
            raise self.error
        bulk = self._bulk
        bulk.append(header)  # always in pairs: seal_frames keeps each frame whole
        bulk.append(payload)
        if self._flush_handle is None and not self._in_receive:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pipe = self._pipe
        if pipe is None or not self.session.established:
            return
        urgent, bulk = self._urgent, self._bulk
        if bulk:
            self._bulk = []
            session = self.session
            if urgent:
                # calls and credits first, in their own message(s); bulk frames then go
                # whole into messages of their own (seal_frames)
                self._urgent = []
                first = session.encrypt(b"".join(urgent))
                pieces = session.seal_frames(bulk)
                pieces.insert(0, first)
            else:
                pieces = session.seal_frames(bulk)
            if len(bulk) >= _BULK_FLUSH_PIECES:
                tune_for_bulk()  # once per process: megabytes move through this pipe
            writelines = getattr(pipe, "writelines", None)
            if writelines is None:
                writelines = _joined_writer(pipe)
            if len(pieces) <= _WRITE_GROUP:
                writelines(pieces)  # uvloop: one writev, no copy
            else:  # asyncio (3.11) joins what writelines gets: keep each join under ~1 MiB
                for at in range(0, len(pieces), _WRITE_GROUP):
                    writelines(pieces[at : at + _WRITE_GROUP])
            if self._write_paused:
                self._check_write_buffer(pipe)
            if self._busy is not None:
                self._busy.wrote()
            return
        if not urgent:
            return
        self._urgent = []
        pipe.write(self.session.encrypt(b"".join(urgent)))
        if self._busy is not None:
            self._busy.wrote()
        if self._write_paused:
            self._check_write_buffer(pipe)
