"""Busy-polling before the event loop sleeps, when a connection's peer usually answers at once.

On a virtual machine whose idle vCPU halts (no guest halt-polling), every sleep of the
event loop is a halt and every wake-up costs tens of microseconds of latency and CPU and
comes back with cold caches: a sequential 64-byte echo between two processes spends
~100 us of its ~150 us in these wake-ups, for swarmd and for plain TCP alike. An "idle
strategy" (as in Aeron or DPDK) keeps the loop polling its sockets for a bounded time after
a write instead: the loop runs a no-op step through `call_soon`, so each iteration polls
with a zero timeout and the answer is read as soon as it lands. Each step yields the CPU
(`sched_yield`), so another runnable process on this CPU (the peer, a model run, a load
generator) is never held back by the polling.

It costs CPU while it waits and gains nothing on a machine whose cores are busy anyway, so
it is adaptive (`NetConfig.busy_poll_us`, 1 ms by default, 0 turns it off; figures in
docs/benchmarks.md, issue 19): a connection polls after a write only while its recent write-to-read
gaps fit in the budget, so a peer that takes longer (a WAN path, a slow model, a client that
calls now and then) is not waited for by spinning; while off it probes with one poll every
`_PROBE_EVERY` writes. A write that leaves our own calls awaiting answers gets the longer
`NetConfig.busy_poll_answer_us` (2 ms): a gateway waiting for a worker's model run polls through
it, and the worker, whose gateway's next request at one connection comes ~0.5 ms after its answer
(the client's and the gateway's turn), polls for that one after answering.
No polling either while the cores are busy with other work (`_Spinner`): a polling task
loses the scheduler's preference for tasks waking from sleep, and takes a core others need.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sized

_perf = time.perf_counter
_yield = getattr(os, "sched_yield", lambda: None)
_CREDIT_MAX = 4  # gaps within the budget remembered; this many misses in a row stop the polling
_PROBE_EVERY = 16  # while stopped, every this many writes poll once to see whether gaps shrank
_CHECK_EVERY = 0.02  # seconds between checks of how long this thread waited for a CPU
# waiting for a CPU this share of the time means the cores are busy: no polling then. A polling
# loop yields its core to any task that wakes, so its wait counts the turns it gave away: at one
# connection gateway -> worker, the load client's turns alone put the gateway above 5% in about
# half of the 20 ms checks (the worker in a quarter), never above 25% (docs/benchmarks.md, issue 19)
_CONTENDED = 0.25
_spinners = threading.local()


class _Spinner:
    """Keeps one event loop polling without sleeping until a deadline (shared by its connections).

    It does not poll while the cores are busy with other work, where polling only takes a
    core someone else needs and sleeping is the better wait: checked every _CHECK_EVERY
    seconds, more tasks runnable machine-wide than this process may use CPUs (/proc/loadavg),
    or this thread waited for a CPU more than _CONTENDED of the time since the last check
    (its run delay, /proc/thread-self/schedstat).
    """

    __slots__ = ("loop", "until", "handle", "_fd", "_load_fd", "_cpus", "_checked_at", "_waited", "contended")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.until = 0.0
        self.handle: asyncio.Handle | None = None
        try:
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:  # not Linux, or no schedstats: no contention check
            self._fd = -1
        try:
            self._load_fd = os.open("/proc/loadavg", os.O_RDONLY)
        except OSError:
            self._load_fd = -1
        self._cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._checked_at = _perf()
        self._waited = self._run_delay()
        self.contended = False

    def __del__(self) -> None:
        for fd in (self._fd, self._load_fd):
            if fd >= 0:
                os.close(fd)

    def _runnable(self) -> int:
        """Tasks runnable machine-wide now, this one included (0 when unknown)."""
        if self._load_fd < 0:
            return 0
        try:
            return int(os.pread(self._load_fd, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return 0

    def _run_delay(self) -> int:
        """Nanoseconds this thread has spent runnable, waiting for a CPU."""
        if self._fd < 0:
            return 0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    def extend(self, now: float, until: float) -> None:
        if now - self._checked_at >= _CHECK_EVERY and self._fd >= 0:
            waited = self._run_delay()
            self.contended = (
                (waited - self._waited) / 1e9 > _CONTENDED * (now - self._checked_at)
                or self._runnable() > self._cpus
            )
            self._waited = waited
            self._checked_at = now
        if self.contended:
            return
        if until > self.until:
            self.until = until
        if self.handle is None:
            self.handle = self.loop.call_soon(self._step)

    def _step(self) -> None:
        # a ready callback makes the loop poll with a zero timeout instead of sleeping
        if _perf() < self.until and not self.loop.is_closed():
            _yield()  # a process waiting for this CPU runs first
            self.handle = self.loop.call_soon(self._step)
        else:
            self.handle = None


def _spinner(loop: asyncio.AbstractEventLoop) -> _Spinner:
    spin: _Spinner | None = getattr(_spinners, "spin", None)
    if spin is None or spin.loop is not loop:
        spin = _spinners.spin = _Spinner(loop)
    return spin


class BusyPoll:
    """One connection's policy: poll after a write while the peer's answers come within budget.

    Two budgets: `budget` after any write (an answer we sent: the peer's next request may come
    at once, as in a sequential echo), `answer_budget` (at least `budget`) after a write that
    leaves calls of ours awaiting their answers on this connection, which will come: the
    caller's loop keeps polling through the peer's work (a model run of a few hundred
    microseconds) instead of halting and waking with cold caches. `awaiting` is the RPC
    layer's calls in flight on this connection (`SecureConnection.awaits_answers`).
    """

    __slots__ = ("_spin", "budget", "answer_budget", "awaiting", "_wrote_at", "_used", "_credit", "_skipped")

    def __init__(self, loop: asyncio.AbstractEventLoop, budget_us: int, answer_budget_us: int = 0) -> None:
        if budget_us <= 0:
            raise ValueError(f"busy-poll budget must be positive microseconds, got {budget_us}")
        self._spin = _spinner(loop)
        self.budget = budget_us / 1e6
        self.answer_budget = max(answer_budget_us, budget_us) / 1e6
        self.awaiting: Sized = ()
        self._wrote_at = 0.0
        self._used = self.budget  # the budget of the last write, that its answer's gap is held to
        self._credit = 1  # poll after the first write, to learn the peer's pace
        self._skipped = 0

    @property
    def polling(self) -> bool:
        """Whether the next write is followed by polling (gaps have been within budget lately)."""
        return self._credit > 0

    def wrote(self) -> None:
        """After a write to the pipe: poll for the answer if the peer has been quick."""
        now = _perf()
        self._wrote_at = now
        budget = self._used = self.answer_budget if self.awaiting else self.budget
        if self._credit > 0:
            self._spin.extend(now, now + budget)
            return
        self._skipped += 1
        if self._skipped >= _PROBE_EVERY:
            self._skipped = 0
            self._spin.extend(now, now + budget)

    def received(self) -> None:
        """On a read: how long after our last write it came decides whether we poll next time."""
        wrote_at = self._wrote_at
        if not wrote_at:
            return
        self._wrote_at = 0.0
        if _perf() - wrote_at <= self._used:
            if self._credit < _CREDIT_MAX:
                self._credit += 1
        elif self._credit > 0:
            self._credit -= 1
