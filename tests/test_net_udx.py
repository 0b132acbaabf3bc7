"""The UDX core (swarmd/net/udx.py) without sockets: two cores joined by a simulated
network (seeded: loss, reordering, duplication, no real time), and hostile input fed to
an open connection. The asyncio glue runs on loopback in tests/test_net_punch.py and
in the NAT lab."""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.net import udx
from swarmd.net.udx import ACK, CLOSED, DATA, HEADER, MAGIC, MSS, OPEN, RCV_WINDOW, RST, Rst, UdxCore

TOKEN = bytes(range(16))


class Net:
    """Two cores and the datagrams between them, on a simulated clock: each datagram is
    lost, duplicated or delayed (which reorders) as the seeded generator says."""

    def __init__(self, seed: int, loss: float = 0.0, dup: float = 0.0, jitter: float = 0.0, delay: float = 0.005) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.jitter, self.delay = loss, dup, jitter, delay
        self.now = 100.0
        self.a = UdxCore(TOKEN, initiator=True, now=self.now)
        self.b = UdxCore(TOKEN, initiator=False, now=self.now)
        self.wire: list[tuple[float, int, int, bytes]] = []  # (arrival, order, to, datagram)
        self.n = 0
        self.got = {0: bytearray(), 1: bytearray()}
        self.a.connect(self.now)

    def core(self, i: int) -> UdxCore:
        return self.a if i == 0 else self.b

    def _emit(self, i: int) -> None:
        for d in self.core(i).datagrams_to_send(self.now):
            if self.rng.random() < self.loss:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                self.n += 1
                at = self.now + self.delay + self.rng.random() * self.jitter
                heapq.heappush(self.wire, (at, self.n, 1 - i, d))

    def step(self) -> bool:
        """Send what is due, then advance to the next arrival or deadline; False when idle."""
        for i in (0, 1):
            self._emit(i)
        times = [t for t in (self.a.next_deadline(), self.b.next_deadline()) if t is not None]
        if self.wire:
            times.append(self.wire[0][0])
        if not times:
            return False
        self.now = max(self.now, min(times))
        batches: dict[int, list[bytes]] = {0: [], 1: []}
        while self.wire and self.wire[0][0] <= self.now:
            _at, _n, to, d = heapq.heappop(self.wire)
            batches[to].append(d)
        for i in (0, 1):
            c = self.core(i)
            if batches[i]:
                c.receive(batches[i], self.now)
            c.on_timer(self.now)
            for chunk in c.take_data():
                self.got[i] += chunk
        return True

    def run(self, until, limit: int = 200_000) -> None:
        for _ in range(limit):
            if until():
                return
            if not self.step():
                break
        assert until(), "the simulated transfer did not finish"


def _transfer(net: Net, size_ab: int, size_ba: int) -> tuple[bytes, bytes]:
    ab = hashlib.shake_256(b"a->b").digest(size_ab)
    ba = hashlib.shake_256(b"b->a").digest(size_ba)
    net.run(lambda: net.a.state == OPEN)
    # written in uneven pieces, some straddling packets, then end of stream both ways
    for data, core in ((ab, net.a), (ba, net.b)):
        at = 0
        while at < len(data):
            n = net.rng.randint(1, 3 * MSS)
            core.write(data[at : at + n])
            at += n
        core.write_eof()
    net.run(lambda: net.a.eof_received and net.b.eof_received and net.a.drained and net.b.drained)
    return ab, ba


@pytest.mark.parametrize(
    "seed,loss,dup,jitter",
    [(1, 0.0, 0.0, 0.0), (2, 0.05, 0.0, 0.0), (3, 0.0, 0.0, 0.02), (4, 0.03, 0.03, 0.02), (5, 0.2, 0.1, 0.05)],
)
def test_the_stream_arrives_intact_through_loss_reordering_and_duplicates(seed, loss, dup, jitter) -> None:
    net = Net(seed, loss=loss, dup=dup, jitter=jitter)
    ab, ba = _transfer(net, 600_000, 90_000)
    assert bytes(net.got[1]) == ab and bytes(net.got[0]) == ba
    if loss:
        assert net.a.stats.retransmits > 0
    if dup:
        assert net.b.stats.duplicates > 0
    assert net.a.state == OPEN and net.b.state == OPEN
    net.a.close_rst()
    net.step()  # the RST leaves
    net.run(lambda: net.b.state == CLOSED or not net.wire)
    if not loss:
        assert net.b.state == CLOSED and net.b.remote_closed and net.b.close_code == Rst.CLOSE


def test_a_loss_shrinks_the_window_and_fast_retransmit_repairs_it_without_a_timeout() -> None:
    net = Net(7)
    net.run(lambda: net.a.state == OPEN)
    net.a.write(os.urandom(200 * MSS))
    dropped = []
    for d in net.a.datagrams_to_send(net.now):  # lose the fifth data packet of the first flight
        if d[1] == DATA and HEADER.unpack_from(d)[4] == 4 and not dropped:
            dropped.append(d)
            continue
        net.n += 1
        heapq.heappush(net.wire, (net.now + net.delay, net.n, 1, d))
    cwnd = net.a.cwnd
    net.run(lambda: net.a.drained)
    assert dropped and len(net.got[1]) == 200 * MSS
    assert net.a.stats.retransmits == 1 and net.a.stats.rto == 0 and net.a.stats.loss_episodes == 1
    assert net.a.ssthresh < cwnd


def test_nothing_acknowledged_for_long_ends_the_connection_with_a_timeout() -> None:
    net = Net(8)
    net.run(lambda: net.a.state == OPEN)
    net.a.write(b"x" * 10_000)
    net.loss = 1.0  # the path dies
    net.run(lambda: net.a.state == CLOSED, limit=10_000)
    assert net.a.close_code == Rst.TIMEOUT and net.a.stats.rto >= 3
    assert net.now - 100.0 >= udx.DEAD_AFTER


def test_a_paused_reader_shuts_the_window_and_the_sender_waits() -> None:
    net = Net(9)
    net.run(lambda: net.a.state == OPEN)
    net.a.write(os.urandom((RCV_WINDOW + 500) * MSS))
    taken = net.b.take_data
    net.b.take_data = lambda: []  # type: ignore[method-assign]  # the reader stops reading
    for _ in range(2000):
        net.step()
    assert net.b.window() == 0 and net.a.snd_nxt <= RCV_WINDOW + 1
    assert len(net.b._ready) <= RCV_WINDOW  # bounded, whatever the sender does
    net.b.take_data = taken  # type: ignore[method-assign]
    net.run(lambda: net.a.drained)
    assert len(net.got[1]) == (RCV_WINDOW + 500) * MSS


def _open_pair() -> tuple[UdxCore, UdxCore, float]:
    now = 1.0
    a, b = UdxCore(TOKEN, initiator=True, now=now), UdxCore(TOKEN, initiator=False, now=now)
    a.connect(now)
    b.receive(a.datagrams_to_send(now), now)
    a.receive(b.datagrams_to_send(now), now)
    assert a.state == b.state == OPEN
    return a, b, now


def test_a_syn_with_another_token_opens_nothing() -> None:
    a = UdxCore(os.urandom(16), initiator=True, now=0.0)
    b = UdxCore(TOKEN, initiator=False, now=0.0)
    a.connect(0.0)
    b.receive(a.datagrams_to_send(0.0), 0.0)
    assert b.state != OPEN and b.stats.dropped_bad == 1 and b.datagrams_to_send(0.0) == []


def test_packets_naming_another_connection_or_outside_the_window_are_dropped_and_counted() -> None:
    a, b, now = _open_pair()
    wrong = HEADER.pack(MAGIC, RST, 0, b.local_id ^ 1, 0, 0, 0) + b"\x01"  # an off-path RST guess
    far = HEADER.pack(MAGIC, DATA, 0, b.local_id, RCV_WINDOW + 5, 0, RCV_WINDOW) + b"x"
    future_ack = HEADER.pack(MAGIC, ACK, 0, b.local_id, 0, 10, RCV_WINDOW)  # acks what b never sent
    b.receive([wrong, far, future_ack, b"", b"\x55", b"\x00" * 40], now)
    assert b.state == OPEN
    assert b.stats.dropped_bad == 4 and b.stats.dropped_window == 2
    assert not b._ooo and not b.take_data()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80) | st.builds(
    lambda typ, count, seq, ack, wnd, tail, same: HEADER.pack(MAGIC, typ, count, 0, seq, ack, wnd)[:4]
    + (b"\x00" * 8 if not same else b"ID______") + struct.pack("!III", seq, ack, wnd) + tail,
    st.integers(0, 9), st.integers(0, 40), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.binary(max_size=300), st.booleans()), max_size=30))
def test_hostile_datagrams_never_raise_and_never_break_an_open_stream(garbage: list[bytes]) -> None:
    a, b, now = _open_pair()
    ident = b.local_id.to_bytes(8, "big")
    garbage = [g.replace(b"ID______", ident) for g in garbage]  # some carry the right connection id
    b.receive(garbage, now)
    for g in garbage:  # one at a time too, and truncated
        b.receive([g, g[: len(g) // 2]], now)
    b.on_timer(now)
    b.datagrams_to_send(now)
    if b.state == CLOSED:  # only an RST with the right id (and one byte of code) may close it
        assert b.remote_closed
        return
    assert len(b._ooo) <= RCV_WINDOW and len(b._ready) <= 2 * RCV_WINDOW
    # DATA carrying the right connection id takes the sequence numbers it claims (UDX does not
    # authenticate; Noise above rejects such bytes and closes): only then may the real data
    # be taken for a duplicate
    injected, held = b.rcv_next, bool(b._ooo)  # taken in order / held out of order
    b.take_data()
    a.write(b"after the storm")
    b.receive(a.datagrams_to_send(now), now)
    got = b"".join(bytes(c) for c in b.take_data())
    if injected == 0:  # the real stream still goes through, followed only by what was held
        assert got.startswith(b"after the storm") and (held or got == b"after the storm")
    else:
        assert b.rcv_next >= injected and b.state == OPEN


def test_an_idle_connection_stays_open_on_keepalives_and_a_silent_one_closes() -> None:
    net = Net(10)
    net.run(lambda: net.a.state == OPEN and net.b.state == OPEN)
    start = net.now
    net.run(lambda: net.now - start > 3 * udx.IDLE_TIMEOUT, limit=10_000)
    assert net.a.state == OPEN and net.b.state == OPEN  # PINGs and their ACKs kept both alive
    net.loss = 1.0
    net.run(lambda: net.a.state == CLOSED and net.b.state == CLOSED, limit=10_000)
    assert net.a.close_code == net.b.close_code == Rst.TIMEOUT and not net.a.remote_closed
