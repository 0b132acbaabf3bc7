"""Routing through the swarm's orchestrators, for callers that are not one.

The gateway and the client library both turn "run model M" into a worker
call the same way: ask an orchestrator `findAvailableWorker {model, exclude}`
(sticky on the first orchestrator that answers), fall back to the least
loaded ONLINE worker from the workers' own topic records when no
orchestrator answers, call `runInference` on the chosen worker and, on a
worker-side failure another worker may not have, try another worker within
the request's budget. The Router in router.py does the same inside an
orchestrator over its lease registry; this one only knows what the DHT
records and the orchestrators say.

No networking of its own: it is given `request(public_key, method, params,
seconds)` (swarm.request, or a dispatch to a co-located role), so it serves
the gateway's node and the client library's short-lived swarm alike.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_CLOSED,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)

# Worker-side failures another worker may not have; everything else is the caller's problem.
RETRYABLE = frozenset({ERR_CLOSED, ERR_TIMEOUT, ERR_OVERLOADED, ERR_NOT_READY, ERR_UNAVAILABLE})
MAX_ATTEMPTS = 3
RPC_TIMEOUT = 10.0

Request = Callable[[bytes, str, dict[str, Any], float], Awaitable[Any]]


@dataclass
class SwarmView:
    """What the last discovery pass saw: orchestrators, stores, ONLINE workers and their record payloads."""

    orchestrators: list[bytes] = field(default_factory=list)
    stores: list[bytes] = field(default_factory=list)
    workers: dict[bytes, dict[str, Any]] = field(default_factory=dict)  # public key -> record payload
    at: float = 0.0  # time.monotonic() of the pass; 0 before the first


def worker_serves(payload: dict[str, Any], model: str) -> bool:
    """Whether a worker's record lists model among the models it has loaded."""
    models = payload.get("models")
    return isinstance(models, list) and any((m.get("name") if isinstance(m, dict) else m) == model for m in models)


def worker_load(payload: dict[str, Any]) -> float:
    """Queued plus in-flight requests from a worker's record (0 when it says nothing)."""
    load = payload.get("load") if isinstance(payload.get("load"), dict) else {}
    try:
        return float(load.get("queue", 0) or 0) + float(load.get("in_flight", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


class RemoteRouter:
    """Chooses workers through orchestrators (or worker records) and fails over between them."""

    def __init__(
        self,
        request: Request,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        rpc_timeout: float = RPC_TIMEOUT,
    ) -> None:
        self.request = request
        self.view = SwarmView()
        self.max_attempts = max_attempts
        self.rpc_timeout = rpc_timeout
        self._orch_index = 0
        self.log = logger.bind(part="remote_router")

    async def call_any(self, candidates: list[bytes], method: str, params: dict[str, Any]) -> Any:
        """Call one of candidates (sticky on the first that worked); move on when one is unreachable."""
        if not candidates:
            raise SwarmdError(ERR_UNAVAILABLE, f"no peer found to answer {method}")
        last: SwarmdError | None = None
        n = len(candidates)
        for i in range(n):
            pk = candidates[(self._orch_index + i) % n]
            try:
                return await self.request(pk, method, params, self.rpc_timeout)
            except SwarmdError as e:
                if e.code not in RETRYABLE:
                    raise
                last = e
                self._orch_index = (self._orch_index + i + 1) % n
        assert last is not None
        raise last

    def worker_for(self, model: str, exclude: set[bytes]) -> bytes | None:
        """Fallback choice from the workers' own records: one already serving the model if any
        (least queued, random among equals), else any ONLINE worker, which loads the model
        from a store on its first request."""
        serving: list[tuple[float, float, bytes]] = []
        other: list[tuple[float, float, bytes]] = []
        for pk, payload in self.view.workers.items():
            if pk not in exclude:
                entry = (worker_load(payload), random.random(), pk)
                (serving if worker_serves(payload, model) else other).append(entry)
        pool = serving or other
        return min(pool)[2] if pool else None

    async def choose(self, model: str, exclude: set[bytes]) -> bytes:
        """A worker for model that is not in exclude: an orchestrator's pick, else the records' least loaded."""
        refusal: SwarmdError | None = None
        if self.view.orchestrators:
            params: dict[str, Any] = {"model": model}
            if exclude:
                params["exclude"] = [pk.hex() for pk in exclude]
            try:
                ans = await self.call_any(self.view.orchestrators, "findAvailableWorker", params)
                pk = bytes.fromhex(ans["public_key"])
                if pk not in exclude:
                    return pk
            except SwarmdError as e:
                # ERR_NOT_FOUND: no registered worker has the model loaded yet; a worker that can
                # fetch it from a store (its record lists no models) may still serve it
                if e.code not in RETRYABLE and e.code != ERR_NOT_FOUND:
                    raise
                refusal = e if e.code == ERR_NOT_FOUND else None
            except (KeyError, TypeError, ValueError):
                self.log.bind(event="bad_orchestrator_answer").warning("findAvailableWorker gave a malformed answer")
        pk = self.worker_for(model, exclude)
        if pk is None:
            raise refusal or SwarmdError(ERR_UNAVAILABLE, f"no worker is available for model {model!r}")
        return pk

    async def infer(self, params: dict[str, Any], budget: float) -> tuple[Any, bytes]:
        """runInference on a chosen worker, failing over to others; returns (result, worker key)."""
        model = params["model"]
        deadline = time.monotonic() + budget
        tried: set[bytes] = set()
        last: SwarmdError | None = None
        for _ in range(self.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                pk = await self.choose(model, tried)
            except SwarmdError as e:
                if last is None or e.code not in (ERR_UNAVAILABLE, ERR_NOT_FOUND):
                    raise
                break  # no other worker left to try: report the last worker failure
            tried.add(pk)
            try:
                return await self.request(pk, "runInference", params, remaining), pk
            except SwarmdError as e:
                if e.code not in RETRYABLE:
                    raise
                last = e
                self.log.bind(event="worker_failed", worker=pk.hex()[:16], code=e.code).info(
                    "runInference on {} failed with {}; trying another worker", pk.hex()[:16], e.code
                )
        if last is None:
            raise SwarmdError(ERR_TIMEOUT, f"no time left to run model {model!r}")
        raise SwarmdError(
            ERR_OVERLOADED if last.code == ERR_OVERLOADED else ERR_UNAVAILABLE,
            f"inference failed on {len(tried)} worker(s); last: {last.code}: {last.message}",
        )


__all__ = ["RETRYABLE", "RemoteRouter", "SwarmView", "worker_load", "worker_serves"]
