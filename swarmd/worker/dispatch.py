"""Admission and batch dispatch of an inference engine: the hot path.

A request is validated against the model signature, then either queued or
refused at once (ERR_OVERLOADED), so a caller never hangs on a full worker.
Dispatch is event-driven, with no task of its own: a new request or a finished
run starts the next batch whenever one of `max_concurrent_inferences` run slots
is free, handing it to an executor thread (or running a small, fast batch on
the loop thread); the event loop only queues, times out and answers. Deadlines
are timers: a request whose deadline passes while queued is removed before it
runs. `Dispatch` is a mixin of `InferenceEngine`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from swarmd.errors import (
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.node import tracing
from swarmd.worker.batcher import Pending, PendingState, Result, execute, internal_error, take_batch
from swarmd.worker.config import WorkerConfig
from swarmd.worker.result import InferResult
from swarmd.worker.served import ServedModel, WorkerState
from swarmd.worker.stats import LoadStats

# The clock of admission, deadlines and every duration the statistics report: the default
# loop's own (time.monotonic), read afresh. uvloop's loop.time() moves once per loop turn and
# in whole milliseconds, which made a request's queue and total times equal and ms-rounded.
# Timers scheduled with loop.call_at on it stay right: both loops count CLOCK_MONOTONIC.
_clock = time.monotonic


def _input_bytes(p: Pending) -> int:
    return sum(a.nbytes for a in p.feeds.values())


def _timed_execute(*args: Any) -> tuple[list[Result], tuple[float, float, float]]:
    """execute() in an executor thread, with its (stack inputs, run, split outputs) seconds."""
    times = [0.0, 0.0, 0.0]
    results = execute(*args, times)
    return results, (times[0], times[1], times[2])


class Dispatch:
    """infer(): admission, queues, batch starts and completions."""

    config: WorkerConfig
    state: WorkerState
    stats: LoadStats
    queued: int
    in_flight: int
    executor: ThreadPoolExecutor
    log: Any
    _free: int
    _turn: int
    _runs: set[asyncio.Future[Any]]
    _idle: asyncio.Event
    _models: dict[tuple[str, str], ServedModel]

    if TYPE_CHECKING:  # provided by InferenceEngine

        def get(self, name: str, version: str | None = None) -> ServedModel | None: ...

    async def infer(
        self,
        model: str,
        inputs: Any,
        *,
        outputs: Any = None,
        version: str | None = None,
        budget: float | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        """Validate, queue (or refuse at once), and await the answer within `budget` seconds.

        `budget` is what is left of the caller's deadline (config.default_timeout
        when None); past it the request fails with ERR_TIMEOUT and, if it had
        not started, never runs.
        """
        if self.state in (WorkerState.DRAINING, WorkerState.STOPPED):
            raise SwarmdError(ERR_NOT_READY, f"worker is {self.state.value.lower()} and takes no new requests")
        served = self.get(model, version)
        if served is None or served.closing:
            if self.loading(model, version if version not in ("", "latest") else None):
                raise SwarmdError(ERR_NOT_READY, f"model '{model}' is still loading")
            raise SwarmdError(ERR_NOT_FOUND, f"model '{model}'{f' version {version!r}' if version else ''} is not loaded on this worker")
        feeds, names, rows = served.signature.validate(model, inputs, outputs, batch=served.policy.enabled)
        if self.queued >= self.config.max_queue:
            raise SwarmdError(
                ERR_OVERLOADED, f"worker queue is full ({self.queued} requests waiting); retry elsewhere or later"
            )
        loop = asyncio.get_running_loop()
        now = _clock()
        budget = self.config.default_timeout if budget is None else budget
        if not budget > 0:  # also NaN
            raise SwarmdError(ERR_TIMEOUT, "the request's deadline passed before it reached the worker")
        fut: asyncio.Future[list[np.ndarray]] = loop.create_future()
        p = Pending(feeds, names, rows, now + budget, now, fut, request_id=request_id)
        p.timer = loop.call_at(p.deadline, self._expire, served, p)
        self.queued += 1
        served.pending += 1
        served.idle.clear()
        self._idle.clear()
        served.queue.append(p)
        served.queued_rows += max(rows, 1)
        if self._free:
            self._pump_model(served)
        try:
            arrays = await fut
        except asyncio.CancelledError:
            if p.state is PendingState.QUEUED:  # the caller gave up: free its place in line
                self._retire_queued(served, p)
            raise
        finally:
            if p.trace is not None:
                tracing.worker_phases(p.enqueued, *p.trace)
        return InferResult(served.name, served.version, dict(zip(names, arrays, strict=True)))

    def _retire_queued(self, served: ServedModel, p: Pending) -> None:
        p.state = PendingState.DONE
        if p.timer is not None:
            p.timer.cancel()
        self.queued -= 1
        served.queued_rows -= max(p.rows, 1)
        self._settle(served, 1)

    def _settle(self, served: ServedModel, n: int) -> None:
        served.pending -= n
        if served.pending == 0:
            served.idle.set()
        if self.queued == 0 and self.in_flight == 0:
            self._idle.set()

    def _expire(self, served: ServedModel, p: Pending) -> None:
        p.timer = None
        if p.future.done():
            return
        if p.state is PendingState.QUEUED:
            self._retire_queued(served, p)
            self.stats.record(self._now() - p.enqueued, ok=False)
            served.stats.record_request(False, self._now() - p.enqueued, None)
            p.future.set_exception(SwarmdError(ERR_TIMEOUT, "deadline passed while the request was queued; it was not run"))
        else:  # running: the answer would come too late to be used
            p.future.set_exception(SwarmdError(ERR_TIMEOUT, "deadline passed while the request was running"))

    @staticmethod
    def _now() -> float:
        return _clock()

    def _pump_model(self, served: ServedModel) -> None:
        """Start runs of this model's queued batches while run slots are free."""
        while self._free and served.queue and self._start_batch(served):
            pass

    def _pump(self) -> None:
        """A slot came free: give it to the models with queued work, in turn."""
        waiting = [m for m in self._models.values() if m.queue]
        if not waiting:
            return
        self._turn = (self._turn + 1) % len(waiting)
        for m in waiting[self._turn :] + waiting[: self._turn]:
            if not self._free:
                return
            self._pump_model(m)

    def _on_delay(self, served: ServedModel) -> None:
        served.delay_timer = None
        self._pump_model(served)

    def _inline_candidate(self, served: ServedModel) -> bool:
        """Whether a lone request could run on the loop thread: idle worker, quick model, no batching lately."""
        inline_s = self.config.inline_run_us / 1e6
        return bool(inline_s) and self.in_flight == 0 and served.batch_ewma < 1.5 and served.run_ewma_s <= inline_s

    def _on_deferred(self, served: ServedModel) -> None:
        served.deferred = False
        if self._free:
            self._start_batch(served, inline_ok=True)
            self._pump_model(served)

    def _start_batch(self, served: ServedModel, inline_ok: bool = False) -> bool:
        """Take one batch off the queue into an executor thread; False if none may start now.

        With a queue delay, a batch that is not full waits until its oldest
        request has waited the delay (a timer resumes it); a full one starts
        at once. On an idle worker with inline runs enabled, the start is
        deferred by one loop turn (requests read from the same socket burst
        join first) and a batch of one then runs on the loop thread.
        """
        policy = served.policy
        queue = served.queue
        while queue and queue[0].state is not PendingState.QUEUED:
            queue.popleft()
        if not queue or served.deferred:
            return False
        loop = queue[0].future.get_loop()  # the running loop, without get_running_loop()'s getpid() (Python 3.11)
        if policy.enabled and policy.max_queue_delay_us and served.queued_rows < policy.max_batch_size:
            due = queue[0].enqueued + policy.max_queue_delay_us / 1e6
            if _clock() < due:
                if served.delay_timer is None:
                    served.delay_timer = loop.call_at(due, self._on_delay, served)
                return False
        if not inline_ok and self._inline_candidate(served):
            served.deferred = True
            loop.call_soon(self._on_deferred, served)
            return False
        if served.delay_timer is not None:
            served.delay_timer.cancel()
            served.delay_timer = None
        batch = take_batch(queue, policy)
        if not batch:
            return False
        for p in batch:
            p.state = PendingState.RUNNING
            served.queued_rows -= max(p.rows, 1)
        n = len(batch)
        self.queued -= n
        self.in_flight += n
        self._free -= 1
        served.batch_ewma += 0.2 * (n - served.batch_ewma)
        if (
            inline_ok
            and n == 1
            and not queue
            and self.in_flight == 1
            and (size := _input_bytes(batch[0])) <= served.inline_bytes
            and self._inline_candidate_after_take(served)
        ):
            # Lightly loaded and a quick model: a thread handoff would cost more than the run
            # blocks the loop (at most inline_run_us). Under load batches form, runs stay in
            # threads and the loop stays free.
            times = [0.0, 0.0, 0.0]
            started = _clock()
            results = execute(served.runtime.run, served.name, batch[0].outputs, [batch[0].feeds], [batch[0].rows],
                              times)
            self._note_run_time(served, times[1], size)
            self._complete(served, batch, results, started, (times[0], times[1], times[2]))
            return True
        run = loop.run_in_executor(
            self.executor,
            _timed_execute,
            served.runtime.run,
            served.name,
            batch[0].outputs,
            [p.feeds for p in batch],
            [p.rows for p in batch],
        )
        self._runs.add(run)
        run.add_done_callback(functools.partial(self._finished, served, batch, _clock()))
        return True

    def _inline_candidate_after_take(self, served: ServedModel) -> bool:
        inline_s = self.config.inline_run_us / 1e6
        return served.batch_ewma < 1.5 and served.run_ewma_s <= inline_s

    def _note_run_time(self, served: ServedModel, seconds: float, size: int) -> None:
        """Fold one lone run's time into the model's estimate, and into the largest input known quick enough to inline."""
        served.run_ewma_s = seconds if served.run_ewma_s == float("inf") else 0.8 * served.run_ewma_s + 0.2 * seconds
        if seconds <= self.config.inline_run_us / 1e6:
            served.inline_bytes = max(served.inline_bytes, size)
        elif size <= served.inline_bytes:
            served.inline_bytes = size - 1  # this size was too slow after all (a busier box)

    def _finished(
        self, served: ServedModel, batch: list[Pending], started: float,
        run: asyncio.Future[tuple[list[Result], tuple[float, float, float]]],
    ) -> None:
        self._runs.discard(run)
        times: tuple[float, float, float] | None = None
        if run.cancelled():
            results: list[Result] = [SwarmdError(ERR_NOT_READY, "worker stopped before the request ran")] * len(batch)
        elif (exc := run.exception()) is not None:
            self.log.opt(exception=exc).bind(event="run_failed", model=served.name).error("run failed")
            results = [internal_error(served.name, exc)] * len(batch)
        else:
            results, times = run.result()
            if len(batch) == 1:
                # The run alone, timed in its thread: what an inline run would block the loop for.
                # (Timing the handoff too made the estimate grow with the machine's load, so on a
                # busy box the very requests the handoff slows most never ran inline.)
                self._note_run_time(served, times[1], _input_bytes(batch[0]))
        self._complete(served, batch, results, started, times)

    def _complete(self, served: ServedModel, batch: list[Pending], results: list[Result], started: float,
                  times: tuple[float, float, float] | None) -> None:
        self._free += 1
        now = self._now()
        n = len(batch)
        stats, model_stats = self.stats, served.stats
        stats.record_batch(n)
        rows = max(batch[0].rows, 1) if n == 1 else sum(max(p.rows, 1) for p in batch)
        if times is not None:
            model_stats.record_run(n, rows, times)
        if tracing.tracer is not None:  # the request's spans are made in its own context (infer)
            for p in batch:
                p.trace = (started, now, times, n, rows)
        for p, r in zip(batch, results, strict=True):
            p.state = PendingState.DONE
            if p.timer is not None:
                p.timer.cancel()
            ok = not isinstance(r, SwarmdError)
            stats.record(now - p.enqueued, ok=ok)
            model_stats.record_request(ok, now - p.enqueued, started - p.enqueued)
            if not p.future.done():
                if ok:
                    p.future.set_result(r)
                else:
                    p.future.set_exception(r)
        self.in_flight -= len(batch)
        self._settle(served, len(batch))
        self._pump()
