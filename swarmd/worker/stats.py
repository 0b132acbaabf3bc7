"""Live load figures a worker announces and answers checkCapacity with.

Orchestrators route on these (least connections, power of two choices on
EWMA latency), so they are cheap to update on every request and always
current: no background task keeps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


class Duration:
    """A count and a total in nanoseconds: Triton's StatisticDuration."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9) * n

    def to_wire(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


INFER_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """One loaded model version's statistics in the shape of Triton's statistics extension
    (`/v2/models/{m}/stats`, gRPC ModelStatistics) and the source of the worker's
    `nv_inference_*` metrics. Per request: success or fail with its whole time in the
    worker, the time it queued, and the compute times of the run it was part of; per run:
    one execution, its rows as inferences, and its compute times under its batch size."""

    MAX_BATCH_SIZES = 64  # distinct batch sizes kept (a bound: sizes come from requests)

    def __init__(self) -> None:
        self.phases = {p: Duration() for p in INFER_PHASES}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, tuple[Duration, Duration, Duration]] = {}

    def record_run(self, requests: int, rows: int, times: tuple[float, float, float]) -> None:
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        phases = self.phases  # unrolled: this runs per run, on the loop thread
        phases["compute_input"].add(times[0], requests)
        phases["compute_infer"].add(times[1], requests)
        phases["compute_output"].add(times[2], requests)
        per = self.batches.get(requests)
        if per is None and len(self.batches) < self.MAX_BATCH_SIZES:
            per = self.batches[requests] = (Duration(), Duration(), Duration())
        if per is not None:
            for d, seconds in zip(per, times, strict=True):
                d.add(seconds)

    def record_request(self, ok: bool, total_s: float, queue_s: float | None) -> None:
        self.phases["success" if ok else "fail"].add(total_s)
        if queue_s is not None:
            self.phases["queue"].add(queue_s)

    def to_triton(self, name: str, version: str) -> dict[str, object]:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {p: d.to_wire() for p, d in self.phases.items()},
            "batch_stats": [
                {"batch_size": size, "compute_input": a.to_wire(), "compute_infer": b.to_wire(),
                 "compute_output": c.to_wire()}
                for size, (a, b, c) in sorted(self.batches.items())
            ],
        }


def merge_statistics(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sum Triton-shaped statistics of the same model version reported by several workers
    (the gateway's view of the swarm); malformed entries from a peer are skipped."""
    out: dict[tuple[str, str], dict[str, Any]] = {}

    def add_dur(into: dict[str, int], d: Any) -> None:
        if isinstance(d, dict):
            into["count"] += int(d.get("count", 0) or 0)
            into["ns"] += int(d.get("ns", 0) or 0)

    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not isinstance(doc.get("version"), str):
            continue
        key = (doc["name"], doc["version"])
        acc = out.get(key)
        if acc is None:
            acc = out[key] = {"name": key[0], "version": key[1], "last_inference": 0, "inference_count": 0,
                              "execution_count": 0,
                              "inference_stats": {p: {"count": 0, "ns": 0} for p in INFER_PHASES},
                              "batch_stats": {}}
        acc["last_inference"] = max(acc["last_inference"], int(doc.get("last_inference", 0) or 0))
        acc["inference_count"] += int(doc.get("inference_count", 0) or 0)
        acc["execution_count"] += int(doc.get("execution_count", 0) or 0)
        stats = doc.get("inference_stats") if isinstance(doc.get("inference_stats"), dict) else {}
        for p in INFER_PHASES:
            add_dur(acc["inference_stats"][p], stats.get(p))
        for b in doc.get("batch_stats") or []:
            if not isinstance(b, dict) or not isinstance(b.get("batch_size"), int):
                continue
            slot = acc["batch_stats"].setdefault(b["batch_size"], {
                "batch_size": b["batch_size"], **{k: {"count": 0, "ns": 0}
                                                   for k in ("compute_input", "compute_infer", "compute_output")}})
            for k in ("compute_input", "compute_infer", "compute_output"):
                add_dur(slot[k], b.get(k))
    result = []
    for acc in out.values():
        acc["batch_stats"] = [acc["batch_stats"][k] for k in sorted(acc["batch_stats"])]
        result.append(acc)
    return sorted(result, key=lambda d: (d["name"], d["version"]))
