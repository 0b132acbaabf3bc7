"""The gateway's access log, written off the request path, for both fronts.

A log line through loguru (bind, format, JSON, a write and a flush of the
stream) cost ~19% of the gateway's CPU per request on the MLP JSON path
(issue 19). Here a request only appends a small dict to a list; the list is
written as one `event: http` line holding every request of the batch
(`count`, `requests`: [{ts, request_id, method, path, status, ms, key, peer}]), at most
`interval` seconds after its first entry, when `max_batch` entries are
waiting, and on stop. Every request is still logged, with the same fields; the
exact counts live in the Prometheus counters as before. A gRPC call
(grpc_service.OipService.end) is an entry of the same batches with method
`GRPC`, its method's path, `status` the HTTP status it counts as in the
metrics, and `grpc_status`, the status it was answered with.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loguru import logger

INTERVAL = 1.0  # seconds a request may wait in the batch before its line is written
MAX_BATCH = 256  # entries per line: a line stays a few tens of KiB


class AccessLog:
    """Batches access-log entries; `note` is all a request pays."""

    def __init__(self, interval: float = INTERVAL, max_batch: int = MAX_BATCH) -> None:
        self.interval = interval
        self.max_batch = max_batch
        self.written = 0  # entries written so far
        self._batch: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.log = logger.bind(role="gateway", event="http")

    def note(self, request_id: str | None, method: str, path: str, status: int, ms: float, key: str | None,
             peer: str | None, grpc_status: int | None = None) -> None:
        batch = self._batch
        entry = {"ts": round(time.time(), 3), "request_id": request_id, "method": method, "path": path,
                 "status": status, "ms": ms, "key": key, "peer": peer}
        if grpc_status is not None:
            entry["grpc_status"] = grpc_status
        batch.append(entry)
        if len(batch) >= self.max_batch:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.interval, self._due)
            except RuntimeError:  # no loop (a synchronous caller): write at once
                self.flush()

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write what is waiting as one line; the gateway calls it on stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        self.written += len(batch)
        last = batch[-1]
        self.log.bind(count=len(batch), requests=batch).info(
            "{} request(s), the last {} {} {}", len(batch), last["method"], last["path"], last["status"])
