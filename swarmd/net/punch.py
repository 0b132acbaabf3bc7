"""Hole punching with ICE, and a reliable ordered byte pipe over the punched path.

ICE comes from aiortc (which wraps aioice): the caller makes an offer (its
ICE credentials and candidates, gathered with STUN answered by our own DHT
nodes), the callee answers through signalling, both run connectivity checks
(peer-reflexive candidates included, which is what lets a restricted cone
reach a symmetric NAT), and an SCTP data channel gives a reliable, ordered
path. `PunchedPipe` turns that channel into the same byte-pipe shape as a TCP
stream (write / drain / read / write_eof / close), so the Noise handshake and
the RPC run on top unchanged and end to end.

STUN servers are always given explicitly (ours); aiortc would otherwise fall
back to a public STUN server when the list is missing. aiortc is imported
lazily: it costs ~35 MB and ~0.2 s and only a punching node needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.node.deadline import within

Address = tuple[str, int]

CHUNK = 64 * 1024  # one data channel message; SCTP fragments it
HIGH_WATER = 1 << 20  # pause writers above this many queued bytes
LOW_WATER = 256 * 1024
MSG_DATA = 0
MSG_EOF = 1
MAX_SDP = 16 * 1024  # an offer with a few candidates is ~1 KB
GATHER_TIMEOUT = 8.0  # host + server-reflexive candidates from our STUN servers


@dataclass
class PunchInfo:
    """Which pair of candidates carried the punched path, for connection info and logs."""

    local: str = ""
    remote: str = ""
    remote_type: str = ""  # host / srflx / prflx
    gather_s: float = 0.0
    connect_s: float = 0.0


class PunchedTransport(asyncio.Transport):
    """An asyncio transport over an ordered, reliable data channel.

    Any `asyncio.Protocol` runs on it as on TCP: `attach(protocol)` calls
    `connection_made`, arriving bytes go to `data_received`, backpressure to
    `pause_writing`/`resume_writing`. That is how the Noise connection
    (swarmd.net.connection.SecureConnection) runs over a punched path.
    Each message starts with one type byte (data or end-of-stream), so a
    half-close travels in order with the data, like TCP's FIN.
    """

    def __init__(self, pc: Any, channel: Any, info: PunchInfo, early: list[Any] | None = None) -> None:
        """`early`: messages the channel delivered before this transport existed;
        the caller must route the channel's later "message" events to `_on_message`."""
        super().__init__()
        self._pc = pc
        self._ch = channel
        self.info = info
        self._protocol: asyncio.BaseProtocol | None = None
        self._early: list[bytes | None] = []  # messages before attach (None = EOF)
        self._paused = False
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._closing = False
        self._lost = False
        self._closer: asyncio.Task[None] | None = None
        channel.bufferedAmountLowThreshold = self._low
        channel.on("bufferedamountlow", self._on_low)
        channel.on("close", self._on_close)
        for message in early or ():
            self._on_message(message)

    # -- protocol side -----------------------------------------------------------

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)
        early, self._early = self._early, []
        for msg in early:
            self._deliver(msg)
        if self._lost:
            self._lost = False
            self._on_close()

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def _deliver(self, msg: bytes | None) -> None:
        proto = self._protocol
        if proto is None:
            self._early.append(msg)
            return
        if msg is None:
            eof_received = getattr(proto, "eof_received", None)
            keep_open = eof_received() if eof_received is not None else False
            if not keep_open:
                self.close()
        else:
            # SecureConnection is an asyncio.BufferedProtocol (get_buffer for sockets) that
            # also takes whole messages through data_received, which is what a datagram-ish
            # pipe like a data channel delivers; so ask for the method, not the class.
            data_received = getattr(proto, "data_received", None)
            if data_received is None:
                raise TypeError(f"{type(proto).__name__} cannot take data from a punched pipe")
            data_received(msg)

    def _on_message(self, message: Any) -> None:
        if not isinstance(message, bytes) or not message:
            return  # strings or empty messages are not part of our protocol
        self._deliver(message[1:] if message[0] == MSG_DATA else None)

    def _on_low(self) -> None:
        if self._paused and self._protocol is not None:
            self._paused = False
            self._protocol.resume_writing()

    def _on_close(self) -> None:
        if self._protocol is None:
            self._lost = True
            return
        if not self._lost:
            self._lost = True
            self._closing = True
            self._protocol.connection_lost(None)

    # -- transport API -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise SwarmdError(ERR_CLOSED, "punched path closed")
        view = memoryview(data)
        for i in range(0, len(view), CHUNK - 1):
            self._ch.send(bytes([MSG_DATA]) + bytes(view[i : i + CHUNK - 1]))
        if not self._paused and self._ch.bufferedAmount > self._high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._closing:
            self._ch.send(bytes([MSG_EOF]))

    def get_write_buffer_size(self) -> int:
        return int(self._ch.bufferedAmount)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = HIGH_WATER if high is None else high
        self._low = (self._high // 4) if low is None else low
        self._ch.bufferedAmountLowThreshold = self._low

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        remote = self.info.remote.rpartition(":")
        return {
            "peername": (remote[0], int(remote[2])) if remote[2].isdigit() else None,
            "path": "punched",
            "punch": self.info,
        }.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close after what we wrote is acknowledged (bounded), like TCP's linger."""
        if self._closing:
            return
        self._closing = True
        self._closer = asyncio.ensure_future(self._linger_close())

    def abort(self) -> None:
        self._closing = True
        self._closer = asyncio.ensure_future(self._linger_close(linger=0.0))

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await asyncio.shield(self._closer)

    def _unacked(self) -> int:
        """Bytes not yet acknowledged by the peer (queued, in flight)."""
        sctp = getattr(self._pc, "sctp", None)
        queued = len(getattr(sctp, "_outbound_queue", ())) + len(getattr(sctp, "_sent_queue", ()))
        return int(self._ch.bufferedAmount) + queued

    async def _linger_close(self, linger: float = 5.0) -> None:
        # tearing SCTP down before the peer acknowledged would drop the stream's tail
        for _ in range(int(linger / 0.01)):  # SCTP acks raise no event we can await
            if self._lost or not self._unacked():
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(Exception):
            self._ch.close()
        with contextlib.suppress(Exception):
            await within(self._pc.close(), 5.0)
        self._on_close()


class _StreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.readable.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.readable.set()
        return True  # keep our side open: the stream may still be writing

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.readable.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class PunchedPipe:
    """Stream-style use of a punched path (write / drain / read / write_eof / close)."""

    def __init__(self, transport: PunchedTransport) -> None:
        self.transport = transport
        self.info = transport.info
        self._p = _StreamProtocol()
        transport.attach(self._p)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        await self._p.writable.wait()
        if self.transport._lost:
            raise SwarmdError(ERR_CLOSED, "punched path closed")

    def write_eof(self) -> None:
        self.transport.write_eof()

    async def read(self, n: int = -1) -> bytes:
        p = self._p
        while not p.buf and not p.eof:
            p.readable.clear()
            await p.readable.wait()
        if n < 0:
            while not p.eof:
                p.readable.clear()
                await p.readable.wait()
            n = len(p.buf)
        out = bytes(p.buf[:n])
        del p.buf[:n]
        return out

    async def close(self) -> None:
        self.transport.close()
        await self.transport.wait_closed()


async def warm_up() -> None:
    """Import aiortc in a thread, ahead of the first punch: imported inside a punch it
    blocks the event loop (~0.2 s quiet, > 1 s loaded) and with it every other path."""
    import importlib

    await asyncio.to_thread(importlib.import_module, "aiortc")


def _ice_servers(stun_servers: list[Address]) -> list[Any]:
    from aiortc import RTCIceServer

    return [RTCIceServer(urls=f"stun:{h}:{p}") for h, p in stun_servers]


def _selected_pair(pc: Any) -> tuple[str, str, str]:
    """(local, remote, remote candidate type) of the nominated pair, best effort."""
    try:
        conn = pc.sctp.transport.transport._connection
        pair = conn._nominated.get(1)
        local = pair.local_candidate
        remote = pair.remote_candidate
        return f"{local.host}:{local.port}", f"{remote.host}:{remote.port}", remote.type
    except Exception:  # aiortc internals: connection info only, never worth failing for
        return "", "", ""


class Puncher:
    """One side of one punching attempt. The caller offers, the callee answers."""

    def __init__(self, stun_servers: list[Address]) -> None:
        if not stun_servers:
            # an empty list would make aiortc use a public STUN server: refuse instead
            raise SwarmdError(ERR_UNAVAILABLE, "hole punching needs at least one of our STUN servers (DHT nodes)")
        from aiortc import RTCConfiguration, RTCPeerConnection

        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=_ice_servers(stun_servers)))
        self._ch = self._pc.createDataChannel("swarmd", ordered=True, negotiated=True, id=0)
        self._opened = asyncio.Event()
        self._ch.on("open", self._opened.set)
        # The peer may write the moment the channel opens, before our waiting task
        # resumes: catch messages from the start and replay them into the transport.
        self._early: list[Any] = []
        self._deliver: Any = self._early.append
        self._ch.on("message", lambda m: self._deliver(m))
        self._state_changed = asyncio.Event()
        self._pc.on("iceconnectionstatechange", self._state_changed.set)
        self.info = PunchInfo()
        self._t0 = time.monotonic()
        self.log = logger.bind(part="punch")

    async def offer(self) -> str:
        """Caller: gather candidates (STUN on our DHT nodes) and return the offer SDP."""
        try:
            await within(self._pc.setLocalDescription(await self._pc.createOffer()), GATHER_TIMEOUT)
        except TimeoutError:
            await self.close()
            raise SwarmdError(ERR_TIMEOUT, f"gathering ICE candidates took longer than {GATHER_TIMEOUT:g}s") from None
        self.info.gather_s = time.monotonic() - self._t0
        return self._pc.localDescription.sdp

    async def answer(self, offer_sdp: str) -> str:
        """Callee: take the caller's offer, gather, and return the answer SDP."""
        from aiortc import RTCSessionDescription

        _check_sdp(offer_sdp)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            # gathering asks our STUN servers; bounded, as every await on the network
            await within(self._pc.setLocalDescription(await self._pc.createAnswer()), GATHER_TIMEOUT)
        except TimeoutError:
            await self.close()
            raise SwarmdError(ERR_TIMEOUT, f"gathering ICE candidates took longer than {GATHER_TIMEOUT:g}s") from None
        except SwarmdError:
            raise
        except Exception as e:  # aiortc rejects malformed or unsupported SDP with assorted exceptions
            await self.close()
            raise SwarmdError(ERR_BAD_REQUEST, f"ICE offer rejected: {type(e).__name__}: {e}"[:300]) from None
        self.info.gather_s = time.monotonic() - self._t0
        return self._pc.localDescription.sdp

    async def accept_answer(self, answer_sdp: str) -> None:
        from aiortc import RTCSessionDescription

        _check_sdp(answer_sdp)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        except Exception as e:  # aiortc rejects malformed or unsupported SDP with assorted exceptions
            raise SwarmdError(ERR_BAD_REQUEST, f"ICE answer rejected: {type(e).__name__}: {e}"[:300]) from None

    async def connected(self, timeout: float) -> PunchedTransport:
        """Wait (bounded) for the checks to succeed and the channel to open."""
        deadline = time.monotonic() + timeout
        while not self._opened.is_set():
            if self._pc.iceConnectionState == "failed":
                await self.close()
                raise SwarmdError(ERR_UNAVAILABLE, "ICE connectivity checks failed: no punched path")
            left = deadline - time.monotonic()
            if left <= 0:
                await self.close()
                raise SwarmdError(ERR_TIMEOUT, f"no punched path within {timeout:g}s")
            self._state_changed.clear()
            waiters = [asyncio.ensure_future(self._opened.wait()), asyncio.ensure_future(self._state_changed.wait())]
            try:
                await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        self.info.connect_s = time.monotonic() - self._t0
        self.info.local, self.info.remote, self.info.remote_type = _selected_pair(self._pc)
        self.log.bind(
            event="punched", local=self.info.local, remote=self.info.remote, remote_type=self.info.remote_type,
            seconds=round(self.info.connect_s, 3),
        ).info("punched a direct path")
        transport = PunchedTransport(self._pc, self._ch, self.info, early=self._early)
        self._deliver = transport._on_message
        return transport

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await within(self._pc.close(), 5.0)


def _check_sdp(sdp: Any) -> None:
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise SwarmdError(ERR_BAD_REQUEST, "ICE description must be an SDP text starting with 'v=0'")
    if len(sdp) > MAX_SDP:
        raise SwarmdError(ERR_TOO_LARGE, f"ICE description of {len(sdp)} bytes exceeds {MAX_SDP}")
    if "\nm=application " not in sdp:
        raise SwarmdError(ERR_BAD_REQUEST, "ICE description must offer one data channel (an m=application line)")


@dataclass
class PathAttempt:
    path: str  # direct / punched / relayed
    ok: bool
    seconds: float
    error: str = ""


@dataclass
class PathInfo:
    """The chosen path and how we got there: part of connection info and the logs."""

    path: str = ""
    setup_s: float = 0.0
    attempts: list[PathAttempt] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "setup_ms": round(self.setup_s * 1000, 1),
            "attempts": [
                {"path": a.path, "ok": a.ok, "ms": round(a.seconds * 1000, 1), **({"error": a.error} if a.error else {})}
                for a in self.attempts
            ],
            **self.detail,
        }
