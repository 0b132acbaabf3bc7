"""Everything needed to route to workers from inside any process, in one object.

A Fleet is the registry (Balancer), the connections to workers, the Router,
the active health loop and — when given a swarm — the feed of the workers'
DHT records. The orchestrator role serves one over RPC; a gateway or the
client library can hold their own and call workers directly with the same
choice and failover, with no orchestrator hop in the data path:

    fleet = Fleet(OrchestratorConfig(), identity, swarm=swarm)
    await fleet.start()
    result, worker = await fleet.route("runInference", {"model": "mlp", "inputs": {...}}, model="mlp")
    await fleet.stop()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Coroutine, Iterable
from typing import Any

from loguru import logger

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.node.identity import Identity
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.connections import WorkerConnections
from swarmd.orchestrator.discovery import ad_from_record
from swarmd.orchestrator.monitor import HealthMonitor
from swarmd.orchestrator.registry import WorkerLease
from swarmd.orchestrator.router import Caller, Router
from swarmd.topics import WORKERS, worker_model_topic

# Methods whose success on a worker shows it serves params["model"].
MODEL_METHODS = frozenset({"runInference", "loadModel"})


class Fleet:
    def __init__(
        self,
        config: OrchestratorConfig | None = None,
        identity: Identity | None = None,
        *,
        swarm: Any = None,
        balancer: Balancer | None = None,
        health_checks: bool = True,
        call: Caller | None = None,
    ) -> None:
        """`call(lease, method, params, seconds)` replaces how workers are called (both for
        requests and health checks), e.g. a gateway's own swarm.request; by default one
        RPC connection per worker (WorkerConnections)."""
        self.config = config or OrchestratorConfig()
        self.swarm = swarm
        self.balancer = balancer or Balancer(self.config)
        self.connections = WorkerConnections(
            identity, swarm=swarm, connect_timeout=self.config.connect_timeout
        )
        caller = call or self.connections.call
        self.router = Router(self.balancer, caller)
        self.monitor = HealthMonitor(self.balancer, caller, on_expired=self._expired)
        self.health_checks = health_checks
        self.bad_records = 0
        self.stale_records = 0
        # A worker that died without withdrawing leaves its DHT record behind for up to the
        # record's lifetime. Remember the record sequence number of workers whose lease expired
        # while ejected, and do not let that same record bring them back; a new announcement
        # (higher seq) does.
        self._seq: dict[str, int] = {}
        self._dead: dict[str, int] = {}
        self._model_lookups: dict[str, float] = {}  # model -> when its topic was last looked up
        self._tasks: list[asyncio.Task[Any]] = []
        self.log = logger.bind(part="fleet")

    # -- lifecycle ------------------------------------------------------------

    async def start(self, supervisor: Any = None) -> None:
        """Start the health loop and (with a swarm) the DHT feed.

        With a supervisor (swarmd.node.supervisor.Supervisor) the loops are its
        children, so a crash stops the node; either way stop() cancels and
        awaits them.
        """
        if self.health_checks:
            self._spawn(supervisor, self.monitor.run(), "fleet-health")
        if self.swarm is not None:
            self._spawn(supervisor, self._discover_loop(), "fleet-discovery")

    def _spawn(self, supervisor: Any, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if supervisor is not None:
            self._tasks.append(supervisor.spawn(coro, name=name))
        else:
            self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # never swallows a cancel of stop() itself
        await self.monitor.close()
        await self.connections.close()

    # -- routing ----------------------------------------------------------------

    async def route(
        self,
        method: str,
        params: dict[str, Any],
        *,
        model: str | None,
        capability: str | None = None,
        budget: float | None = None,
    ) -> tuple[Any, WorkerLease]:
        """Call `method` on the best worker for (model, capability), failing over as configured.

        A model nobody in the registry serves yet is looked up on its own DHT
        topic once before giving up, so the first request for a model does not
        wait for the next WORKERS refresh; a model no worker has loaded goes to
        any ONLINE worker (route_unloaded), which loads it from a store.
        """
        try:
            return await self.router.route(method, params, model=model, capability=capability, budget=budget)
        except SwarmdError as e:
            if not _unknown_model(e, model):
                raise
            if await self._found_after_lookup(e, model):
                return await self.router.route(
                    method, params, model=model, capability=capability, budget=budget
                )
            if not self.config.route_unloaded or not self.balancer.candidates(None, capability):
                raise
        # Nobody has it loaded: any ONLINE worker fetches it from a store on first use. If the
        # model exists nowhere, the first worker's ERR_NOT_FOUND is the answer (no tour of all).
        result, lease = await self.router.route(
            method, params, model=None, capability=capability, budget=budget, final_codes=(ERR_NOT_FOUND,)
        )
        if model is not None and method in MODEL_METHODS:
            # It answered, so it serves the model now: route the next requests straight to it
            # instead of down this path (an exception, a lookup check, a second choice) each time.
            self.balancer.registry.add_model(lease.public_key, model)
        return result, lease

    async def choose(
        self, model: str | None, capability: str | None = None, exclude: Collection[str] = ()
    ) -> WorkerLease:
        """The worker a request should go to (the caller does the call), with the same fallbacks as route()."""
        try:
            return self.balancer.choose(model, capability, exclude)
        except SwarmdError as e:
            if not _unknown_model(e, model):
                raise
            if await self._found_after_lookup(e, model):
                return self.balancer.choose(model, capability, exclude)
            if not self.config.route_unloaded or not self.balancer.candidates(None, capability):
                raise
        return self.balancer.choose(None, capability, exclude)

    async def _found_after_lookup(self, err: SwarmdError, model: str | None) -> bool:
        if not _unknown_model(err, model) or model is None or self.swarm is None:
            return False
        if self._lookup_throttled(model, time.monotonic()):
            return False  # checked here too: no Task per request while the lookup is throttled
        # In a Task of its own: this may run in an RPC handler's inline first step, where
        # the swarm's lookup timeout (asyncio.wait_for / timeout) needs a current Task.
        return await asyncio.ensure_future(self.lookup_model(model)) > 0

    def _lookup_throttled(self, model: str, now: float) -> bool:
        last = self._model_lookups.get(model)
        return last is not None and now - last < self.config.dht_refresh

    async def lookup_model(self, model: str) -> int:
        """Look worker_model_topic(model) up now, at most once per dht_refresh per model."""
        now = time.monotonic()
        if self._lookup_throttled(model, now):
            return 0
        if len(self._model_lookups) >= 4096:  # bounded: forget old throttles rather than grow
            self._model_lookups.clear()
        self._model_lookups[model] = now
        records = await self.swarm.lookup_all(
            worker_model_topic(model), timeout=max(self.config.dht_refresh, 3.0)
        )
        return self.ingest_records(records)

    # -- membership from the DHT ------------------------------------------------

    async def _discover_loop(self) -> None:
        while True:
            try:
                await self.discover_once()
            except (SwarmdError, TimeoutError) as e:
                self.log.bind(event="discovery_failed", error=str(e)).warning("worker lookup failed: {}", e)
            await asyncio.sleep(self.config.dht_refresh)

    async def discover_once(self) -> int:
        """Look WORKERS up once and renew a DHT lease for every valid record; returns how many."""
        async with asyncio.timeout(max(self.config.dht_refresh, 5.0)):
            records = await self.swarm.lookup_all(WORKERS)
        return self.ingest_records(records)

    def ingest_records(self, records: Iterable[Any]) -> int:
        """Renew leases from PeerRecord-like objects (public_key, addresses, payload, seq).

        Bad records are counted and skipped. A record does not renew the lease
        of an ejected worker unless it is newer than the last one seen: a dead
        worker's leftover record must not keep it registered, so its lease
        runs out while a live worker (passing checks, or re-announcing) keeps
        its own.
        """
        n = 0
        for rec in records:
            try:
                ad = ad_from_record(
                    getattr(rec, "public_key", None),
                    getattr(rec, "addresses", None),
                    getattr(rec, "payload", None),
                )
            except SwarmdError as e:
                self.bad_records += 1
                if self.bad_records in (1, 10, 100) or self.bad_records % 1000 == 0:
                    self.log.bind(event="bad_worker_record", count=self.bad_records).warning(
                        "ignored a worker record: {}", e.message
                    )
                continue
            key = ad.public_key
            seq = getattr(rec, "seq", None)
            seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
            if seq is not None:
                newer = seq > self._seq.get(key, -1)
                dead = self._dead.get(key)
                if dead is not None and seq <= dead:
                    self.stale_records += 1
                    continue
                if not newer and self.balancer.health.is_ejected(key):
                    self.stale_records += 1
                    continue
                self._seq[key] = max(seq, self._seq.get(key, -1))
                self._dead.pop(key, None)
            try:
                self.balancer.admit(ad, source="dht", ttl=self.config.dht_lease_ttl)
            except SwarmdError as e:  # registry full
                self.log.bind(event="registry_full").warning("{}", e.message)
                break
            n += 1
        return n

    def _expired(self, public_key: str, was_ejected: bool) -> None:
        self.connections.drop(public_key)
        seq = self._seq.pop(public_key, None)
        if seq is not None and was_ejected:
            self._dead[public_key] = seq
            while len(self._dead) > self.config.max_workers:  # bounded: forget the oldest first
                self._dead.pop(next(iter(self._dead)))


def _unknown_model(err: SwarmdError, model: str | None) -> bool:
    """The registry's own "nobody serves this model" (not a worker's ERR_NOT_FOUND)."""
    return (
        model is not None
        and err.code == ERR_NOT_FOUND
        and isinstance(err.data, dict)
        and err.data.get("workers") == 0
    )
