"""When a connection writes: early flushes with many calls in flight, and busy-polling after a write.

With more than `NetConfig.flush_frames` calls or answers queued in one loop iteration, the
first ones are written at once (the peer starts on them while the rest are prepared);
`NetConfig.busy_poll_us` keeps the loop polling for the answer after a write. Neither may
change what arrives: every call answered whole, in order of its own caller, errors reported,
streams intact, and nothing left spinning or hanging afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from typing import Any

import pytest

from swarmd.errors import ERR_BAD_REQUEST, SwarmdError
from swarmd.net import busypoll
from swarmd.net.config import NetConfig
from swarmd.node.eventloop import run, uvloop_available
from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, Methods, RpcServer, Stream, connect
from swarmd.rpc.config import RpcConfig

T = 30.0
LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not uvloop_available(), reason="no uvloop"))]


def _methods() -> Methods:
    methods = Methods()

    def echo(ctx: CallContext, params: Any) -> Any:  # plain: answered inside the read
        return params

    async def slow_echo(ctx: CallContext, params: Any) -> Any:  # in a Task: answered later
        await asyncio.sleep(0)
        return params

    def fail(ctx: CallContext, params: Any) -> Any:
        raise SwarmdError(ERR_BAD_REQUEST, f"refused {params}")

    async def digest(ctx: CallContext, params: Any, stream: Stream) -> str:
        h = hashlib.sha256()
        while (chunk := await stream.recv()) is not None:
            h.update(chunk)
        return h.hexdigest()

    methods.register("echo", echo)
    methods.register("slow_echo", slow_echo)
    methods.register("fail", fail)
    methods.register_stream("digest", digest)
    return methods


async def _traffic(net: NetConfig) -> None:
    cfg = RpcConfig(net=net)
    ident = Identity.generate()
    srv = RpcServer(ident, _methods(), config=cfg)
    await srv.start()
    try:
        peer = await connect(None, "127.0.0.1", srv.port, remote_public_key=ident.public_key, timeout=T, config=cfg)
        try:
            async with asyncio.timeout(T):
                # 300 calls at once, plain and Task handlers and errors interleaved: each caller
                # gets its own answer, whole
                async def one(i: int) -> Any:
                    kind = ("echo", "slow_echo", "fail")[i % 3]
                    try:
                        return await peer.call(kind, [i, b"p" * (i % 97)], timeout=T)
                    except SwarmdError as e:
                        return (e.code, e.message)

                got = await asyncio.gather(*(one(i) for i in range(300)))
                for i, g in enumerate(got):
                    if i % 3 == 2:
                        assert g == ("ERR_BAD_REQUEST", f"refused {[i, b'p' * (i % 97)]}")
                    else:
                        assert g == [i, b"p" * (i % 97)]

                # one caller asking in turn among 100 concurrent calls: its answers come in its order
                order: list[int] = []

                async def caller() -> None:
                    for i in range(200):
                        order.append(await peer.call("echo", i, timeout=T))

                await asyncio.gather(caller(), *(peer.call("echo", b"x" * 64, timeout=T) for _ in range(100)))
                assert order == list(range(200))

                # a stream beside a burst of calls
                data = bytes(range(256)) * 4099
                s = await peer.open_stream("digest", timeout=T)
                burst = asyncio.gather(*(peer.call("echo", i, timeout=T) for i in range(100)))
                for off in range(0, len(data), 50_001):
                    await s.send(data[off : off + 50_001])
                await s.close()
                assert await s.result() == hashlib.sha256(data).hexdigest()
                assert await burst == list(range(100))

                # sequential calls (the lone-call write path)
                for i in range(50):
                    assert await peer.call("echo", i, timeout=T) == i
        finally:
            await peer.close()
    finally:
        await srv.stop()
    spin = getattr(busypoll._spinners, "spin", None)
    if net.busy_poll_us and spin is not None:
        # nothing keeps polling once the traffic stopped: the spinner runs out its budget
        async with asyncio.timeout(T):
            while spin.handle is not None:
                await asyncio.sleep(0.001)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "net",
    [
        NetConfig(),  # the defaults: early flush, busy-poll after a write
        NetConfig(flush_frames=1),  # every call and answer written at once
        NetConfig(flush_frames=0),  # one write per loop iteration
        NetConfig(busy_poll_us=0),  # never polls: sleeps until the answer wakes the loop
        NetConfig(busy_poll_us=1, flush_frames=3),
    ],
    ids=["default", "flush1", "flush-off", "poll-off", "busy-poll-tiny"],
)
def test_calls_arrive_whole_and_in_order(loop: str, net: NetConfig) -> None:
    run(_traffic(net), loop)


def test_busy_poll_policy_stops_for_a_slow_peer_and_probes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bp = busypoll.BusyPoll(loop, 1_000_000)  # a 1 s budget: "quick" below cannot depend on timing
        spin = busypoll._spinner(loop)
        spin._checked_at = math.inf  # no CPU-contention check in this test: it depends on the machine
        assert bp.polling  # the first write polls, to learn the peer's pace
        bp.wrote()
        assert spin.handle is not None
        # a peer that answers long after the budget: after a few misses no more polling
        for _ in range(busypoll._CREDIT_MAX + 1):
            bp.wrote()
            bp._wrote_at = time.perf_counter() - 10.0  # as if the answer came 10 s later
            bp.received()
        assert not bp.polling
        spin.until = 0.0  # end the polling those writes started
        async with asyncio.timeout(T):
            while spin.handle is not None:
                await asyncio.sleep(0.001)
        # while stopped, writes do not poll, except one probe every _PROBE_EVERY writes
        probes = 0
        for _ in range(busypoll._PROBE_EVERY * 3):
            bp.wrote()
            if spin.handle is not None:
                probes += 1
                spin.handle.cancel()
                spin.handle = None
                spin.until = 0.0
        assert probes == 3
        # a quick answer again: polling resumes
        bp.wrote()
        bp.received()
        assert bp.polling

    run(main(), "asyncio")


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="no per-thread schedstat")
def test_busy_poll_does_not_poll_while_the_thread_waits_for_a_cpu() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        spin = busypoll._Spinner(loop)
        now = time.perf_counter()
        spin._checked_at = now - 1.0
        spin._waited = spin._run_delay() - 10**9  # as if it waited for a CPU all of the last second
        spin.extend(now, now + 1.0)
        assert spin.contended and spin.handle is None
        cpus = spin._cpus
        spin._cpus = 1 << 30  # whatever else runs on this machine now: never more runnable tasks than CPUs
        spin._checked_at = now - 1.0
        spin._waited = spin._run_delay() + 10**9  # (counter moved back: not contended) -> polls
        spin.extend(now, now + 0.001)
        assert not spin.contended and spin.handle is not None
        spin.handle.cancel()
        spin.handle = None
        # a polling loop gives its core away to every task that wakes: waiting 15% of the time is
        # those turns (a load client's, at one connection), not cores too busy to poll on
        spin._checked_at = now - 1.0
        spin._waited = spin._run_delay() - 150_000_000
        spin.extend(now, now + 0.001)
        assert not spin.contended and spin.handle is not None
        spin.handle.cancel()
        spin.handle = None
        spin._cpus = 0  # more runnable tasks than CPUs (this one at least): no polling, however short the wait
        spin._checked_at = now - 1.0
        spin._waited = spin._run_delay() + 10**9
        spin.extend(now, now + 0.001)
        assert spin.contended and spin.handle is None
        spin._cpus = cpus

    run(main(), "asyncio")


def test_busy_poll_waits_longer_while_calls_of_ours_await_answers() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bp = busypoll.BusyPoll(loop, 100, 2000)  # 100 us after any write, 2 ms while answers are due
        spin = busypoll._spinner(loop)
        spin._checked_at = math.inf  # no CPU-contention check in this test: it depends on the machine
        pending: dict[int, object] = {}
        bp.awaiting = pending
        spin.until = 0.0
        t0 = time.perf_counter()
        bp.wrote()  # an answer we sent, no call of ours out: the short budget
        assert t0 < spin.until <= time.perf_counter() + 100e-6
        # the peer's answer 1 ms later: late for the short budget, so it counts as a miss
        bp._wrote_at = time.perf_counter() - 0.001
        bp.received()
        assert not bp.polling
        bp._credit = 2  # as if the last answers had come quickly
        pending[1] = object()  # a call of ours goes out and awaits its answer: the long budget
        spin.until = 0.0
        t0 = time.perf_counter()
        bp.wrote()
        assert t0 + 2000e-6 <= spin.until <= time.perf_counter() + 2000e-6
        credit = bp._credit
        bp._wrote_at = time.perf_counter() - 0.001  # its answer 1 ms later: within 2 ms, a hit
        bp.received()
        assert bp._credit == min(credit + 1, busypoll._CREDIT_MAX)
        spin.until = 0.0
        # the answer budget is never shorter than the plain one
        assert busypoll.BusyPoll(loop, 500, 100).answer_budget == 500e-6

    run(main(), "asyncio")


def test_an_rpc_peer_tells_its_connection_which_calls_await_answers() -> None:
    async def main() -> None:
        srv = RpcServer(Identity.generate(), _methods(), "127.0.0.1", 0)
        await srv.start()
        try:
            peer = await connect(Identity.generate(), "127.0.0.1", srv.port, remote_public_key=srv.identity.public_key)
            try:
                assert peer.conn._busy.awaiting is peer._pending  # NetConfig() polls: the defaults
                assert await peer.call("echo", 1, timeout=T) == 1
            finally:
                await peer.close()
            assert peer.conn._busy.awaiting is peer._pending  # re-pointed when the peer closed
        finally:
            await srv.stop()

    run(main(), "asyncio")


def test_busy_poll_budget_must_be_positive() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="positive microseconds"):
            busypoll.BusyPoll(asyncio.get_running_loop(), 0)

    run(main(), "asyncio")
