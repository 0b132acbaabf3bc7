"""UDX: a lean reliable, ordered, congestion-controlled byte stream over UDP (sans-IO core).

The punched-UDP path (swarmd/net/udppunch.py) leaves one UDP socket and the
peer's address. This core turns datagrams on it into one ordered byte stream,
in the spirit of Hyperswarm's UDX: no encryption of its own, because Noise
(swarmd.net.connection.SecureConnection) runs end to end on top, exactly as on
TCP. It owns no socket, task or timer: the caller feeds it datagrams and the
time (`receive`, `on_timer`), hands it bytes to send (`write`, `write_eof`),
and takes datagrams to transmit (`datagrams_to_send`) and stream bytes out
(`take_data`). swarmd/net/udxio.py is the asyncio glue.

It is built for Python's cost model: work is per batch, not per packet where
it can be (one ack per read batch or per ACK_EVERY packets, SACK ranges
computed only when data arrived out of order, one timer deadline for
everything), and every data packet but a batch's last is MAX_DATAGRAM bytes,
so the glue can hand a whole batch to the kernel in one UDP GSO send.

Wire format (all integers big-endian; docs/protocol.md "UDX"): every packet
starts with the 24-byte header

    u8 magic 0x55 ('U', version 1; its 0x40 bit set, so it is never taken for a
       punch probe or STUN) | u8 type | u16 count (ACK: SACK ranges; else 0) |
    u64 connection id (the receiver's own random id; 0 only in SYN) |
    u32 seq | u32 ack (next in-order seq the sender expects) |
    u32 window (packets past ack the sender will buffer)

DATA carries 1..MSS payload bytes; FIN (end of stream) occupies one seq and no
payload; ACK carries `count` SACK ranges (u32 start, u32 end, end exclusive);
SYN and SYNACK carry the punch's 16-byte token and the sender's own id (u64);
PING asks for an ACK; RST (u8 code) ends the connection. Whatever does not
parse, names another connection, or lies outside the windows is dropped and
counted (`stats`), never raised.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = 0x55
HEADER = struct.Struct("!BBHQIII")
HDR = HEADER.size  # 24
MAX_DATAGRAM = 1452  # UDP payload; IPv4 + UDP headers make 1480, under PPPoE's 1492
MSS = MAX_DATAGRAM - HDR  # stream bytes per DATA packet
TOKEN_LEN = 16
SYN_LEN = HDR + TOKEN_LEN + 8
MAX_SACK = 32  # SACK ranges per ACK
SEQ_LIMIT = 0xFFFF_FF00  # a connection ends (RST) before its sequence numbers could wrap

RCV_WINDOW = 2048  # packets past the in-order point we buffer (~2.8 MiB): the peer's send window
INITIAL_CWND = 64  # packets
MIN_CWND = 4
MAX_CWND = 4096
BETA = 0.7  # multiplicative decrease on a loss episode (CUBIC's)
DUPTHRESH = 3  # a packet is lost when one DUPTHRESH seqs later was acknowledged
ACK_EVERY = 16  # in-order packets received before an ack goes out at once
ACK_DELAY = 0.002  # s: otherwise at most this late
MIN_RTO, MAX_RTO, INITIAL_RTO = 0.2, 10.0, 0.5
DEAD_AFTER = 30.0  # s of sent data without any acknowledgement: the path is gone
SYN_RTO = 0.1  # first SYN retransmission (doubles)
KEEPALIVE = 15.0  # s between PINGs while idle (keeps the NAT mappings, and the peer's idle timer)
IDLE_TIMEOUT = 60.0  # s without a valid packet: the path is gone


class Type(IntEnum):
    DATA = 1
    ACK = 2
    SYN = 3
    SYNACK = 4
    FIN = 5
    PING = 6
    RST = 7


class Rst(IntEnum):
    CLOSE = 0  # the peer closed after everything it sent was acknowledged
    ABORT = 1  # the peer aborted
    PROTOCOL = 2  # the peer found our packets wrong
    TIMEOUT = 3  # the peer gave us up (no acks)


DATA, ACK, SYN, SYNACK, FIN, PING, RST = (int(t) for t in Type)

CONNECTING, OPEN, CLOSED = "connecting", "open", "closed"


def is_udx(datagram: bytes) -> bool:
    """A UDX packet starts with the magic byte (punch probes start with 0x00, STUN with 0b00)."""
    return len(datagram) >= HDR and datagram[0] == MAGIC


def is_udx_syn(datagram: bytes) -> bool:
    """Looks like a connection's opening packet (the core checks its token itself)."""
    return len(datagram) == SYN_LEN and datagram[0] == MAGIC and datagram[1] == SYN


def new_id() -> int:
    while True:
        cid = int.from_bytes(os.urandom(8), "big")
        if cid:
            return cid


@dataclass
class UdxStats:
    """Counters, for logs and connection info (dropped packets are never an exception)."""

    sent: int = 0  # datagrams handed out to send
    received: int = 0  # datagrams fed in
    retransmits: int = 0
    rto: int = 0  # retransmission timeouts
    loss_episodes: int = 0
    dropped_bad: int = 0  # not UDX, truncated, unknown type, another connection's id
    dropped_window: int = 0  # data outside the receive window, acks of data never sent
    duplicates: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class UdxCore:
    """One side of one UDX connection. The initiator calls `connect(now)`; the
    responder feeds the initiator's SYN to `receive`. Both must know `token` (the
    punch id both sides already share through signalling)."""

    def __init__(self, token: bytes, *, initiator: bool, now: float, local_id: int | None = None) -> None:
        if len(token) != TOKEN_LEN:
            raise ValueError(f"a UDX token is {TOKEN_LEN} bytes, got {len(token)}")
        self.token = bytes(token)
        self.initiator = initiator
        self.local_id = local_id or new_id()
        self.peer_id = 0
        self.state = CONNECTING
        self.stats = UdxStats()
        self.close_code: int | None = None  # why it closed (Rst code; ours or the peer's)
        self.close_reason = ""
        self.remote_closed = False  # closed by the peer's RST
        # send side
        self._sndq: list[bytes] = []  # written, not yet cut into packets
        self._sndq_head = 0  # index of the first unconsumed chunk
        self._snd_off = 0  # offset into that chunk
        self.unsent = 0  # bytes in _sndq not yet in packets
        self._eof_queued = False
        self._fin_seq: int | None = None
        self.snd_una = 0  # oldest unacknowledged seq
        self.snd_nxt = 0  # next new seq
        self.inflight: dict[int, bytes] = {}  # seq -> payload, unacked and un-SACKed, in seq order
        self._lost: dict[int, None] = {}  # seqs to retransmit (ordered set)
        self._rtx_at: dict[int, float] = {}  # seq -> when last retransmitted
        self._high_sacked = -1
        self._recovery = 0  # a loss below this seq belongs to the current episode
        self.peer_edge = RCV_WINDOW  # seqs below this the peer accepts
        self.cwnd = float(INITIAL_CWND)
        self.ssthresh = float(MAX_CWND)
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = INITIAL_RTO
        self._timed: tuple[int, float] | None = None  # (seq, sent at): one RTT sample at a time
        self._rto_at: float | None = None
        self._progress_at = 0.0  # last time the peer acknowledged something
        self._syn_at: float | None = None
        self._syn_sent = 0.0
        self._syn_rto = SYN_RTO
        # receive side
        self.rcv_next = 0
        self._ooo: dict[int, bytes] = {}  # seq -> payload (or b"" for FIN), out of order
        self._ready: list[bytes] = []  # in-order payloads not yet taken
        self.eof_received = False
        self._peer_fin: int | None = None
        self._ack_pending = 0
        self._ack_now = False
        self._ack_at: float | None = None
        self._ping_pending = False
        self._synack_pending = False
        self._rst: int | None = None  # an RST to send, then closed
        self._last_recv = now  # the idle timer runs from creation
        self._last_send = now
        self._out: list[bytes] = []

    # -- application side ----------------------------------------------------------------

    def connect(self, now: float) -> None:
        if not self.initiator or self._syn_at is not None:
            raise RuntimeError("connect() is the initiator's, once")
        self._syn_sent = now
        self._syn_at = now + self._syn_rto
        self._last_recv = now
        self._out.append(self._syn(SYN, 0))

    def write(self, data: bytes) -> None:
        if self._eof_queued or self.state == CLOSED:
            raise RuntimeError("write after write_eof or close")
        if data:
            self._sndq.append(data)
            self.unsent += len(data)

    def write_eof(self) -> None:
        self._eof_queued = True

    def abort(self, code: int = Rst.ABORT, reason: str = "") -> None:
        """Send an RST (if we know the peer) and close at once."""
        if self.state == CLOSED:
            return
        if self.peer_id:
            self._rst = code
        self._close(code, reason)

    @property
    def buffered(self) -> int:
        """Bytes written and not yet acknowledged (the writer's backpressure measure)."""
        return self.unsent + len(self.inflight) * MSS

    @property
    def drained(self) -> bool:
        return not self.unsent and not self.inflight and not self._lost and (
            not self._eof_queued or (self._fin_seq is not None and self.snd_una > self._fin_seq)
        )

    def take_data(self) -> list[bytes]:
        """In-order stream bytes received since the last call. What is not taken (the
        reader paused) stays here and shrinks the window we advertise."""
        ready, self._ready = self._ready, []
        if len(ready) > RCV_WINDOW // 2:
            self._ack_now = True  # the window was half shut: tell the peer it is open again
        return ready

    def window(self) -> int:
        return max(0, RCV_WINDOW - len(self._ooo) - len(self._ready))

    # -- receiving -----------------------------------------------------------------------

    def receive(self, datagrams: list[bytes] | list[memoryview], now: float) -> None:
        """Feed one read batch (already filtered to the peer's address)."""
        if self.state == CLOSED:
            return
        stats = self.stats
        stats.received += len(datagrams)
        unpack = HEADER.unpack_from
        local = self.local_id
        ooo = self._ooo
        ready = self._ready
        valid = False
        for d in datagrams:
            if len(d) < HDR or d[0] != MAGIC:
                stats.dropped_bad += 1
                continue
            _m, typ, count, cid, seq, ack, wnd = unpack(d)
            if cid != local:
                if typ == SYN and cid == 0:
                    valid = self._on_syn(d, now) or valid
                else:
                    stats.dropped_bad += 1
                continue
            if typ == DATA:
                if len(d) == HDR or self.state != OPEN:
                    stats.dropped_bad += 1
                    continue
                valid = True
                nxt = self.rcv_next
                if seq == nxt and not ooo and self._peer_fin is None and len(ready) < RCV_WINDOW:
                    ready.append(d[HDR:])
                    self.rcv_next = nxt + 1
                    self._ack_pending += 1
                else:
                    self._on_data_slow(seq, d[HDR:])
                if ack != self.snd_una or ack + wnd != self.peer_edge:
                    if not self._on_ack(ack, wnd, (), now):
                        continue
            elif typ == ACK:
                if self.state != OPEN or len(d) != HDR + 8 * count or count > MAX_SACK:
                    stats.dropped_bad += 1
                    continue
                sacks = struct.unpack_from(f"!{2 * count}I", d, HDR) if count else ()
                if self._on_ack(ack, wnd, sacks, now):
                    valid = True
            elif typ == FIN:
                if len(d) != HDR or self.state != OPEN:
                    stats.dropped_bad += 1
                    continue
                valid = True
                self._on_data_slow(seq, b"", fin=True)
                self._on_ack(ack, wnd, (), now)
            elif typ == PING:
                if self.state == OPEN:
                    valid = True
                    self._ack_now = True
            elif typ == SYNACK:
                valid = self._on_synack(d, now) or valid
            elif typ == RST:
                if len(d) != HDR + 1:
                    stats.dropped_bad += 1
                    continue
                self.remote_closed = True
                code = d[HDR]
                self._close(code, f"peer sent RST ({rst_name(code)})")
                return
            else:
                stats.dropped_bad += 1
        if valid:
            self._last_recv = now
        if self._ack_pending >= ACK_EVERY:
            self._ack_now = True
        elif self._ack_pending and self._ack_at is None:
            self._ack_at = now + ACK_DELAY

    def _on_data_slow(self, seq: int, payload: bytes, fin: bool = False) -> None:
        """Out of order, duplicate, a hole filled, or a FIN: the general case."""
        nxt = self.rcv_next
        self._ack_now = True  # anything unusual is acknowledged at once (fast retransmit needs it)
        if seq < nxt or seq in self._ooo:
            self.stats.duplicates += 1
            return
        if seq >= nxt + RCV_WINDOW or (self._peer_fin is not None and seq > self._peer_fin):
            self.stats.dropped_window += 1
            return
        if fin:
            if self._peer_fin is not None or (self._ooo and seq < max(self._ooo)):
                self.stats.dropped_bad += 1  # a second FIN, or one before data already received
                return
            self._peer_fin = seq
        self._ooo[seq] = payload
        ooo = self._ooo
        while nxt in ooo:
            p = ooo.pop(nxt)
            if nxt == self._peer_fin:
                self.eof_received = True
                nxt += 1
                ooo.clear()
                break
            self._ready.append(p)
            nxt += 1
        self.rcv_next = nxt

    def _on_ack(self, ack: int, wnd: int, sacks: tuple[int, ...], now: float) -> bool:
        """Cumulative ack, window and SACK ranges from the peer; False (dropped) if it
        acknowledges data never sent."""
        una, nxt = self.snd_una, self.snd_nxt
        if ack > nxt:
            self.stats.dropped_window += 1  # acknowledges data never sent
            return False
        if ack < una:
            return True  # an old ack overtaken by newer ones: nothing in it is news
        self.peer_edge = ack + min(wnd, RCV_WINDOW * 4)
        inflight = self.inflight
        lost = self._lost
        newly = 0
        if ack > una:
            timed = self._timed
            if timed is not None and ack > timed[0]:
                self._rtt_sample(now - timed[1])
                self._timed = None
            pop = inflight.pop
            for s in range(una, ack):
                if pop(s, None) is not None:
                    newly += 1
            if lost:
                for s in range(una, ack):
                    lost.pop(s, None)
            if self._rtx_at:
                for s in range(una, ack):
                    self._rtx_at.pop(s, None)
            self.snd_una = ack
            self._progress_at = now
            self._rto_backoff_reset()
        if sacks:
            high = self._high_sacked
            for i in range(0, len(sacks), 2):
                a, b = sacks[i], sacks[i + 1]
                if not ack < a < b <= nxt:
                    continue  # ignore a malformed range, keep the rest
                for s in range(a, b):
                    if s in inflight:
                        del inflight[s]
                        newly += 1
                        lost.pop(s, None)
                if b - 1 > high:
                    high = b - 1
            if high > self._high_sacked:
                self._high_sacked = high
                self._progress_at = now
            self._detect_loss(now)
        if newly:
            self._grow(newly, ack)
        if inflight:
            if self._rto_at is None or ack > una:
                self._rto_at = now + self.rto
        else:
            self._progress_at = now  # nothing outstanding: the peer is alive, maybe with a shut window
            if not self._needs_probe():
                self._rto_at = None
        return True

    def _detect_loss(self, now: float) -> None:
        limit = self._high_sacked - DUPTHRESH + 1
        if limit <= self.snd_una:
            return
        lost, rtx_at = self._lost, self._rtx_at
        wait = (self.srtt or self.rto) * 1.5
        fresh = False
        for s in self.inflight:
            if s >= limit:
                break
            if s in lost:
                continue
            t = rtx_at.get(s)
            if t is not None and now - t < wait:
                continue  # retransmitted less than an RTT ago: give it time
            lost[s] = None
            if s >= self._recovery or t is not None:
                fresh = True
        if fresh:
            self._on_loss_episode()

    def _on_loss_episode(self) -> None:
        self.stats.loss_episodes += 1
        self.ssthresh = max(float(MIN_CWND), self.cwnd * BETA)
        self.cwnd = self.ssthresh
        self._recovery = self.snd_nxt

    def _grow(self, newly: int, ack: int) -> None:
        if ack < self._recovery:
            return  # still recovering from a loss episode
        if self.cwnd < self.ssthresh:
            self.cwnd = min(float(MAX_CWND), self.cwnd + newly)
        else:
            self.cwnd = min(float(MAX_CWND), self.cwnd + newly / self.cwnd)

    def _rtt_sample(self, rtt: float) -> None:
        if rtt <= 0:
            rtt = 1e-6
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self._rto_backoff_reset()

    def _rto_backoff_reset(self) -> None:
        base = (self.srtt or INITIAL_RTO / 2) + max(0.001, 4 * self.rttvar)
        self.rto = min(MAX_RTO, max(MIN_RTO, base))

    def _on_syn(self, d: bytes, now: float) -> bool:
        if self.initiator or len(d) != SYN_LEN or bytes(d[HDR : HDR + TOKEN_LEN]) != self.token:
            self.stats.dropped_bad += 1
            return False
        peer_id = int.from_bytes(d[HDR + TOKEN_LEN : SYN_LEN], "big")
        if not peer_id or (self.peer_id and peer_id != self.peer_id):
            self.stats.dropped_bad += 1  # a second SYN naming another connection
            return False
        if not self.peer_id:
            self.peer_id = peer_id
            self.state = OPEN
            self._progress_at = now
        self._synack_pending = True  # first SYN, or a retransmission (our SYNACK was lost)
        return True

    def _on_synack(self, d: bytes, now: float) -> bool:
        if not self.initiator or len(d) != SYN_LEN or bytes(d[HDR : HDR + TOKEN_LEN]) != self.token:
            self.stats.dropped_bad += 1
            return False
        peer_id = int.from_bytes(d[HDR + TOKEN_LEN : SYN_LEN], "big")
        if not peer_id or (self.peer_id and peer_id != self.peer_id):
            self.stats.dropped_bad += 1
            return False
        if self.state == CONNECTING:
            self.peer_id = peer_id
            self.state = OPEN
            self._syn_at = None
            self._progress_at = now
            if self._syn_rto == SYN_RTO:  # no SYN was retransmitted: the sample is clean (Karn)
                self._rtt_sample(now - self._syn_sent)
        return True

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `on_timer` has something to do (None: never, until more input)."""
        if self.state == CLOSED:
            return None
        ds = [self._last_recv + IDLE_TIMEOUT]
        if self._syn_at is not None:
            ds.append(self._syn_at)
        if self._rto_at is not None:
            ds.append(self._rto_at)
        if self._ack_at is not None:
            ds.append(self._ack_at)
        if self.state == OPEN:
            ds.append(self._last_send + KEEPALIVE)
        return min(ds)

    def on_timer(self, now: float) -> None:
        if self.state == CLOSED:
            return
        if now >= self._last_recv + IDLE_TIMEOUT:
            self._close(Rst.TIMEOUT, f"nothing heard from the peer for {IDLE_TIMEOUT:g}s")
            return
        if self._syn_at is not None and now >= self._syn_at:
            self._syn_rto = min(MAX_RTO, self._syn_rto * 2)
            self._syn_at = now + self._syn_rto
            self._out.append(self._syn(SYN, 0))
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_now = True
        if self._rto_at is not None and now >= self._rto_at:
            self._on_rto(now)
        if self.state == OPEN and now >= self._last_send + KEEPALIVE:
            self._ping_pending = True

    def _on_rto(self, now: float) -> None:
        if not self.inflight and not self._needs_probe():
            self._rto_at = None
            return
        if now - self._progress_at >= DEAD_AFTER:
            self.abort(Rst.TIMEOUT, f"no acknowledgement from the peer for {DEAD_AFTER:g}s")
            return
        self.stats.rto += 1
        if self.inflight:
            # everything in flight is presumed lost: resend from the oldest, slow start again
            self.ssthresh = max(float(MIN_CWND), self.cwnd * BETA)
            self.cwnd = float(MIN_CWND)
            self._recovery = self.snd_nxt
            self._rtx_at.clear()
            for s in self.inflight:
                self._lost[s] = None
        else:
            self._ping_pending = True  # the peer's window is shut: ask it for a fresh one
        self._timed = None
        self.rto = min(MAX_RTO, self.rto * 2)
        self._rto_at = now + self.rto

    def _needs_probe(self) -> bool:
        return bool(self.unsent or (self._eof_queued and self._fin_seq is None)) and self.snd_nxt >= self.peer_edge

    # -- sending -------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything due now: control packets, retransmissions, then new data as far as
        the congestion and the peer's windows allow (DATA packets full-size but the last)."""
        out, self._out = self._out, []
        if self.state == CLOSED:
            if self._rst is not None and self.peer_id:
                out.append(HEADER.pack(MAGIC, RST, 0, self.peer_id, 0, self.rcv_next, 0) + bytes([self._rst]))
                self._rst = None
            return out
        if self._synack_pending:
            self._synack_pending = False
            out.append(self._syn(SYNACK, self.peer_id))
        if self.state != OPEN:
            self._count(out, now)
            return out
        pack = HEADER.pack
        peer = self.peer_id
        rcv = self.rcv_next
        wnd = self.window()
        inflight = self.inflight
        sent_data = False
        # retransmissions first (not counted in the pipe: they replace what was lost)
        if self._lost:
            lost = self._lost
            rtx_at = self._rtx_at
            budget = max(MIN_CWND, int(self.cwnd))  # after a timeout: a window's worth per flush
            done = []
            for s in lost:
                if budget <= 0:
                    break
                done.append(s)
                p = inflight.get(s)
                if p is None:
                    continue
                typ = FIN if s == self._fin_seq else DATA
                out.append(pack(MAGIC, typ, 0, peer, s, rcv, wnd) + p)
                rtx_at[s] = now
                self.stats.retransmits += 1
                sent_data = True
                budget -= 1
            for s in done:
                del lost[s]
        # new data
        cwnd = int(self.cwnd)
        nxt = self.snd_nxt
        edge = self.peer_edge
        room = min(cwnd - len(inflight), edge - nxt, SEQ_LIMIT - nxt)
        if room > 0 and (self.unsent or (self._eof_queued and self._fin_seq is None)):
            first = nxt
            q = self._sndq
            head, off = self._sndq_head, self._snd_off
            while room > 0 and self.unsent:
                chunk = q[head]
                if len(chunk) - off >= MSS:
                    p = chunk[off : off + MSS]
                    off += MSS
                    if off == len(chunk):
                        head, off = head + 1, 0
                else:  # the tail of this chunk plus the start of the next ones
                    parts = []
                    need = MSS
                    while need and head < len(q):
                        chunk = q[head]
                        piece = chunk[off : off + need]
                        parts.append(piece)
                        need -= len(piece)
                        off += len(piece)
                        if off == len(chunk):
                            head, off = head + 1, 0
                    p = b"".join(parts)
                self.unsent -= len(p)
                inflight[nxt] = p
                out.append(pack(MAGIC, DATA, 0, peer, nxt, rcv, wnd) + p)
                nxt += 1
                room -= 1
            if head:  # drop consumed chunks (amortised: only when the prefix is large)
                if head == len(q):
                    q.clear()
                    head = 0
                elif head > 64:
                    del q[:head]
                    head = 0
            self._sndq_head, self._snd_off = head, off
            if room > 0 and not self.unsent and self._eof_queued and self._fin_seq is None:
                self._fin_seq = nxt
                inflight[nxt] = b""
                out.append(pack(MAGIC, FIN, 0, peer, nxt, rcv, wnd))
                nxt += 1
            if nxt > first:
                sent_data = True
                if self._timed is None:
                    self._timed = (nxt - 1, now)
                self.snd_nxt = nxt
                if nxt >= SEQ_LIMIT:
                    self.abort(Rst.PROTOCOL, "sequence space used up")
        if sent_data:
            self._ack_now = False
            self._ack_pending = 0
            self._ack_at = None
            if self._rto_at is None:
                self._rto_at = now + self.rto
        elif self._needs_probe() and self._rto_at is None:
            self._rto_at = now + self.rto  # zero window: probe it on the timer
        if self._ack_now or self._ping_pending:
            out.append(self._ack_packet(PING if self._ping_pending else ACK, wnd))
            self._ack_now = self._ping_pending = False
            self._ack_pending = 0
            self._ack_at = None
        self._count(out, now)
        return out

    def _count(self, out: list[bytes], now: float) -> None:
        if out:
            self.stats.sent += len(out)
            self._last_send = now

    def _ack_packet(self, typ: int, wnd: int) -> bytes:
        sacks: list[int] = []
        if self._ooo and typ == ACK:
            prev_end = -1
            for s in sorted(self._ooo):
                if s == prev_end:
                    sacks[-1] = s + 1
                else:
                    if len(sacks) >= 2 * MAX_SACK:
                        break
                    sacks += (s, s + 1)
                prev_end = sacks[-1]
        head = HEADER.pack(MAGIC, typ, len(sacks) // 2, self.peer_id, self.snd_nxt, self.rcv_next, wnd)
        return head + struct.pack(f"!{len(sacks)}I", *sacks) if sacks else head

    def _syn(self, typ: int, cid: int) -> bytes:
        return HEADER.pack(MAGIC, typ, 0, cid, 0, 0, RCV_WINDOW) + self.token + self.local_id.to_bytes(8, "big")

    def close_rst(self) -> None:
        """Close after the caller saw everything acknowledged: tell the peer (RST CLOSE)."""
        self.abort(Rst.CLOSE, "closed")

    def _close(self, code: int, reason: str) -> None:
        self.state = CLOSED
        self.close_code = code
        self.close_reason = reason
        self._rto_at = self._ack_at = self._syn_at = None


def rst_name(code: int | None) -> str:
    """An RST code's name for logs (an unknown code from a peer is shown as a number)."""
    if code is None:
        return "none"
    try:
        return Rst(code).name.lower()
    except ValueError:
        return f"code {code}"
