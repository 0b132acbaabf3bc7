"""What a peer may make us hold, and for how long: the hostile-peer limits of a connection.

Each limit closes the connection with a stable code and one rate-limited log
line (never a traceback per packet): a half-received frame counts against a
process-wide cap, bytes we owe a peer that stopped reading against
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
from swarmd.net.loglimit import hostile
from swarmd.net.noise import NoiseSession


class PartialFrames:
    """Bytes of half-received frames held by all connections of this process."""

    total = 0


partial = PartialFrames()


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
