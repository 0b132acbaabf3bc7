"""A model loaded in a worker, with its own queue, and the worker's states."""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmd.signature import ModelSignature
from swarmd.worker.batcher import Pending
from swarmd.worker.config import BatchingConfig
from swarmd.worker.runtime import ModelRuntime
from swarmd.worker.stats import ModelStats


class WorkerState(enum.Enum):
    JOINING = "JOINING"  # starting, loading its first models
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"  # finishing accepted work, taking no more
    STOPPED = "STOPPED"


@dataclass(eq=False)
class ServedModel:
    """A model loaded in this worker, with its own queue and dispatcher."""

    name: str
    version: str
    digest: str
    runtime: ModelRuntime
    policy: BatchingConfig
    size: int = 0
    queue: deque[Pending] = field(default_factory=deque)
    queued_rows: int = 0
    pending: int = 0  # queued + running requests of this model
    closing: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    delay_timer: asyncio.TimerHandle | None = None  # set while a batch waits for company
    run_ewma_s: float = float("inf")  # how long one run takes; unknown until the first one finished
    batch_ewma: float = 1.0  # recent requests per run: above ~1 the worker is busy enough to batch
    # input bytes of the largest lone request whose run was timed within inline_run_us: only requests
    # no larger may run on the loop thread (the average says nothing about a 150k-row request)
    inline_bytes: int = 0
    deferred: bool = False  # a start is scheduled for the next loop turn (inline runs)
    stats: ModelStats = field(default_factory=ModelStats)  # Triton-shaped statistics of this version

    @property
    def signature(self) -> ModelSignature:
        return self.runtime.signature

    def describe(self, state: str = "READY") -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "state": state,
            "provider": self.runtime.provider,
            **({"provider_fallback": self.runtime.fallback} if self.runtime.fallback else {}),
            **self.signature.to_wire(),
            "batching": {
                "enabled": self.policy.enabled,
                "max_batch_size": self.policy.max_batch_size,
                "max_queue_delay_us": self.policy.max_queue_delay_us,
            },
        }


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
