"""A reliable, ordered byte pipe over QUIC (aioquic) on an already-punched UDP socket.

Hole punching (swarmd/net/udppunch.py) leaves one UDP socket and the peer's
address that answered it. `QuicTransport` runs one QUIC connection on that very
socket (so the NAT mappings the punch opened keep carrying it) and exposes its
first bidirectional stream as an `asyncio.Transport`: the Noise connection
(swarmd.net.connection.SecureConnection) attaches to it exactly as to TCP.

QUIC's TLS is framing here, nothing more: the server's certificate is a
throwaway self-signed one, the client verifies nothing, and identity comes from
the Noise handshake that runs end to end inside the stream. What QUIC brings is
a maintained, congestion-controlled, flow-controlled reliable stream in ~1 RTT.

Sizes: datagrams of MAX_DATAGRAM bytes (under a 1492-byte PPPoE MTU), 64 MiB
flow-control windows (a fat pipe stays full), and our own backpressure: the
writer pauses while more than HIGH_WATER bytes wait to be acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.udppunch import is_quic, tune_socket

Address = tuple[str, int]

ALPN = "swarmd-punch/1"
MAX_DATAGRAM = 1452  # UDP payload; IPv4 + UDP headers make 1480, under PPPoE's 1492
WINDOW = 64 << 20  # connection and stream flow-control windows
HIGH_WATER = 4 << 20  # pause the writer above this many unacknowledged bytes
LOW_WATER = 1 << 20
IDLE_TIMEOUT = 60.0  # QUIC closes a connection that heard nothing this long
KEEPALIVE = 15.0  # a PING this often keeps the NAT mappings (and the idle timer) alive
STREAM_ID = 0  # the client's first bidirectional stream carries everything
PREAMBLE = b"\x01"  # the client's first stream byte (version 1): opens the stream at once, so the server may speak first
LINGER = 5.0  # close waits this long at most for our data to be acknowledged
READ_BATCH = 64  # datagrams read per wake-up before acting on them (one transmit per batch)
RECV_SIZE = 2048  # larger than any datagram we send or accept


_CREDENTIALS: list[tuple[Any, Any]] = []


def _credentials() -> tuple[Any, Any]:
    """One throwaway self-signed certificate per process: QUIC needs one, nobody checks it."""
    if not _CREDENTIALS:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarmd")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(os.urandom(8), "big"))
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        _CREDENTIALS.append((cert, key))
    return _CREDENTIALS[0]


def quic_configuration(is_client: bool) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_size=MAX_DATAGRAM,
        max_data=WINDOW,
        max_stream_data=WINDOW,
        idle_timeout=IDLE_TIMEOUT,
        congestion_control_algorithm="cubic",
        verify_mode=ssl.CERT_NONE,  # identity is Noise's, end to end inside the stream
    )
    if not is_client:
        cfg.certificate, cfg.private_key = _credentials()
    return cfg


@dataclass
class QuicInfo:
    local: str = ""
    remote: str = ""
    handshake_s: float = 0.0


class QuicTransport(asyncio.Transport):
    """One QUIC connection to one peer on a given UDP socket, its stream 0 as a transport.

    Use `await QuicTransport.open(udp, peer, is_client=..., timeout=...)`; then
    `attach(protocol)` (connection_made, data_received, eof_received,
    pause_writing/resume_writing, connection_lost, as TCP would call them).
    """

    def __init__(self, udp: asyncio.DatagramTransport, peer: Address, *, is_client: bool) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        # Take the socket over from the punch's datagram transport: a duplicate of its
        # descriptor, read in batches (up to READ_BATCH datagrams per wake-up, then one
        # transmit), written directly with a backlog when the kernel buffer is full.
        # asyncio's datagram transport reads one datagram per loop iteration, which
        # halves what Python can carry. The duplicate keeps the punched port bound.
        old = udp.get_extra_info("socket")
        self._sock = socket.socket(fileno=os.dup(old.fileno()))
        self._sock.setblocking(False)
        tune_socket(self._sock)
        self._fd = self._sock.fileno()
        self._backlog: collections.deque[bytes] = collections.deque()
        self._writing = False
        self._sockname = self._sock.getsockname()
        udp.close()
        self._loop.add_reader(self._fd, self._read_ready)
        self._sock_closed = False
        self._peer = (peer[0], peer[1])
        self._is_client = is_client
        self._quic: QuicConnection | None = None
        if is_client:
            self._quic = QuicConnection(configuration=quic_configuration(True))
        self._protocol: asyncio.BaseProtocol | None = None
        self._early: list[bytes | None] = []  # stream data before attach (None = end of stream)
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._paused = False
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._closing = False
        self._lost = False
        self._eof_sent = False
        self._closer: asyncio.Task[None] | None = None
        self._ping = 0
        self._stream_open = is_client  # the server may send on stream 0 once the client opened it
        self._preamble = not is_client  # the server still has to read (and drop) the client's preamble byte
        self._held: list[bytes] = []  # what the server wrote before that (b"" = end of stream)
        self._drained = asyncio.Event()  # set when nothing we wrote waits for an ack (close waits on it)
        sock = self._sockname
        self.info = QuicInfo(local=f"{sock[0]}:{sock[1]}", remote=f"{peer[0]}:{peer[1]}")

    @classmethod
    async def open(
        cls,
        udp: asyncio.DatagramTransport,
        peer: Address,
        *,
        is_client: bool,
        timeout: float,
        first: bytes | None = None,
    ) -> QuicTransport:
        """Take over `udp` and complete the QUIC handshake with `peer` (bounded).
        The server side passes the client's first Initial packet as `first` when
        the punching protocol received it."""
        t = cls(udp, peer, is_client=is_client)
        t0 = t._loop.time()
        if is_client:
            assert t._quic is not None
            t._quic.connect(t._peer, now=t0)
            t._transmit()
        elif first is not None:
            t._datagram(first, t._peer)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(t._connected)
        except TimeoutError:
            t.abort()
            raise SwarmdError(ERR_TIMEOUT, f"QUIC handshake over the punched path took longer than {timeout:g}s") from None
        except SwarmdError:
            t.abort()
            raise
        t.info.handshake_s = t._loop.time() - t0
        t._arm_keepalive()
        return t

    # -- QUIC driving ------------------------------------------------------------------

    def _read_ready(self) -> None:
        got = False
        now = self._loop.time()
        for _ in range(READ_BATCH):
            try:
                data, addr = self._sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error surfacing on the socket: QUIC retransmits
            got = self._feed(data, addr, now) or got
        if got:
            self._after_receive()

    def _datagram(self, data: bytes, addr: Address) -> None:
        if self._feed(data, addr, self._loop.time()):
            self._after_receive()

    def _feed(self, data: bytes, addr: Address, now: float) -> bool:
        if (addr[0], addr[1]) != self._peer or not is_quic(data) or self._lost:
            return False  # late punch probes, strays: QUIC talks to the punched peer only
        if self._quic is None:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            except ValueError:
                return False
            if header.packet_type != QuicPacketType.INITIAL:
                return False
            self._quic = QuicConnection(
                configuration=quic_configuration(False),
                original_destination_connection_id=header.destination_cid,
            )
        self._quic.receive_datagram(data, self._peer, now=now)
        return True

    def _after_receive(self) -> None:
        self._process_events()
        self._transmit()
        unacked = self._unacked()
        if self._paused and unacked <= self._low and self._protocol is not None:
            self._paused = False
            self._protocol.resume_writing()
        if not unacked:
            self._drained.set()

    def _process_events(self) -> None:
        assert self._quic is not None
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                if not self._connected.done():
                    self._connected.set_result(None)
                    if self._is_client:
                        self._quic.send_stream_data(STREAM_ID, PREAMBLE)
            elif isinstance(event, events.StreamDataReceived):
                if event.stream_id != STREAM_ID:
                    continue  # we open one stream; a peer's other streams carry nothing of ours
                if not self._stream_open:
                    self._stream_open = True
                    held, self._held = self._held, []
                    for chunk in held:
                        self._quic.send_stream_data(STREAM_ID, chunk, end_stream=not chunk)
                data = event.data
                if self._preamble and data:
                    if data[:1] != PREAMBLE:
                        self._quic.close(reason_phrase="unknown stream preamble")
                        continue
                    self._preamble = False
                    data = data[1:]
                if data:
                    self._deliver(data)
                if event.end_stream:
                    self._deliver(None)
            elif isinstance(event, events.ConnectionTerminated):
                reason = event.reason_phrase or f"QUIC error {event.error_code}"
                if not self._connected.done():
                    self._connected.set_exception(SwarmdError(ERR_UNAVAILABLE, f"QUIC handshake failed: {reason}"))
                    self._connected.exception()  # retrieved: open() may have given up already
                self._connection_lost()

    def _transmit(self, now: float | None = None) -> None:
        self._transmit_handle = None
        if self._quic is None or self._sock_closed:
            return
        now = self._loop.time() if now is None else now
        self._backlog.extend(data for data, _addr in self._quic.datagrams_to_send(now=now))
        self._flush()
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._on_timer)
        self._timer_at = timer_at

    def _schedule_transmit(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self._loop.call_soon(self._transmit)

    def _on_timer(self) -> None:
        # asyncio runs a timer up to its clock resolution early; aioquic's pacer and loss
        # timers would then find nothing due and send nothing: act at the time asked for
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        if self._quic is None:
            return
        self._quic.handle_timer(now=now)
        self._process_events()
        self._transmit(now)

    def _arm_keepalive(self) -> None:
        if self._lost:
            return
        self._keepalive = self._loop.call_later(KEEPALIVE, self._send_keepalive)

    def _send_keepalive(self) -> None:
        if self._quic is None or self._lost:
            return
        self._ping += 1
        self._quic.send_ping(self._ping)
        self._transmit()
        self._arm_keepalive()

    def _unacked(self) -> int:
        """Bytes written to the stream and not yet acknowledged by the peer."""
        if self._quic is None:
            return 0
        stream = self._quic._streams.get(STREAM_ID)  # aioquic keeps no public counter of this
        held = sum(len(c) for c in self._held)
        return held + (len(stream.sender._buffer) if stream is not None else 0)

    # -- protocol side -------------------------------------------------------------------

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)
        early, self._early = self._early, []
        for msg in early:
            self._deliver(msg)
        if self._lost:
            self._lost = False
            self._connection_lost()

    def _deliver(self, data: bytes | None) -> None:
        proto = self._protocol
        if proto is None:
            self._early.append(data)
            return
        if data is None:
            eof_received = getattr(proto, "eof_received", None)
            if not (eof_received() if eof_received is not None else False):
                self.close()
            return
        # SecureConnection is a BufferedProtocol that also takes whole chunks through
        # data_received; ask for the method, not the class
        proto.data_received(data)  # type: ignore[attr-defined]

    def _connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._drained.set()
        for h in (self._timer, self._keepalive, self._transmit_handle):
            if h is not None:
                h.cancel()
        if not self._connected.done():
            self._connected.set_exception(SwarmdError(ERR_CLOSED, "punched path closed during the QUIC handshake"))
            self._connected.exception()
        self._close_socket()
        if self._protocol is not None:
            self._protocol.connection_lost(None)
        else:
            self._lost = True  # attach() reports it

    def _flush(self) -> None:
        backlog = self._backlog
        while backlog:
            try:
                self._sock.sendto(backlog[0], self._peer)
            except (BlockingIOError, InterruptedError):
                if not self._writing:  # the kernel buffer is full: go on when it drains
                    self._writing = True
                    self._loop.add_writer(self._fd, self._on_writable)
                return
            except OSError:
                pass  # unreachable for now (ICMP): QUIC treats it as loss
            backlog.popleft()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_writable(self) -> None:
        self._flush()

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

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._quic is None:
            raise SwarmdError(ERR_CLOSED, "punched path closed")
        if self._eof_sent:
            raise SwarmdError(ERR_CLOSED, "punched path: write after write_eof")
        if self._stream_open:
            self._quic.send_stream_data(STREAM_ID, bytes(data))
        elif data:
            self._held.append(bytes(data))
        self._drained.clear()
        self._schedule_transmit()
        if not self._paused and self._protocol is not None and self._unacked() > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_sent or self._quic is None:
            return
        self._eof_sent = True
        if self._stream_open:
            self._quic.send_stream_data(STREAM_ID, b"", end_stream=True)
        else:
            self._held.append(b"")
        self._schedule_transmit()

    def get_write_buffer_size(self) -> int:
        return self._unacked()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # the stream must keep a bandwidth-delay product in flight: never below our own marks
        self._high = max(HIGH_WATER, high or 0)
        self._low = max(LOW_WATER, low or 0) if low is not None else self._high // 4

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {
            "peername": self._peer,
            "sockname": self._sockname,
            "path": "punched",
            "quic": self.info,
        }.get(name, default)

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
        if self._quic is not None:
            self._quic.close(reason_phrase="aborted")
            self._transmit()
        self._connection_lost()

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _linger_close(self, linger: float) -> None:
        if self._unacked():
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger):
                    await self._drained.wait()
        if not self._lost and self._quic is not None:
            self._quic.close()
            self._transmit()
            await asyncio.sleep(0)  # let the CONNECTION_CLOSE leave
        self._connection_lost()
