"""Asyncio glue for UDX (swarmd/net/udx.py) on an already-punched UDP socket.

`UdxTransport` takes the punch's socket over (a duplicate of its descriptor,
so the NAT mappings the punch opened keep carrying it) and exposes the UDX
stream as an `asyncio.Transport`: the Noise connection
(swarmd.net.connection.SecureConnection) attaches to it exactly as to TCP.

Per wake-up it reads up to READ_BATCH datagrams (or, where the kernel offers
UDP GRO, as many coalesced ones), feeds them to the core at once, delivers the
in-order bytes in one `data_received`, and sends what the core has due: runs
of equal-sized datagrams go to the kernel as one UDP GSO `sendmsg`
(`UDP_SEGMENT`) where it accepts that, one `sendto` each otherwise. One timer
handle serves every deadline the core has (acks, retransmissions, keepalive).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import struct
import sys
from typing import Any

from loguru import logger

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, SwarmdError
from swarmd.net.udppunch import tune_socket
from swarmd.net.udx import CLOSED, MAGIC, OPEN, Rst, UdxCore, rst_name

Address = tuple[str, int]

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: send one buffer as many datagrams of this size (GSO)
UDP_GRO = 104  # receive runs of datagrams coalesced, with their size in a control message
GSO_MAX = 44  # datagrams per GSO send: 44 x 1452 stays under the 65,507-byte UDP limit
READ_BATCH = 64  # reads per wake-up before acting on them
RECV_SIZE = 65535  # one read: a datagram, or a GRO run of them
HIGH_WATER = 4 << 20  # pause the writer above this many unacknowledged bytes
LOW_WATER = 1 << 20
LINGER = 5.0  # close waits this long at most for our data to be acknowledged
_GRO_CMSG = socket.CMSG_SPACE(4)


class UdxTransport(asyncio.Transport):
    """One UDX connection to one peer on a given UDP socket, as a transport.

    Use `await UdxTransport.open(udp, peer, token=..., is_client=..., timeout=...)`;
    then `attach(protocol)` (connection_made, data_received, eof_received,
    pause_writing/resume_writing, connection_lost, as TCP would call them).
    """

    def __init__(self, udp: asyncio.DatagramTransport, peer: Address, core: UdxCore) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        old = udp.get_extra_info("socket")
        self._sock = socket.socket(fileno=os.dup(old.fileno()))
        self._sock.setblocking(False)
        tune_socket(self._sock)
        udp.close()
        self._fd = self._sock.fileno()
        self._sockname = self._sock.getsockname()
        self._peer = (peer[0], peer[1])
        self._core = core
        self._gso = True
        self._gro = False
        with contextlib.suppress(OSError):
            self._sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            self._gro = True
        self._backlog: collections.deque[list[bytes]] = collections.deque()
        self._writing = False
        self._blocked = False
        self._sock_closed = False
        self._loop.add_reader(self._fd, self._read_ready)
        self._protocol: asyncio.BaseProtocol | None = None
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._soon: asyncio.Handle | None = None
        self._paused = False  # the writer (our protocol) is paused
        self._reading = True
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._closing = False
        self._lost = False
        self._eof_delivered = False
        self._closer: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self.strays = 0  # datagrams from other addresses, or not UDX (late punch probes)
        self.gro_runs = 0  # reads that returned a coalesced run of datagrams
        self.gso_sends = 0  # sends that handed the kernel a run of datagrams
        self.handshake_s = 0.0
        self.log = logger.bind(part="udx", peer=f"{peer[0]}:{peer[1]}")

    @classmethod
    async def open(
        cls,
        udp: asyncio.DatagramTransport,
        peer: Address,
        *,
        token: bytes,
        is_client: bool,
        timeout: float,
        first: bytes | None = None,
    ) -> UdxTransport:
        """Take over `udp` and open the UDX connection with `peer` (bounded). The
        responder passes the initiator's SYN, which the punch received, as `first`."""
        t = cls(udp, peer, UdxCore(token, initiator=is_client, now=asyncio.get_running_loop().time()))
        t0 = t._loop.time()
        if is_client:
            t._core.connect(t0)
            t._transmit()
        elif first is not None:
            t._core.receive([first], t0)
            t._after_input()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(t._opened)
        except TimeoutError:
            t.abort()
            raise SwarmdError(ERR_TIMEOUT, f"UDX handshake over the punched path took longer than {timeout:g}s") from None
        except SwarmdError:
            t.abort()
            raise
        t.handshake_s = t._loop.time() - t0
        return t

    # -- input ---------------------------------------------------------------------------

    def _read_ready(self) -> None:
        sock, peer = self._sock, self._peer
        batch: list[Any] = []
        gro = self._gro
        for _ in range(READ_BATCH):
            try:
                if gro:
                    data, anc, _flags, addr = sock.recvmsg(RECV_SIZE, _GRO_CMSG)
                else:
                    data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error surfacing on the socket: loss, the core retransmits
            if addr != peer:
                self.strays += 1
                continue
            if gro and anc:
                seg = 0
                for level, kind, value in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                        seg = int.from_bytes(value[:4], sys.byteorder)  # a C int: the run's datagram size
                if 0 < seg < len(data):
                    view = memoryview(data)
                    batch.extend(view[i : i + seg] for i in range(0, len(data), seg))
                    self.gro_runs += 1
                    continue
            if not data or data[0] != MAGIC:
                self.strays += 1  # a late punch probe from the peer's socket, or not ours at all
                continue
            batch.append(data)
        if batch and not self._lost:
            self._core.receive(batch, self._loop.time())
            self._after_input()

    def _after_input(self) -> None:
        core = self._core
        if not self._opened.done() and core.state == OPEN:
            self._opened.set_result(None)
        self._transmit()
        self._deliver()

    def _deliver(self) -> None:
        core = self._core
        proto = self._protocol
        if proto is not None and (self._reading or core.state == CLOSED):
            chunks = core.take_data()
            if chunks:
                # one bytes object per batch (a lone chunk may be a view into a GRO read)
                one = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else b"".join(chunks)
                proto.data_received(one)  # type: ignore[attr-defined]
            if core.eof_received and not self._eof_delivered and not self._lost:
                self._eof_delivered = True
                eof_received = getattr(proto, "eof_received", None)
                if not (eof_received() if eof_received is not None else False):
                    self.close()
        if core.state == CLOSED:
            self._connection_lost()
            return
        buffered = core.buffered
        if self._paused and buffered <= self._low and proto is not None:
            self._paused = False
            proto.resume_writing()  # type: ignore[attr-defined]
        if core.drained:
            self._drained.set()

    # -- output --------------------------------------------------------------------------

    def _transmit(self) -> None:
        self._soon = None
        core = self._core
        now = self._loop.time()
        out = core.datagrams_to_send(now)
        if out and not self._sock_closed:
            if self._backlog:
                self._backlog.append(out)
            else:
                self._send(out)
        if core.state == CLOSED:
            return
        deadline = core.next_deadline()
        if deadline is None:
            return
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return  # it fires first and re-arms for what is due then
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        # asyncio may run a timer up to its clock resolution early: act at the time asked for
        now = max(self._timer_at, self._loop.time())
        self._timer = None
        if self._lost:
            return
        self._core.on_timer(now)
        self._after_input()

    def _schedule(self) -> None:
        if self._soon is None:
            self._soon = self._loop.call_soon(self._transmit_and_deliver)

    def _transmit_and_deliver(self) -> None:
        self._transmit()
        self._deliver()

    def _send(self, out: list[bytes]) -> None:
        """Hand datagrams to the kernel: runs of one size as GSO sends; what the kernel
        buffer cannot take now waits in the backlog (bounded by the core's windows)."""
        sock, peer = self._sock, self._peer
        i, n = 0, len(out)
        while i < n:
            size = len(out[i])
            j = i + 1
            if self._gso:
                limit = min(n, i + GSO_MAX)
                while j < limit and len(out[j]) == size:
                    j += 1
                if j < limit and len(out[j]) < size:
                    j += 1  # a GSO run may end with one shorter datagram
            try:
                if j - i == 1:
                    sock.sendto(out[i], peer)
                else:
                    sock.sendmsg(out[i:j], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, peer)
                    self.gso_sends += 1
            except (BlockingIOError, InterruptedError):
                self._blocked = True
                self._backlog.appendleft(out[i:])
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._fd, self._on_writable)
                return
            except OSError as e:
                if j - i > 1 and e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self._gso = False  # this path cannot segment: one datagram per send from now on
                    self.log.bind(event="udx_no_gso", error=str(e)).debug("UDP GSO refused; sending datagrams one by one")
                    continue
                # unreachable for now (ICMP): loss, the core retransmits
            i = j

    def _on_writable(self) -> None:
        while self._backlog:
            self._blocked = False
            self._send(self._backlog.popleft())
            if self._blocked:
                return  # the kernel buffer is full again: the writer callback stays
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    # -- closing -------------------------------------------------------------------------

    def _connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._drained.set()
        for h in (self._timer, self._soon):
            if h is not None:
                h.cancel()
        core = self._core
        exc: Exception | None = None
        if core.close_code == Rst.TIMEOUT and not core.remote_closed:
            exc = SwarmdError(ERR_TIMEOUT, f"punched path: {core.close_reason}")
        elif core.remote_closed and core.close_code != Rst.CLOSE:
            exc = SwarmdError(ERR_CLOSED, f"punched path: {core.close_reason}")
        if not self._opened.done():
            self._opened.set_exception(SwarmdError(ERR_CLOSED, f"punched path closed during the UDX handshake: {core.close_reason}"))
            self._opened.exception()  # retrieved: open() may have given up already
        self._close_socket()
        # one line per connection: how the path behaved (batching, losses, what was dropped)
        self.log.bind(event="udx_closed", code=rst_name(core.close_code), by_peer=core.remote_closed,
                      **self.info()).info("punched-UDP stream closed: {}", core.close_reason or "closed")
        if self._protocol is not None:
            self._protocol.connection_lost(exc)

    def _close_socket(self) -> None:
        if self._sock_closed:
            return
        self._sock_closed = True
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._backlog.clear()
        self._sock.close()

    # -- transport API -------------------------------------------------------------------

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)
        self._deliver()

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise SwarmdError(ERR_CLOSED, "punched path closed")
        if self._core._eof_queued:
            raise SwarmdError(ERR_CLOSED, "punched path: write after write_eof")
        if not data:
            return
        self._core.write(data if type(data) is bytes else bytes(data))
        self._wrote()

    def writelines(self, chunks: Any) -> None:
        if self._closing:
            raise SwarmdError(ERR_CLOSED, "punched path closed")
        if self._core._eof_queued:
            raise SwarmdError(ERR_CLOSED, "punched path: write after write_eof")
        write = self._core.write
        for c in chunks:
            if c:
                write(c if type(c) is bytes else bytes(c))
        self._wrote()

    def _wrote(self) -> None:
        self._drained.clear()
        self._schedule()
        if not self._paused and self._protocol is not None and self._core.buffered > self._high:
            self._paused = True
            self._protocol.pause_writing()  # type: ignore[attr-defined]

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._core._eof_queued:
            return
        self._core.write_eof()
        self._drained.clear()
        self._schedule()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._schedule()

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def get_write_buffer_size(self) -> int:
        return self._core.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # the stream must keep a window in flight: never below our own marks
        self._high = max(HIGH_WATER, high or 0)
        self._low = max(LOW_WATER, low or 0) if low is not None else self._high // 4

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "sockname":
            return self._sockname
        if name == "path":
            return "punched"
        if name == "udx":
            return self.info()
        return default

    def info(self) -> dict[str, Any]:
        core = self._core
        return {
            "handshake_ms": round(self.handshake_s * 1000, 2),
            "gso": self._gso,
            "gro": self._gro,
            "srtt_ms": round((core.srtt or 0.0) * 1000, 2),
            "cwnd": int(core.cwnd),
            "strays": self.strays,
            "gro_runs": self.gro_runs,
            "gso_sends": self.gso_sends,
            **core.stats.to_dict(),
        }

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close once what we wrote is acknowledged (bounded by LINGER), like TCP's linger."""
        if self._closing:
            return
        self._closing = True
        self._closer = self._loop.create_task(self._linger_close(LINGER))

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._core.abort()
        self._transmit()
        self._connection_lost()

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _linger_close(self, linger: float) -> None:
        if not self._core.drained:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger):
                    await self._drained.wait()
        if not self._lost:
            self._core.close_rst()
            self._transmit()
            await asyncio.sleep(0)
        self._connection_lost()

