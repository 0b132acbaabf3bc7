"""Live load figures a worker announces and answers checkCapacity with.

Orchestrators route on these (least connections, power of two choices on
EWMA latency), so they are cheap to update on every request and always
current: no background task keeps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class LoadSnapshot:
    queue: int
    in_flight: int
    ewma_ms: float
    rps: float
    models: int
    completed: int
    failed: int
    batches: int
    mean_batch: float

    def to_wire(self) -> dict[str, float | int]:
        return {
            "queue": self.queue,
            "in_flight": self.in_flight,
            "ewma_ms": round(self.ewma_ms, 3),
            "rps": round(self.rps, 1),
            "models": self.models,
        }


class LoadStats:
    """EWMA latency and throughput over a sliding window of one-second buckets."""

    def __init__(self, *, alpha: float = 0.1, window_s: int = 5, clock: Callable[[], float] | None = None) -> None:
        self.alpha = alpha
        self.window_s = window_s
        self._clock = clock or time.monotonic
        self.ewma_ms = 0.0
        self.completed = 0
        self.failed = 0
        self.batches = 0
        self.batched_rows = 0
        self._buckets: dict[int, int] = {}

    def record(self, latency_s: float, ok: bool = True) -> None:
        ms = latency_s * 1000.0
        self.ewma_ms = ms if self.completed + self.failed == 0 else self.ewma_ms + self.alpha * (ms - self.ewma_ms)
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        sec = int(self._clock())
        self._buckets[sec] = self._buckets.get(sec, 0) + 1
        if len(self._buckets) > self.window_s + 2:
            for old in [s for s in self._buckets if s < sec - self.window_s]:
                del self._buckets[old]

    def record_batch(self, requests: int) -> None:
        self.batches += 1
        self.batched_rows += requests

    def rps(self) -> float:
        """Requests finished per second over the last full seconds of the window."""
        now = int(self._clock())
        total = sum(n for s, n in self._buckets.items() if now - self.window_s <= s < now)
        return total / self.window_s

    def snapshot(self, queue: int, in_flight: int, models: int) -> LoadSnapshot:
        return LoadSnapshot(
            queue=queue,
            in_flight=in_flight,
            ewma_ms=self.ewma_ms,
            rps=self.rps(),
            models=models,
            completed=self.completed,
            failed=self.failed,
            batches=self.batches,
            mean_batch=self.batched_rows / self.batches if self.batches else 0.0,
        )
