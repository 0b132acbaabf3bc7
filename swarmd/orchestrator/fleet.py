"""Everything needed to route to workers from inside any process, in one object.

A Fleet is the registry (Balancer), the connections to workers, the Router,
the active health loop and — when given a swarm — the feed of the workers'
DHT records. The orchestrator role serves one over RPC; the gateway and the
client library hold their own and call workers directly with the same choice
and failover, with no orchestrator hop in the data path:

    fleet = Fleet(OrchestratorConfig(), identity, swarm=swarm)
    await fleet.start()
    result, worker = await fleet.route("runInference", {"model": "mlp", "inputs": {...}}, model="mlp")
    await fleet.stop()

Workers enter the registry at one place: ingest_records (the DHT) or the
balancer's admit (registerWorker). Workers known dead to others — published as
ejected by an orchestrator (its ORCHESTRATORS record), or whose live record
stopped being refreshed — are the balancer's suspects: every Router (gateway,
orchestrator, client, CLI) tries them only when nobody else is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from loguru import logger

from swarmd.errors import SwarmdError
from swarmd.node.identity import Identity
from swarmd.node.supervisor import LOG, Supervisor
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.connections import WorkerConnections
from swarmd.orchestrator.discovery import EJECTED_PREFIX, ad_from_record, ejection_verdicts, missed_refreshes
from swarmd.orchestrator.health import HealthRecord
from swarmd.orchestrator.monitor import HealthMonitor
from swarmd.orchestrator.registry import WorkerLease
from swarmd.orchestrator.router import Caller, Router
from swarmd.topics import ORCHESTRATORS, WORKERS, worker_model_topic

# lookup(topic, seconds) -> PeerRecord-like objects announcing topic
Lookup = Callable[[str, float], Awaitable[list[Any]]]
LOOK_AGAIN_EVERY = 1.0  # seconds: a request's fresh look at the DHT is shared by every request in that span
VERDICT_GRACE = 0.5  # seconds the orchestrators' verdicts may take beyond the workers' lookup


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
        lookup: Lookup | None = None,
    ) -> None:
        """`call(lease, method, params, seconds)` replaces how workers are called (both for
        requests and health checks); by default one RPC connection per worker
        (WorkerConnections). `lookup(topic, seconds)` replaces how worker records are found;
        by default the swarm's full lookup."""
        self.config = config or OrchestratorConfig()
        self.swarm = swarm
        self.identity = identity
        self.balancer = balancer or Balancer(self.config)
        self.records: dict[str, Any] = {}  # hex key -> the newest DHT record of each registered worker
        self.connections = WorkerConnections(
            identity, swarm=swarm, connect_timeout=self.config.connect_timeout, records=self.records
        )
        caller = call or self.connections.call
        if lookup is None and swarm is not None:
            lookup = self._swarm_lookup
        self.lookup = lookup
        self.router = Router(self.balancer, caller, refresh=self.look_again if lookup is not None else None)
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
        self._looked_again = -1e9  # monotonic time of the last look_again
        self.discovered_at = 0.0  # monotonic time of the last full WORKERS lookup (0: never)
        # worker key prefix -> orchestrators that published it as ejected (their last records)
        self.verdicts: dict[str, list[str]] = {}
        self._stale: dict[str, float] = {}  # worker -> seconds since its record was signed (missed refreshes)
        self.tasks: Supervisor | None = None  # the scope of the health and discovery loops, once started
        self.log = logger.bind(part="fleet")

    # -- lifecycle ------------------------------------------------------------

    async def start(self, supervisor: Any = None) -> None:
        """Start the health loop and (with a swarm) the DHT feed.

        With a supervisor (swarmd.node.supervisor.Supervisor) the loops run in
        a "fleet" scope of it, so a crash stops the node; alone, in a scope of
        their own whose crash is logged. stop() cancels and awaits them.
        """
        if self.tasks is None:
            self.tasks = supervisor.scope("fleet") if supervisor is not None else Supervisor(name="fleet", policy=LOG)
        if self.health_checks:
            self.tasks.spawn(self.monitor.run(), "fleet-health")
        if self.lookup is not None:
            self.tasks.spawn(self._discover_loop(), "fleet-discovery")

    async def stop(self) -> None:
        if self.tasks is not None:
            await self.tasks.close()
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
        """Call `method` on the best worker for (model, capability), failing over as configured
        (Router.route: the one loop; a model nobody is known to serve is looked up on the DHT
        once, then sent to any ONLINE worker, which loads it from a store)."""
        return await self.router.route(method, params, model=model, capability=capability, budget=budget)

    async def choose(
        self, model: str | None, capability: str | None = None, exclude: Collection[str] = ()
    ) -> WorkerLease:
        """The worker a request should go to (the caller does the call), with route()'s fallbacks."""
        return await self.router.choose(model, capability, exclude)

    async def look_again(self, model: str | None, seconds: float) -> bool:
        """One fresh look at the workers for a request that found nobody (left) to ask: WORKERS,
        and the model's own topic at most once per dht_refresh. Shared: at most one look per
        LOOK_AGAIN_EVERY seconds whatever the number of requests. True when records came in."""
        now = time.monotonic()
        if self.lookup is None or now - self._looked_again < LOOK_AGAIN_EVERY or seconds <= 0.0:
            return False
        self._looked_again = now
        topics = [WORKERS]
        if model is not None and not self._lookup_throttled(model, now):
            self._remember_lookup(model, now)
            topics.append(worker_model_topic(model))
        seconds = min(seconds, max(self.config.dht_refresh, 3.0))
        try:
            async with asyncio.timeout(seconds + 0.5):  # each lookup ends itself at `seconds`
                found = await asyncio.gather(*(self.lookup(t, seconds) for t in topics))
        except (SwarmdError, TimeoutError) as e:
            self.log.bind(event="lookup_failed", error=str(e)).info("worker lookup failed: {}", e)
            return False
        return self.ingest_records(r for records in found for r in records) > 0

    def _lookup_throttled(self, model: str, now: float) -> bool:
        last = self._model_lookups.get(model)
        return last is not None and now - last < self.config.dht_refresh

    def _remember_lookup(self, model: str, now: float) -> None:
        if len(self._model_lookups) >= 4096:  # bounded: forget old throttles rather than grow
            self._model_lookups.clear()
        self._model_lookups[model] = now

    async def _swarm_lookup(self, topic: str, seconds: float) -> list[Any]:
        return await self.swarm.lookup_all(topic, timeout=seconds)

    # -- membership from the DHT ------------------------------------------------

    async def _discover_loop(self) -> None:
        while True:
            try:
                await self.discover_once()
            except (SwarmdError, TimeoutError) as e:
                self.log.bind(event="discovery_failed", error=str(e)).warning("worker lookup failed: {}", e)
            await asyncio.sleep(self.config.dht_refresh)

    async def discover_once(self, seconds: float | None = None) -> int:
        """Look WORKERS up once and renew a DHT lease for every valid record; returns how many.

        The orchestrators' published ejections are looked up beside it, and waited for at
        most VERDICT_GRACE after the workers' lookup ended: they are advice, the workers'
        records are the membership, and a swarm with no orchestrator must not make every
        client's first request wait for a crawl that finds nothing. A verdict lookup that
        failed or came late keeps the verdicts we had."""
        assert self.lookup is not None, "a fleet with no swarm and no lookup discovers nothing"
        seconds = max(self.config.dht_refresh, 5.0) if seconds is None else seconds
        verdicts = asyncio.ensure_future(self.lookup(ORCHESTRATORS, seconds))
        try:
            async with asyncio.timeout(seconds + 1.0):  # the lookup ends itself at `seconds`; this bounds a stuck one
                records = await self.lookup(WORKERS, seconds)
            await asyncio.wait((verdicts,), timeout=VERDICT_GRACE)
        finally:
            if not verdicts.done():
                verdicts.cancel()
            await asyncio.gather(verdicts, return_exceptions=True)  # owned here: never left running
        self.discovered_at = time.monotonic()
        if not verdicts.cancelled():
            err = verdicts.exception()
            if err is None:
                self.ingest_verdicts(verdicts.result())
            elif not isinstance(err, (SwarmdError, TimeoutError)):
                raise err
        return self.ingest_records(records)

    def ingest_verdicts(self, records: Iterable[Any]) -> None:
        """Take the ejections every orchestrator publishes (its ORCHESTRATORS records, one
        lookup's worth: what is not listed any more was re-admitted)."""
        own = self.identity.public_key if self.identity is not None else None
        # our own verdicts are our health tracker's, live: the published copy lags behind it
        self.verdicts = ejection_verdicts(r for r in records if getattr(r, "public_key", None) != own)
        self._suspect()

    def _suspect(self) -> None:
        """The balancer's suspects from what the last lookups said, for registered workers."""
        suspects: dict[str, str] = {}
        registry = self.balancer.registry
        self._stale = {key: age for key, age in self._stale.items() if key in registry}  # bounded by it
        for key, age in self._stale.items():
            suspects[key] = f"record not refreshed for {age:.0f}s"
        if self.verdicts:
            for lease in self.balancer.registry:
                by = self.verdicts.get(lease.public_key[:EJECTED_PREFIX])
                if by:
                    suspects[lease.public_key] = "ejected by orchestrator " + ", ".join(by)
        for key in suspects.keys() - self.balancer.suspects.keys():
            self.log.bind(event="worker_suspect", worker=key[:16], why=suspects[key]).info(
                "worker {} avoided while others remain: {}", key[:16], suspects[key]
            )
        self.balancer.suspects = suspects

    def health_view(self) -> dict[str, dict[str, Any]]:
        """{worker key: its health record with "ejected", and "suspect" (why it is avoided,
        or None)} for every worker this fleet judged or suspects: what dashboards show."""
        view = self.balancer.health.snapshot()
        for key in view:
            view[key]["suspect"] = None
        for key, why in self.balancer.suspects.items():
            view.setdefault(key, {**HealthRecord().to_dict(), "ejected": False})["suspect"] = why
        return view

    def ingest_records(self, records: Iterable[Any]) -> int:
        """Renew leases from PeerRecord-like objects (public_key, addresses, payload, seq).

        Bad records are counted and skipped. A record does not renew the lease
        of an ejected worker unless it is newer than the last one seen: a dead
        worker's leftover record must not keep it registered, so its lease
        runs out while a live worker (passing checks, or re-announcing) keeps
        its own.
        """
        n = 0
        now = self.balancer.wall()
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
            self.records[key] = rec
            if missed_refreshes(rec, now, self.config.stale_after):
                self._stale[key] = now - rec.seq / 1000.0
            else:
                self._stale.pop(key, None)
            n += 1
        if n:
            self._suspect()
        return n

    def _expired(self, public_key: str, was_ejected: bool) -> None:
        self.connections.drop(public_key)
        self.records.pop(public_key, None)
        self._stale.pop(public_key, None)
        seq = self._seq.pop(public_key, None)
        if seq is not None and was_ejected:
            self._dead[public_key] = seq
            while len(self._dead) > self.config.max_workers:  # bounded: forget the oldest first
                self._dead.pop(next(iter(self._dead)))

