"""What a peer may make us hold, and for how long: the hostile-peer limits of a connection.

Each limit closes the connection with a stable code and one rate-limited log
line (never a traceback per packet): a half-received frame counts against a
process-wide cap, stream windows against `max_stream_buffer` per connection
and `max_stream_buffer_total` per process (refusing that stream, not the
connection), bytes we owe a peer that stopped reading against
`max_write_buffer`, the handshake against `handshake_timeout`, silence against
`idle_timeout`, and a GOAWAY/RESET reason against `MAX_REASON`.

`PeerLimits` is a mixin of `SecureConnection`; the counters live on it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgpack

from swarmd.errors import ERR_CLOSED, ERR_HANDSHAKE, ERR_OVERLOADED, ERR_PROTOCOL, ERR_TIMEOUT, SwarmdError
from swarmd.net import mux
from swarmd.net.config import NetConfig
from swarmd.net.noise import NoiseSession
from swarmd.node.loglimit import hostile

if TYPE_CHECKING:
    from swarmd.net.channel import Channel


class PartialFrames:
    """Bytes of half-received frames held by all connections of this process."""

    total = 0


partial = PartialFrames()


class StreamWindows:
    """Bytes of stream windows peers opened on all connections of this process.

    A stream lets its peer put one window (mux.INITIAL_WINDOW) of bytes in our
    buffers that nobody has read yet, and lets us owe it one window in flight: a
    peer that opens streams and reads none (or sends into a handler that reads
    slowly) pins windows, never more. Counting windows at open is exact, where
    counting bytes as they arrive would be too late: the first window is granted
    by the protocol, not by us.
    """

    total = 0
    by_address: dict[str, int] = {}  # the same, per remote IP address (the pipe's peername)


stream_windows = StreamWindows()


def short(key: bytes | None) -> str:
    """A public key as it appears in log lines."""
    return key.hex()[:16] if key else "?"


class PeerLimits:
    """Caps on half-received frames, unread writes, handshake time and idle time."""

    config: NetConfig
    session: NoiseSession
    error: SwarmdError | None
    peername: Any
    _loop: asyncio.AbstractEventLoop
    _pipe: Any
    _partial_held: int
    _channels: dict[int, Channel]
    _last_recv: float
    _ping_outstanding: bool
    _timer: asyncio.TimerHandle | None
    _log: Any

    if TYPE_CHECKING:  # provided by SecureConnection and WriteBatcher

        def close(self, error: SwarmdError | None = None, *, tell_peer: bool = True) -> None: ...

        def _teardown(self, err: SwarmdError) -> None: ...

        def _close_pipe(self) -> None: ...

        def _queue_urgent(self, frame: bytes) -> None: ...

    def _account_partial(self, held: int) -> None:
        """Keep the process-wide total of half-received frames under its cap.

        One connection may hold a frame of up to max_message_size while it
        arrives, but thousands of peers each stopping in the middle of a large
        frame would add up without bound: past the cap, a connection holding a
        large partial frame is closed instead of growing the total.
        """
        partial.total += held - self._partial_held
        self._partial_held = held
        if held >= 1 << 20 and partial.total > self.config.max_partial_total:
            hostile.log(
                "partial frames cap",
                "INFO",
                "closing connection: half-received frames over the process cap",
                component="net",
                peer=short(self.session.remote_public_key),
                held=held,
                total=partial.total,
            )
            self.close(
                SwarmdError(
                    ERR_OVERLOADED,
                    f"too much half-received data on this node ({partial.total} bytes); "
                    f"this connection held {held}",
                )
            )

    def _reserve_stream(self, peer_opened: bool) -> None:
        """Refuse one more stream when its window would pass the connection's or the process's
        stream buffer cap (ERR_OVERLOADED for that request: the connection others use stays)."""
        window = mux.INITIAL_WINDOW
        cfg = self.config
        n = len(self._channels)
        held = self._windows_held()
        if held + window > cfg.max_stream_buffer:
            raise SwarmdError(
                ERR_OVERLOADED,
                f"{n} streams open on this connection hold up to {held} bytes of stream data "
                f"(a window per stream each way); max_stream_buffer is {cfg.max_stream_buffer}",
            )
        if not peer_opened:
            return  # the streams this node opens are bounded by the code that opens them
        source = self._stream_source()
        held = stream_windows.by_address.get(source, 0)
        if held + window > cfg.max_stream_buffer_per_address:
            hostile.log(
                "stream buffer address cap",
                "INFO",
                "refusing streams: one address holds its share of the process's stream windows",
                component="net",
                peer=short(self.session.remote_public_key),
                source=source,
                held=held,
            )
            raise SwarmdError(
                ERR_OVERLOADED,
                f"streams from {source or 'this address'} hold up to {held} bytes of stream data on this node; "
                f"max_stream_buffer_per_address is {cfg.max_stream_buffer_per_address}: try again later",
            )
        if stream_windows.total + window > cfg.max_stream_buffer_total:
            hostile.log(
                "stream buffer cap",
                "INFO",
                "refusing streams: the process's stream windows are at max_stream_buffer_total",
                component="net",
                peer=short(self.session.remote_public_key),
                total=stream_windows.total,
            )
            raise SwarmdError(
                ERR_OVERLOADED,
                f"this node's open streams hold up to {stream_windows.total} bytes of stream data; "
                f"max_stream_buffer_total is {cfg.max_stream_buffer_total}: try again later",
            )
        stream_windows.total += window
        stream_windows.by_address[source] = held + window

    def _stream_source(self) -> str:
        """The remote IP address the stream windows of this connection count against."""
        peer = self.peername
        return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""

    def _windows_held(self) -> int:
        return sum(ch._window.window for ch in self._channels.values())

    def _may_grow_window(self, channel: Any, extra: int) -> bool:
        """Whether a bulk stream's window may grow by `extra` (mux.RecvWindow.growth): it stays
        within half of max_stream_buffer on this connection, so other streams can still open,
        and a peer's stream within its address's share and the process's max_stream_buffer_total."""
        if self._windows_held() + extra > self.config.max_stream_buffer // 2:
            return False
        if channel.peer_opened:
            cfg = self.config
            source = self._stream_source()
            held = stream_windows.by_address.get(source, 0)
            if held + extra > cfg.max_stream_buffer_per_address:
                return False
            if stream_windows.total + extra > cfg.max_stream_buffer_total:
                return False
            stream_windows.total += extra
            stream_windows.by_address[source] = held + extra
        return True

    def _drop_channel(self, channel_id: int) -> None:
        """Forget a channel (ended, reset, refused or torn down) and give its window back."""
        ch = self._channels.pop(channel_id, None)
        if ch is not None and ch.peer_opened:
            window = ch._window.window
            stream_windows.total -= window
            source = self._stream_source()
            left = stream_windows.by_address.get(source, window) - window
            if left > 0:
                stream_windows.by_address[source] = left
            else:
                stream_windows.by_address.pop(source, None)

    def _check_write_buffer(self, pipe: Any) -> None:
        """Close a connection whose peer stopped reading once what we owe it passes the cap.

        Senders of bulk wait for drain() and the RPC layer holds new requests in a
        bounded backlog, but replies the peer provokes at will (PONGs, errors) would
        otherwise grow the pipe's buffer for as long as the peer keeps sending.
        """
        size = getattr(pipe, "get_write_buffer_size", None)
        if size is None or size() <= self.config.max_write_buffer:
            return
        hostile.log(
            "write buffer cap",
            "INFO",
            "closing connection: peer does not read what we send",
            component="net",
            peer=short(self.session.remote_public_key),
            buffered=size(),
        )
        self._teardown(
            SwarmdError(
                ERR_OVERLOADED,
                f"peer does not read: {size()} bytes queued for it, the cap is {self.config.max_write_buffer}",
            )
        )
        self._close_pipe()

    def _on_handshake_timeout(self) -> None:
        if not self.session.established and self.error is None:
            err = SwarmdError(
                ERR_HANDSHAKE, f"handshake did not complete within {self.config.handshake_timeout} s"
            )
            hostile.log(
                "handshake timeout", "INFO", "handshake timed out", component="net", peer=str(self.peername)
            )
            self._teardown(err)
            if self._pipe is not None:
                self._close_pipe()

    def _on_keepalive_timer(self) -> None:
        if self.error is not None:
            return
        cfg = self.config
        silent = self._loop.time() - self._last_recv
        if silent >= cfg.idle_timeout:
            self._log.bind(peer=short(self.session.remote_public_key), silent_s=round(silent, 1)).info(
                "closing idle connection"
            )
            self.close(SwarmdError(ERR_TIMEOUT, f"no traffic from the peer for {silent:.1f} s"))
            return
        if silent >= cfg.keepalive_interval and not self._ping_outstanding:
            self._ping_outstanding = True
            self._queue_urgent(mux.encode(mux.PING, 0, b"ka"))
        delay = min(cfg.keepalive_interval, cfg.idle_timeout - silent)
        self._timer = self._loop.call_later(max(delay, 0.05), self._on_keepalive_timer)


MAX_REASON = 4096  # bytes of a GOAWAY/RESET reason we read; it ends up in errors and log lines


def error_from_payload(payload: bytes, default: str) -> SwarmdError:
    if not payload:
        return SwarmdError(ERR_CLOSED, default)
    if len(payload) > MAX_REASON:
        return SwarmdError(ERR_PROTOCOL, f"{default} (a reason of {len(payload)} bytes, not read)")
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception:
        return SwarmdError(ERR_PROTOCOL, f"{default} (unreadable reason)")
    err = SwarmdError.from_wire(obj)
    if len(err.code) > 64:
        return SwarmdError(ERR_PROTOCOL, f"{default} (an error code of {len(err.code)} characters)")
    return err
