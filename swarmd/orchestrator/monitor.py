"""Active health checks and lease expiry on a timer.

Each tick sweeps expired leases, then asks every registered worker
`checkCapacity` (bounded by health_timeout, up to 64 at once): an answer
re-admits an ejected worker and refreshes its state and load, silence or an
error counts toward ejection. The decisions live in the Balancer; this loop
only does the asking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from swarmd.errors import ERR_UNKNOWN_METHOD, SwarmdError, classify
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.registry import WorkerLease

MAX_PARALLEL_CHECKS = 64  # a large fleet is checked in waves, not with thousands of dials at once

Checker = Callable[[WorkerLease, str, dict[str, Any], float], Awaitable[Any]]


class HealthMonitor:
    def __init__(
        self,
        balancer: Balancer,
        call: Checker,
        *,
        on_expired: Callable[[str, bool], None] | None = None,  # (worker, was ejected)
    ) -> None:
        self.balancer = balancer
        self.call = call
        self.on_expired = on_expired
        self.rounds = 0
        self._shared: asyncio.Future[None] | None = None
        self.log = logger.bind(part="health")

    async def run(self) -> None:
        interval = self.balancer.config.health_interval
        while True:
            await self.tick()
            await asyncio.sleep(interval)

    async def tick_shared(self) -> None:
        """A round now, shared by every caller that asks while one runs (healthCheck {refresh}),
        so a burst of requests costs one round of checks, not one each."""
        if self._shared is None or self._shared.done():
            self._shared = asyncio.ensure_future(self.tick())
        await asyncio.shield(self._shared)

    async def close(self) -> None:
        """Cancel a shared round still running (its owner is this monitor, not the caller)."""
        shared, self._shared = self._shared, None
        if shared is not None and not shared.done():
            shared.cancel()
            await asyncio.gather(shared, return_exceptions=True)  # never swallows a cancel of ours

    async def tick(self) -> None:
        """One round: sweep expired leases, check every worker once."""
        ejected = set(self.balancer.health.ejected)
        for key in self.balancer.expire():
            self.log.bind(event="lease_expired", worker=key[:16]).info("lease of worker {} expired", key[:16])
            if self.on_expired is not None:
                self.on_expired(key, key in ejected)
        leases = list(self.balancer.registry)
        if leases:
            gate = asyncio.Semaphore(MAX_PARALLEL_CHECKS)

            async def bounded(lease: WorkerLease) -> bool:
                async with gate:
                    return await self.check(lease)

            await asyncio.gather(*(bounded(lease) for lease in leases))
        self.rounds += 1

    async def check(self, lease: WorkerLease) -> bool:
        """Check one worker; True when it answered."""
        b = self.balancer
        key = lease.public_key
        timeout = b.config.health_timeout
        try:
            async with asyncio.timeout(timeout):
                info = await self._ask(lease, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure to answer is a failed check, logged once per ejection
            _, code = classify(e)
            if b.check_failed(key, code):
                self.log.bind(event="worker_ejected", worker=key[:16], code=code).warning(
                    "worker {} ejected after {} consecutive failures (last: {})",
                    key[:16],
                    b.config.eject_after,
                    code,
                )
            return False
        if b.check_passed(key, info if isinstance(info, dict) else None):
            self.log.bind(event="worker_readmitted", worker=key[:16]).info("worker {} re-admitted", key[:16])
        return True

    async def _ask(self, lease: WorkerLease, timeout: float) -> Any:
        """checkCapacity, falling back to the built-in ping for peers that serve no capacity report."""
        try:
            return await self.call(lease, "checkCapacity", {}, timeout)
        except SwarmdError as e:
            if e.code != ERR_UNKNOWN_METHOD:
                raise
            return await self.call(lease, "ping", None, timeout)
