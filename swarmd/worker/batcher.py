"""Dynamic batching, sans-IO: pick compatible queued requests, stack, run, split.

The event loop side (engine.py) owns queues, timers and futures; everything
here is plain functions on data, so the rules (what may share a batch, how
results are cut back apart, how one bad request is kept from failing its
neighbours) are tested without a loop or a thread.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from swarmd.errors import ERR_BAD_REQUEST, ERR_INTERNAL, SwarmdError
from swarmd.worker.config import BatchingConfig


class PendingState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Pending:
    """One accepted request, from admission to its answer."""

    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int  # size of the batch dim; 0 when the model is not batchable
    deadline: float  # time.monotonic()
    enqueued: float  # time.monotonic()
    future: Any  # asyncio.Future[list[np.ndarray]]
    key: tuple[Any, ...] = ()
    state: PendingState = PendingState.QUEUED
    timer: Any = None
    request_id: str | None = None
    # (started, ended, compute times, batch requests, batch rows) of its run, kept while tracing is on
    trace: tuple[float, float, tuple[float, float, float] | None, int, int] | None = None

    def batch_key(self) -> tuple[Any, ...]:
        """`key`, computed on first use: a lone request (the usual case at low load) never needs it."""
        if not self.key:
            self.key = batch_key(self.feeds, self.outputs)
        return self.key


def batch_key(feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[Any, ...]:
    """Requests may share a run only if everything but the batch dim agrees."""
    return (outputs, tuple((name, arr.shape[1:]) for name, arr in feeds.items()))


def take_batch(queue: deque[Pending], policy: BatchingConfig) -> list[Pending]:
    """Remove and return the next batch from the front of `queue`.

    Finished entries (timed out or abandoned while queued) are discarded on
    the way. The first live entry fixes the batch key; later compatible
    entries join while the rows fit in max_batch_size; incompatible ones keep
    their place in line. Without batching a batch is one request.
    """
    while queue and queue[0].state is not PendingState.QUEUED:
        queue.popleft()
    if not queue:
        return []
    first = queue.popleft()
    batch = [first]
    if not policy.enabled or first.rows == 0:
        return batch
    rows = first.rows
    kept: list[Pending] = []
    key = first.batch_key() if queue else ()
    while queue and rows < policy.max_batch_size:
        p = queue.popleft()
        if p.state is not PendingState.QUEUED:
            continue
        if p.batch_key() == key and rows + p.rows <= policy.max_batch_size:
            batch.append(p)
            rows += p.rows
        else:
            kept.append(p)
            if len(kept) >= 64:  # bound the scan; the rest waits for the next batch
                break
    queue.extendleft(reversed(kept))
    return batch


Result = list[np.ndarray] | SwarmdError
RunFn = Callable[[tuple[str, ...], dict[str, np.ndarray]], list[np.ndarray]]


def _run_one(run: RunFn, model: str, outputs: tuple[str, ...], feeds: dict[str, np.ndarray]) -> Result:
    try:
        return run(outputs, feeds)
    except SwarmdError as e:
        return e
    except Exception as e:  # onnxruntime reports bad values (e.g. an index out of range) this way
        text = str(e).strip()
        first = text.splitlines()[0][:300] if text else type(e).__name__
        return SwarmdError(ERR_BAD_REQUEST, f"model '{model}' failed on this input: {first}")


def execute(
    run: RunFn, model: str, outputs: tuple[str, ...], feeds: list[dict[str, np.ndarray]], rows: list[int],
    times: list[float] | None = None,
) -> list[Result]:
    """Run a batch (blocking; meant for an executor thread) and cut the results apart.

    One request runs as is. Several are concatenated along dim 0, run once
    and split by their row counts. If the stacked run fails, or an output
    does not come back with one row per input row, each request is run alone
    so only the one at fault gets an error. `times`, when given, receives the
    seconds spent stacking inputs, running and splitting outputs (Triton's
    compute_input / compute_infer / compute_output).
    """
    t0 = time.perf_counter()
    if len(feeds) == 1:
        result = [_run_one(run, model, outputs, feeds[0])]
        if times is not None:
            times[:] = [0.0, time.perf_counter() - t0, 0.0]
        return result
    total = sum(rows)
    stacked = {name: np.concatenate([f[name] for f in feeds], axis=0) for name in feeds[0]}
    t1 = time.perf_counter()
    out = _run_one(run, model, outputs, stacked)
    t2 = time.perf_counter()
    if isinstance(out, SwarmdError) or any(o.ndim == 0 or o.shape[0] != total for o in out):
        results = [_run_one(run, model, outputs, f) for f in feeds]
        if times is not None:
            times[:] = [t1 - t0, time.perf_counter() - t1, 0.0]
        return results
    results = []
    start = 0
    for n in rows:
        results.append([o[start : start + n] for o in out])
        start += n
    if times is not None:
        times[:] = [t1 - t0, t2 - t1, time.perf_counter() - t2]
    return results


def internal_error(model: str, exc: BaseException) -> SwarmdError:
    return SwarmdError(ERR_INTERNAL, f"running model '{model}' failed: {type(exc).__name__}: {exc}"[:400])
