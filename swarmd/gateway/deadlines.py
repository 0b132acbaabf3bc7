"""One timer for every inference in flight: gateway.infer_timeout without an asyncio.timeout each.

Every inference a gateway serves gets the same budget, so deadlines fall due in the
order the inferences started: a FIFO of entries with one loop timer armed for the oldest
live one does the work of one asyncio.timeout per request (a Timeout object, a timer
handle, a reschedule and an uncancel each: ~5 µs of the loop thread per request, measured
for issue 20; an entry here is one small list). An expired entry's task is cancelled and
its `Gateway.infer` turns that cancellation into ERR_TIMEOUT, the way asyncio.timeout
turns its own into TimeoutError: an outside cancellation arriving at the same time still
propagates. Entries of finished inferences leave from the front as it finishes, and the
queue is compacted when finished ones pile up behind a slow one, so it holds at most
about twice the inferences in flight.

An entry may also guard a plain future instead of a task (the lean gRPC lane serves a
ModelInfer as the backend's future and a done callback, no Task: Gateway.infer_soon):
the deadline cancels the future, and `expired` tells its callback why.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

# an entry: [deadline (loop.time()), the task or future (None once finished), expired,
#            task.cancelling() at entry (-1: a plain future, which keeps no cancel count)]
Entry = list[Any]
DEADLINE, TASK, EXPIRED, CANCELLING = range(4)


class Deadlines:
    """Deadlines of `timeout` seconds for tasks of one event loop, FIFO, one timer."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: deque[Entry] = deque()
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def enter(self, future: asyncio.Future[Any] | None = None) -> Entry:
        """Start the clock for the current task, or for `future` (cancelled when it expires); the
        caller must leave() in a finally, or in the future's done callback."""
        if future is None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("Deadlines.enter() needs a running task or a future")
            target: asyncio.Future[Any] = task
            cancelling = task.cancelling()
        else:
            target, cancelling = future, -1
        loop = target.get_loop()
        if loop is not self._loop:  # first use, or a new loop (tests): nothing of the old one carries over
            self._loop, self._queue, self._live, self._timer = loop, deque(), 0, None
        entry = [loop.time() + self.timeout, target, False, cancelling]
        self._queue.append(entry)
        self._live += 1
        if self._timer is None:
            self._timer = loop.call_at(entry[DEADLINE], self._fire)
        return entry

    def leave(self, entry: Entry) -> None:
        task = entry[TASK]
        if task is None:
            return
        if entry[EXPIRED]:  # cancelled by its deadline but finished anyway: take that cancel back
            entry[EXPIRED] = False
            if entry[CANCELLING] >= 0:
                task.uncancel()
        entry[TASK] = None
        self._live -= 1
        q = self._queue
        while q and q[0][TASK] is None:
            q.popleft()
        if len(q) > 2 * self._live + 64:  # finished entries piled up behind a slow one
            self._queue = deque(e for e in q if e[TASK] is not None)

    def expired(self, entry: Entry) -> bool:
        """True when this entry's deadline cancelled its task and no other cancellation is pending:
        the caller answers ERR_TIMEOUT instead of propagating the CancelledError."""
        if not entry[EXPIRED] or entry[TASK] is None:
            return False
        entry[EXPIRED] = False  # the cancel is taken back here, not again in leave()
        if entry[CANCELLING] < 0:  # a future: its one cancel was the deadline's
            return True
        return entry[TASK].uncancel() <= entry[CANCELLING]

    def _fire(self) -> None:
        self._timer = None
        q = self._queue
        if not q:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while q and (q[0][TASK] is None or q[0][DEADLINE] <= now):
            entry = q.popleft()
            task = entry[TASK]
            if task is not None and not task.done():
                entry[EXPIRED] = True
                task.cancel()
            # a live entry stays counted until its task leave()s
        if q:
            self._timer = loop.call_at(q[0][DEADLINE], self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["Deadlines"]
