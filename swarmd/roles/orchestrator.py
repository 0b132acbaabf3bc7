"""The orchestrator role: the decision core of swarmd.orchestrator served over RPC.

Registers the seed's seven methods, keeps the registry filled from
registerWorker calls and (when the node runs a swarm) from the workers' DHT
records, health-checks every worker on an interval, and announces itself on
ORCHESTRATORS so gateways find it. Several orchestrators may run at once: each
builds its own view from the DHT and shares nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from loguru import logger

from swarmd.errors import ERR_BAD_REQUEST, ERR_FORBIDDEN, SwarmdError
from swarmd.node.identity import parse_public_key
from swarmd.node.trust import Trust
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.discovery import (
    EJECTED_PREFIX,
    MAX_EJECTED_LISTED,
    parse_names,
    parse_register,
)
from swarmd.orchestrator.fleet import Fleet
from swarmd.orchestrator.registry import DRAINING, JOINING, ONLINE
from swarmd.roles.base import NodeContext, Role
from swarmd.rpc.params import as_params
from swarmd.topics import ORCHESTRATORS

DEADLINE_MARGIN = 0.05  # answer a routed call this long before the caller stops waiting
MAX_PAGE = 500  # workers listed per status answer: bounded however large the fleet
VERDICT_POLL = 0.5  # seconds: an ejection or re-admission is published this soon, not at announce_interval


def _page(params: Any) -> tuple[int, int]:
    """(limit, offset) from optional params; out-of-range values are clamped, not refused."""
    limit, offset = MAX_PAGE, 0
    if isinstance(params, dict):
        lim, off = params.get("limit"), params.get("offset")
        if isinstance(lim, int) and not isinstance(lim, bool):
            limit = min(max(lim, 0), MAX_PAGE)
        if isinstance(off, int) and not isinstance(off, bool):
            offset = max(off, 0)
    return limit, offset


class OrchestratorRole(Role):
    name = "orchestrator"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        cfg: OrchestratorConfig = getattr(ctx.settings, "orchestrator", None) or OrchestratorConfig()
        self.config = cfg
        self.fleet = Fleet(cfg, ctx.identity, swarm=ctx.swarm)
        self.balancer = self.fleet.balancer
        self.connections = self.fleet.connections
        self.router = self.fleet.router
        self.monitor = self.fleet.monitor
        self.started_at = time.time()
        self.log = logger.bind(role="orchestrator")
        self._announced = False
        self._payload: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        methods = self.ctx.methods
        if methods is not None:
            methods.register("registerWorker", self.register_worker, op="w", roles=("worker",))
            methods.register("unregisterWorker", self.unregister_worker, op="w", roles=("worker",))
            methods.register("findAvailableWorker", self.find_available_worker, op="r")
            methods.register("routeInferenceRequest", self.route_inference_request, op="r")
            methods.register("getServiceStatus", self.get_service_status, op="r")
            methods.register("getLoadBalancingStats", self.get_load_balancing_stats, op="r")
            methods.register("healthCheck", self.health_check, op="r")
        await self.fleet.start(self.tasks)
        swarm = self.ctx.swarm
        if swarm is not None:
            self._payload = self._announcement()
            await swarm.join(ORCHESTRATORS, announce=True, lookup=False, payload=self._payload, live=True)
            self._announced = True
            self.tasks.spawn(self._announce_loop(), name="orchestrator-announce")
        self.log.bind(event="orchestrator_started", policy=self.balancer.policy.name).info(
            "orchestrator serving"
        )

    async def stop(self) -> None:
        await self.close_tasks()  # the announce loop, and the fleet's health and discovery loops
        if self._announced and self.ctx.swarm is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.ctx.swarm.leave(ORCHESTRATORS)
            self._announced = False
        await self.fleet.stop()

    def status(self) -> dict[str, Any]:
        counts = self._counts()
        return {"policy": self.balancer.policy.name, **counts}

    # -- DHT ------------------------------------------------------------------

    def _announcement(self) -> dict[str, Any]:
        """What gateways see of us on ORCHESTRATORS: enough to prefer one that knows workers."""
        counts = self._counts()
        return {
            "policy": self.balancer.policy.name,
            "workers": counts["routable"],
            "models": len(self.balancer.registry.models()),
            # workers we ejected (key prefixes, bounded to fit a record): `swarmd status` and a
            # lookup of this topic show them, while the worker's own record may live on a while
            "ejected": sorted(k[:EJECTED_PREFIX] for k in self.balancer.health.ejected)[:MAX_EJECTED_LISTED],
        }

    async def _announce_loop(self) -> None:
        """Publish a change of our ejection verdicts within VERDICT_POLL (a worker's own record
        outlives its death by up to the live-record TTL: a verdict that waited for
        announce_interval would come after the record is gone and help nobody); other changes
        (counts) at most every announce_interval. Each publication is one DHT write."""
        published = time.monotonic()
        while True:
            await asyncio.sleep(VERDICT_POLL)
            payload = self._announcement()
            if payload == self._payload:
                continue
            verdict = payload["ejected"] != self._payload.get("ejected")
            if not verdict and time.monotonic() - published < self.config.announce_interval:
                continue
            try:
                async with asyncio.timeout(5.0):
                    await self.ctx.swarm.update(ORCHESTRATORS, payload)
                self._payload = payload
                published = time.monotonic()
                if verdict:
                    self.log.bind(event="verdicts_published", ejected=payload["ejected"]).info(
                        "published ejections: {}", ", ".join(payload["ejected"]) or "none"
                    )
            except (SwarmdError, TimeoutError) as e:
                self.log.bind(event="announce_failed").warning("updating ORCHESTRATORS failed: {}", e)

    # -- RPC methods ----------------------------------------------------------

    def _trust(self) -> Trust:
        return self.ctx.trust or Trust.open_swarm(self.ctx.identity.public_key)

    def _caller_speaks_for(self, ctx: Any, key_hex: str, method: str) -> Trust:
        """A worker's entry is changed by that worker's own connection key (or this
        node, or an operator), never by whoever names its key in a field."""
        trust = self._trust()
        caller = getattr(ctx, "peer", None)
        if caller is not None and not trust.speaks_for(caller, bytes.fromhex(key_hex)):
            raise SwarmdError(
                ERR_FORBIDDEN,
                f"{method}: peer {caller.hex()[:16]}… may only act on its own key, not {key_hex[:16]}…",
            )
        return trust

    async def register_worker(self, ctx: Any, params: Any) -> dict[str, Any]:
        ad, ttl = parse_register(params)
        trust = self._caller_speaks_for(ctx, ad.public_key, "registerWorker")
        caller = getattr(ctx, "peer", None)
        if caller is not None and not trust.is_operator(caller):
            ad.weight = 1.0  # a worker never sets its own routing weight; operators may
        if not ad.addresses and self.ctx.swarm is None:
            raise SwarmdError(
                ERR_BAD_REQUEST,
                "host and port are required: this orchestrator has no swarm to find workers by key",
            )
        lease = self.balancer.admit(ad, source="rpc", ttl=ttl)
        self.log.bind(event="worker_registered", worker=ad.public_key[:16], models=ad.models).info(
            "worker {} registered for {}", ad.public_key[:16], ", ".join(ad.models) or "no models"
        )
        return {
            "public_key": ad.public_key,
            "expires_in": round(lease.expires_at - self.balancer.clock(), 3),
            "lease_ttl": ttl if ttl is not None else self.config.lease_ttl,
        }

    async def unregister_worker(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = as_params(params, "unregisterWorker", required=("public_key",))
        key = parse_public_key(p["public_key"], "public_key").hex()
        self._caller_speaks_for(ctx, key, "unregisterWorker")
        removed = self.balancer.unregister(key)
        self.connections.drop(key)
        if removed:
            self.log.bind(event="worker_unregistered", worker=key[:16]).info(
                "worker {} unregistered", key[:16]
            )
        return {"public_key": key, "removed": removed}

    async def find_available_worker(self, ctx: Any, params: Any) -> dict[str, Any]:
        model, capability = self._target(params, "findAvailableWorker", need_model=False)
        exclude = [parse_public_key(k, "exclude[]").hex() for k in parse_names(params.get("exclude"), "exclude")]
        lease = await self.fleet.choose(model, capability, exclude=exclude)
        alternates = [
            {"public_key": other.public_key, "addresses": [list(a) for a in other.addresses]}
            for other in self.balancer.candidates(model, capability, exclude=[*exclude, lease.public_key])
            if other.public_key != lease.public_key
        ][:3]
        return {
            "public_key": lease.public_key,
            "addresses": [list(a) for a in lease.addresses],
            "policy": self.balancer.policy.name,
            "alternates": alternates,
        }

    async def route_inference_request(self, ctx: Any, params: Any) -> dict[str, Any]:
        model, _ = self._target(params, "routeInferenceRequest", need_model=True)
        capability = params.get("capability") if isinstance(params.get("capability"), str) else None
        left = ctx.time_left() if ctx is not None and hasattr(ctx, "time_left") else None
        budget = None if left is None else max(0.001, left - DEADLINE_MARGIN)
        forward = {k: v for k, v in params.items() if k != "capability"}
        result, lease = await self.fleet.route(
            "runInference", forward, model=model, capability=capability, budget=budget
        )
        if isinstance(result, dict):
            return {**result, "worker": lease.public_key}
        return {"result": result, "worker": lease.public_key}

    async def get_service_status(self, ctx: Any, params: Any) -> dict[str, Any]:
        """Counts, models and a page of workers ({"limit": n, "offset": n}; at most MAX_PAGE per answer)."""
        limit, offset = _page(params)
        b = self.balancer
        now = b.clock()
        live = sorted(
            (lease for lease in b.registry if lease.expires_at > now), key=lambda lease: lease.public_key
        )
        workers = [b.worker_view(lease) for lease in live[offset : offset + limit]]
        models: dict[str, dict[str, int]] = {}
        for name in b.registry.models():
            models[name] = {
                "workers": len(b.registry.matching(name)),
                "routable": len(b.candidates(name)),
            }
        return {
            "role": "orchestrator",
            "public_key": self.ctx.identity.public_hex,
            "policy": b.policy.name,
            "uptime": round(time.time() - self.started_at, 3),
            "counts": self._counts(),
            "models": models,
            "workers": workers,
            "workers_total": len(live),
            "health_rounds": self.monitor.rounds,
        }

    async def get_load_balancing_stats(self, ctx: Any, params: Any) -> dict[str, Any]:
        return self.balancer.load_stats()

    async def health_check(self, ctx: Any, params: Any) -> dict[str, Any]:
        """This orchestrator's health; {"refresh": true} checks every worker now instead of reporting the last round."""
        if isinstance(params, dict) and params.get("refresh") is True:
            await self.monitor.tick_shared()
        limit, offset = _page(params)
        counts = self._counts()
        status = "ok" if counts["routable"] else ("degraded" if counts["total"] else "idle")
        b = self.balancer
        leases = sorted(b.registry, key=lambda lease: lease.public_key)[offset : offset + limit]
        return {
            "status": status,
            **counts,
            "workers": {lease.public_key: b.health.record(lease.public_key).to_dict() for lease in leases},
        }

    # -- helpers --------------------------------------------------------------

    def _target(self, params: Any, method: str, *, need_model: bool) -> tuple[str | None, str | None]:
        params = as_params(params, method)
        model = params.get("model")
        capability = params.get("capability")
        if model is not None and (not isinstance(model, str) or not model):
            raise SwarmdError(ERR_BAD_REQUEST, f"model must be a non-empty string, got {model!r:.80}")
        if capability is not None and (not isinstance(capability, str) or not capability):
            raise SwarmdError(
                ERR_BAD_REQUEST, f"capability must be a non-empty string, got {capability!r:.80}"
            )
        if model is None and (need_model or capability is None):
            raise SwarmdError(
                ERR_BAD_REQUEST, f"{method} needs a model name" + ("" if need_model else " or a capability")
            )
        return model, capability

    def _counts(self) -> dict[str, int]:
        b = self.balancer
        now = b.clock()
        live = [lease for lease in b.registry if lease.expires_at > now]
        ejected = sum(1 for lease in live if b.health.is_ejected(lease.public_key))
        return {
            "total": len(live),
            "online": sum(1 for lease in live if lease.state == ONLINE),
            "joining": sum(1 for lease in live if lease.state == JOINING),
            "draining": sum(1 for lease in live if lease.state == DRAINING),
            "ejected": ejected,
            "routable": sum(
                1 for lease in live if lease.state == ONLINE and not b.health.is_ejected(lease.public_key)
            ),
        }


ROLE = OrchestratorRole
