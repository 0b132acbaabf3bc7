"""One secure, multiplexed connection over any byte pipe (asyncio glue).

`SecureConnection` is an `asyncio.Protocol`, so a TCP transport drives it
directly; any other pipe (a hole-punched data channel, a relayed stream) drives
it the same way by calling `connection_made(pipe)`, `data_received(bytes)`,
`connection_lost(exc)` and optionally `pause_writing()/resume_writing()`, where
`pipe` only needs `write(bytes)` and `close()`.

The protocol logic lives in the sans-IO cores (`noise.NoiseSession`,
`mux.MuxDecoder`, `mux.SendCredit/RecvWindow`). This module is the pipe glue:
it feeds received bytes through Noise and the mux decoder and dispatches the
frames to channel 0 (RPC messages) or a `channel.Channel`. Outgoing frames are
batched by `writebatch.WriteBatcher`; what a peer may make us hold is capped by
`peerlimits.PeerLimits`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
from loguru import logger

from swarmd.errors import ERR_CLOSED, ERR_HANDSHAKE, ERR_OVERLOADED, ERR_PROTOCOL, SwarmdError
from swarmd.net import mux
from swarmd.net.busypoll import BusyPoll
from swarmd.net.channel import Channel
from swarmd.net.config import NetConfig
from swarmd.net.noise import HandshakeError, NoiseSession, reject_frame
from swarmd.net.peerlimits import PeerLimits, error_from_payload, partial, short
from swarmd.net.writebatch import WriteBatcher
from swarmd.node.identity import Identity
from swarmd.node.loglimit import hostile
from swarmd.node.memory import release_freed_memory_soon


class Pipe(Protocol):
    """The byte pipe a secure connection runs over."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


_HEADER_UNPACK = mux.HEADER.unpack_from
_MUX_HEADER_SIZE = mux.HEADER_SIZE


_READ_BUFFER_SIZE = 256 * 1024  # what asyncio's own transports read at most per call
_read_buffers = threading.local()
_COPY_BELOW = 4096  # reads up to this size are copied out, larger ones parsed in place


def _read_buffer() -> memoryview:
    """This thread's receive buffer, shared by every connection of its event loop.

    A transport fills it (get_buffer), then hands it over (buffer_updated) in
    one synchronous step, and buffer_updated copies out what it keeps, so one
    buffer per thread serves any number of connections.
    """
    try:
        return _read_buffers.view  # type: ignore[no-any-return]
    except AttributeError:
        view = _read_buffers.view = memoryview(bytearray(_READ_BUFFER_SIZE))
        return view


class SecureConnection(WriteBatcher, PeerLimits, asyncio.Protocol, asyncio.BufferedProtocol):
    """Noise + mux over a pipe; the RPC layer plugs in through the on_* callbacks.

    It is both kinds of asyncio protocol, and each event loop picks its quicker
    read path: the standard selector loop sees a BufferedProtocol and reads into
    a reused buffer (get_buffer/buffer_updated) instead of `sock.recv(256 KiB)`,
    which costs it an mmap/mremap/munmap and page faults on every read (~10 us,
    more than all of our per-call CPU); uvloop sees a Protocol and calls
    data_received with bytes read into its own static buffer, which saves a
    Python call (get_buffer) and a buffer export per read: ~1 us of a 64-byte
    call's round trip. Other pipes call data_received(bytes).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        remote_public_key: bytes | None = None,
        config: NetConfig | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config or NetConfig()
        self._loop = loop or asyncio.get_running_loop()
        self.identity = identity
        self.initiator = initiator
        self.session = NoiseSession(identity, initiator=initiator, remote_public_key=remote_public_key)
        self.established: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[SwarmdError] = self._loop.create_future()
        self.on_message: Callable[[bytes], None] | None = None
        self.on_close: Callable[[SwarmdError], None] | None = None
        self.on_writable: Callable[[], None] | None = None  # the pipe drained below low water
        self.peername: Any = None
        self._pipe: Pipe | None = None
        self._decoder = mux.MuxDecoder(self.config.max_message_size)
        self._urgent: list[bytes] = []
        self._bulk: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_at = 2 * self.config.flush_frames if self.config.flush_frames > 0 else 1 << 62
        cfg = self.config
        self._busy = BusyPoll(self._loop, cfg.busy_poll_us, cfg.busy_poll_answer_us) if cfg.busy_poll_us > 0 else None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._channels: dict[int, Channel] = {}
        self._next_channel = 1 if initiator else 2
        self._timer: asyncio.TimerHandle | None = None
        self._last_recv = self._loop.time()
        self._ping_outstanding = False
        self._in_receive = False
        self.error: SwarmdError | None = None
        self._refusal: str | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._held_much = False  # buffers of megabytes were held for this peer at some point
        self._partial_held = 0  # bytes of a half-received frame counted in peerlimits.partial.total
        self._log = logger.bind(component="net")

    # -- public ------------------------------------------------------------

    @property
    def remote_public_key(self) -> bytes | None:
        return self.session.remote_public_key

    @property
    def is_closed(self) -> bool:
        return self.error is not None

    def open_channel(self) -> Channel:
        """A new stream channel with an id of this side's parity."""
        if self.error is not None:
            raise self.error
        if len(self._channels) >= self.config.max_streams:
            raise SwarmdError(
                ERR_OVERLOADED, f"{len(self._channels)} streams open, the limit is {self.config.max_streams}"
            )
        self._reserve_stream(peer_opened=False)
        cid = self._next_channel
        self._next_channel += 2
        ch = Channel(self, cid)
        self._channels[cid] = ch
        return ch

    def accept_channel(self, channel_id: int) -> Channel:
        """Register a channel the peer opened (announced by the layer above)."""
        if channel_id <= 0 or channel_id >= 1 << 32 or (channel_id & 1) != (1 if not self.initiator else 0):
            raise SwarmdError(ERR_PROTOCOL, f"channel id {channel_id} does not have the peer's parity")
        if channel_id in self._channels:
            raise SwarmdError(ERR_PROTOCOL, f"channel {channel_id} is already open")
        if len(self._channels) >= self.config.max_streams:
            raise SwarmdError(
                ERR_OVERLOADED, f"{len(self._channels)} streams open, the limit is {self.config.max_streams}"
            )
        self._reserve_stream(peer_opened=True)
        ch = Channel(self, channel_id, peer_opened=True)
        self._channels[channel_id] = ch
        return ch

    def close(self, error: SwarmdError | None = None, *, tell_peer: bool = True) -> None:
        """Close the connection; pending waiters get `error` (ERR_CLOSED by default)."""
        if self.error is not None:
            return
        err = error or SwarmdError(ERR_CLOSED, "connection closed by this side")
        if tell_peer and self.session.established and self._pipe is not None:
            try:
                self._urgent.append(mux.encode(mux.GOAWAY, 0, msgpack.packb(err.to_wire())))
                self._flush()
            except Exception:  # best effort: the pipe may already be gone
                pass
        self._teardown(err)
        self._close_pipe()

    # -- pipe side ---------------------------------------------------------

    def refuse(self, reason: str) -> None:
        """Before the pipe opens: answer the handshake with a reject and close (e.g. server full)."""
        self._refusal = reason

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._pipe = transport
        if self._refusal is not None and not self.initiator:
            transport.write(reject_frame(self._refusal))
            self._teardown(SwarmdError(ERR_OVERLOADED, self._refusal))
            transport.close()
            return
        get_extra = getattr(transport, "get_extra_info", None)
        if get_extra is not None:
            self.peername = get_extra("peername")
            sock = get_extra("socket")
            if sock is not None:
                import socket

                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
        set_limits = getattr(transport, "set_write_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=self.config.write_high_water, low=self.config.write_low_water)
        self._last_recv = self._loop.time()
        self._timer = self._loop.call_later(self.config.handshake_timeout, self._on_handshake_timeout)
        if self.session.initiator:
            transport.write(self.session.start())

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        view = _read_buffer()[:nbytes]
        # Small reads (calls, answers) are copied out; large ones (stream data) are parsed
        # in place, which is safe because nothing below keeps `data` past this call: whole
        # frames are decrypted at once and a partial frame is copied into its decoder.
        self.data_received(view if nbytes > _COPY_BELOW else bytes(view))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self._busy is not None:
            self._busy.received()
        self._last_recv = self._loop.time()  # also when the requests in this read arrived (rpc deadlines)
        self._ping_outstanding = False
        session = self.session
        try:
            if session.established:
                plaintexts = session.decrypt_stream(data)
            else:
                out, plaintexts = session.receive(data)
                if out:
                    self._pipe.write(out)  # type: ignore[union-attr]
                if session.established:
                    self._on_established()
            if plaintexts:
                self._in_receive = True
                decoder = self._decoder
                try:
                    on_message = self.on_message
                    largest = decoder.max_frame + _MUX_HEADER_SIZE
                    for plain in plaintexts:
                        size = len(plain)
                        if (
                            _MUX_HEADER_SIZE < size <= largest
                            and not decoder._buf
                            and _HEADER_UNPACK(plain) == (0, 0, size - _MUX_HEADER_SIZE)  # MSG, channel 0
                            and on_message is not None
                        ):
                            # fast path: a message that is exactly one call or answer
                            on_message(plain[_MUX_HEADER_SIZE:])
                            continue
                        if not decoder._buf and on_message is not None and size <= largest:
                            # calls and answers batched in one message: the whole channel-0 MSG
                            # frames at its start go straight up; the mux decoder takes the rest
                            # (other frames, a frame continued in the next message; a frame
                            # ending within this message is no larger than the largest allowed)
                            pos = 0
                            while size - pos > _MUX_HEADER_SIZE:
                                ftype, cid, n = _HEADER_UNPACK(plain, pos)
                                body = pos + _MUX_HEADER_SIZE
                                stop = body + n
                                if ftype or cid or stop > size:
                                    break
                                on_message(plain[body:stop])
                                pos = stop
                            if pos == size:
                                continue
                            if pos:
                                plain = plain[pos:]
                        self._dispatch(decoder.feed(plain))
                finally:
                    self._in_receive = False
                if (decoder._buf or self._partial_held) and self.error is None:
                    self._account_partial(decoder.buffered)
                if self._urgent or self._bulk:
                    self._flush()
        except HandshakeError as e:
            if e.reply and self._pipe is not None:
                self._pipe.write(e.reply)
            hostile.log(
                "handshake failed",
                "INFO",
                "handshake failed",
                component="net",
                peer=str(self.peername),
                reason=e.message,
            )
            self._teardown(e)
            self._close_pipe()
        except SwarmdError as e:
            hostile.log(
                f"protocol:{e.code}",
                "INFO",
                "closing connection: peer broke the protocol",
                component="net",
                peer=short(self.remote_public_key),
                code=e.code,
                reason=e.message,
            )
            self.close(e)

    def _close_pipe(self) -> None:
        """Close the pipe; abort it when the peer does not read what is left to flush.

        A plain close waits for the write buffer to drain, which a peer that stopped
        reading would stretch forever: that peer gets `close_grace` seconds, or none
        when the buffer is already over high water.
        """
        pipe = self._pipe
        if pipe is None:
            return
        abort = getattr(pipe, "abort", None)
        if abort is not None and self._write_paused:
            abort()
            return
        pipe.close()
        if abort is not None and self._abort_handle is None:
            self._abort_handle = self._loop.call_later(self.config.close_grace, self._abort_if_open, pipe)

    def _abort_if_open(self, pipe: Any) -> None:
        self._abort_handle = None
        if self._pipe is pipe:
            pipe.abort()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self.error is None:
            if not self.session.established:
                self._teardown(SwarmdError(ERR_HANDSHAKE, "connection closed during the handshake"))
            else:
                self._teardown(SwarmdError(ERR_CLOSED, "connection closed by the peer"))
        self._pipe = None

    # -- internals ---------------------------------------------------------

    def _on_established(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.config.keepalive_interval, self._on_keepalive_timer)
        if not self.established.done():
            self.established.set_result(None)

    def _dispatch(self, frames: list[tuple[int, int, bytes]]) -> None:
        on_message = self.on_message
        channels = self._channels
        for ftype, cid, payload in frames:
            if ftype == mux.MSG:
                if cid == 0:
                    if on_message is not None:
                        on_message(payload)
                    continue
                ch = channels.get(cid)
                if ch is not None:
                    ch._on_data(payload)
                continue
            mux.check_control(ftype, cid, payload)
            if ftype == mux.CREDIT:
                ch = channels.get(cid)
                if ch is not None:
                    ch._credit.grant(int.from_bytes(payload, "big"))
                    ch._wake_credit()
            elif ftype == mux.END:
                ch = channels.get(cid)
                if ch is not None:
                    ch._on_end()
            elif ftype == mux.RESET:
                ch = channels.get(cid)
                if ch is not None:
                    err = error_from_payload(payload, f"stream {cid} reset by the peer")
                    ch._fail(err)
            elif ftype == mux.PING:
                if not self._write_paused:  # a peer that does not read gets no PONGs to pile up
                    self._queue_urgent(mux.encode(mux.PONG, 0, payload))
            elif ftype == mux.PONG:
                pass
            elif ftype == mux.GOAWAY:
                err = error_from_payload(payload, "peer closed the connection")
                if err.code == ERR_CLOSED:
                    self._log.bind(peer=short(self.remote_public_key), reason=err.message).debug(
                        "peer closed the connection"
                    )
                else:  # the peer picks code and reason, and may connect again and again
                    hostile.log(
                        "goaway",
                        "INFO",
                        "peer closed the connection",
                        component="net",
                        peer=short(self.remote_public_key),
                        code=err.code,
                        reason=err.message,
                    )
                self._teardown(
                    err if err.code != ERR_CLOSED else SwarmdError(ERR_CLOSED, f"peer closed: {err.message}")
                )
                if self._pipe is not None:
                    self._close_pipe()
                return

    def _teardown(self, err: SwarmdError) -> None:
        if self.error is not None:
            return
        self.error = err
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._urgent = []
        self._bulk = []
        if self._decoder.buffered >= 1 << 20:
            self._held_much = True
        partial.total -= self._partial_held
        self._partial_held = 0
        # a half-received frame can be megabytes: let it go now, not when a GC pass
        # breaks the connection <-> peer reference cycle
        self._decoder = mux.MuxDecoder(self.config.max_message_size)
        self.session.discard_buffered()
        for ch in list(self._channels.values()):
            ch._fail(SwarmdError(ERR_CLOSED, f"connection closed: {err.message}"))
        self._channels.clear()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(SwarmdError(ERR_CLOSED, f"connection closed: {err.message}"))
        self._drain_waiters = []
        if not self.established.done():
            self.established.set_exception(err)
            self.established.exception()  # mark retrieved: a dropped dial is not a loop error
        if not self.closed.done():
            self.closed.set_result(err)
        cb = self.on_close
        if cb is not None:
            try:
                cb(err)
            except Exception:
                self._log.exception("on_close callback failed")
        if self._held_much:
            # the pipe's write buffer goes with the transport, after connection_lost
            release_freed_memory_soon(self._loop)
