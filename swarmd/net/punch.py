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

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError

Address = tuple[str, int]

CHUNK = 64 * 1024  # one data channel message; SCTP fragments it
HIGH_WATER = 1 << 20  # pause writers above this many queued bytes
LOW_WATER = 256 * 1024
MSG_DATA = 0
MSG_EOF = 1
MAX_SDP = 16 * 1024  # an offer with a few candidates is ~1 KB


@dataclass
class PunchInfo:
    """Which pair of candidates carried the punched path, for connection info and logs."""

    local: str = ""
    remote: str = ""
    remote_type: str = ""  # host / srflx / prflx
    gather_s: float = 0.0
    connect_s: float = 0.0


class PunchedPipe:
    """A byte pipe over an ordered, reliable data channel.

    Each message starts with one type byte (data or end-of-stream), so a
    half-close travels in order with the data, like TCP's FIN.
    """

    def __init__(self, pc: Any, channel: Any, info: PunchInfo) -> None:
        self._pc = pc
        self._ch = channel
        self.info = info
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._writable.set)
        channel.on("close", self._on_close)

    def _on_message(self, message: Any) -> None:
        if not isinstance(message, bytes) or not message:
            return
        if message[0] == MSG_DATA:
            self._buf += message[1:]
        else:
            self._eof = True
        self._readable.set()

    def _on_close(self) -> None:
        self._eof = True
        self._closed = True
        self._readable.set()
        self._writable.set()

    def write(self, data: bytes) -> None:
        if self._closed:
            raise SwarmdError(ERR_CLOSED, "punched path closed")
        view = memoryview(data)
        for i in range(0, len(view), CHUNK - 1):
            self._ch.send(bytes([MSG_DATA]) + bytes(view[i : i + CHUNK - 1]))
        if self._ch.bufferedAmount > HIGH_WATER:
            self._writable.clear()

    async def drain(self) -> None:
        while not self._closed and self._ch.bufferedAmount > HIGH_WATER:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            raise SwarmdError(ERR_CLOSED, "punched path closed")

    def write_eof(self) -> None:
        if not self._closed:
            self._ch.send(bytes([MSG_EOF]))

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        if n < 0:
            while not self._eof:
                self._readable.clear()
                await self._readable.wait()
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _unacked(self) -> int:
        """Bytes not yet acknowledged by the peer (queued, in flight)."""
        sctp = getattr(self._pc, "sctp", None)
        queued = len(getattr(sctp, "_outbound_queue", ())) + len(getattr(sctp, "_sent_queue", ()))
        return self._ch.bufferedAmount + queued

    async def close(self, linger: float = 5.0) -> None:
        """Close after what we wrote is acknowledged (bounded), like TCP's linger:
        tearing SCTP down earlier would drop the tail of the stream."""
        for _ in range(int(linger / 0.01)):  # SCTP acks raise no event we can await
            if self._closed or not self._unacked():
                break
            await asyncio.sleep(0.01)
        self._closed = True
        self._readable.set()
        self._writable.set()
        with contextlib.suppress(Exception):
            self._ch.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pc.close(), 5.0)


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
        self._state_changed = asyncio.Event()
        self._pc.on("iceconnectionstatechange", self._state_changed.set)
        self.info = PunchInfo()
        self._t0 = time.monotonic()
        self.log = logger.bind(part="punch")

    async def offer(self) -> str:
        """Caller: gather candidates (STUN on our DHT nodes) and return the offer SDP."""
        await self._pc.setLocalDescription(await self._pc.createOffer())
        self.info.gather_s = time.monotonic() - self._t0
        return self._pc.localDescription.sdp

    async def answer(self, offer_sdp: str) -> str:
        """Callee: take the caller's offer, gather, and return the answer SDP."""
        from aiortc import RTCSessionDescription

        _check_sdp(offer_sdp)
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        self.info.gather_s = time.monotonic() - self._t0
        return self._pc.localDescription.sdp

    async def accept_answer(self, answer_sdp: str) -> None:
        from aiortc import RTCSessionDescription

        _check_sdp(answer_sdp)
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    async def connected(self, timeout: float) -> PunchedPipe:
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
        return PunchedPipe(self._pc, self._ch, self.info)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pc.close(), 5.0)


def _check_sdp(sdp: Any) -> None:
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise SwarmdError("ERR_BAD_REQUEST", "ICE description must be an SDP text starting with 'v=0'")
    if len(sdp) > MAX_SDP:
        raise SwarmdError("ERR_TOO_LARGE", f"ICE description of {len(sdp)} bytes exceeds {MAX_SDP}")


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
