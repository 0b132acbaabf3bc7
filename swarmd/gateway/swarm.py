"""SwarmBackend: inference and models served by the swarm's roles over RPC.

Data path: the gateway holds a Fleet (swarmd.orchestrator.fleet: registry fed
by the workers' DHT records, health checks, latency-aware choice, failover)
and its Router calls the chosen worker's `runInference` directly: one hop,
one failover loop. A co-located worker is reached the same way through the
swarm (our own key gives an in-process peer). The gateway.route modes
"direct" (findAvailableWorker on an orchestrator, then the worker) and
"orchestrator" (routeInferenceRequest) are gone: each was slower than this
one (docs/gateway.md).

Metadata comes from the stores (`listModels {name}`) and is cached for
gateway.metadata_ttl seconds, so a metadata lookup does not sit on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from loguru import logger

from swarmd.errors import ERR_NOT_FOUND, ERR_NOT_READY, ERR_UNAVAILABLE, SwarmdError, retryable
from swarmd.gateway.backend import InferResult, UploadedModel, not_found
from swarmd.gateway.config import GatewayConfig
from swarmd.names import ModelMeta, check_record
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.fleet import Fleet
from swarmd.topics import GATEWAYS, STORES, WORKERS
from swarmd.versions import version_key


class SwarmBackend:
    def __init__(self, ctx: Any, config: GatewayConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.fleet: Fleet | None = None
        self.stores: list[bytes] = []  # from the last discovery pass; the one that answered last first
        self.discovered_at = 0.0  # monotonic time of the last STORES pass (0 before the first)
        self._meta: dict[str, tuple[float, list[ModelMeta]]] = {}
        self.tasks: Any = None  # our scope of the node's Supervisor: discovery, and the fleet's loops
        self._refreshed = asyncio.Event()
        self.log = logger.bind(role="gateway", part="swarm_backend")

    @property
    def swarm(self) -> Any:
        return self.ctx.swarm

    # -- lifecycle and discovery ---------------------------------------------------

    async def start(self) -> None:
        if self.swarm is None:
            self.log.bind(event="no_swarm").warning("no swarm in this node: the gateway can only report 503")
            return
        cfg = getattr(self.ctx.settings, "orchestrator", None) or OrchestratorConfig()
        self.tasks = self.ctx.tasks.scope("gateway-backend")
        self.fleet = Fleet(cfg, self.ctx.identity, swarm=self.swarm)
        await self.fleet.start(self.tasks)
        self.tasks.spawn(self._discover_loop(), name="gateway-discovery")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._refreshed.wait()

    async def stop(self) -> None:
        if self.tasks is not None:
            await self.tasks.close()
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None
        if self.swarm is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.swarm.leave(GATEWAYS)

    async def _discover_loop(self) -> None:
        announced = False
        while True:
            try:
                if not announced:
                    await self.swarm.join(GATEWAYS, announce=True, lookup=False,
                                          payload={"http": self.ctx.ports.get("http")})
                    announced = True
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # discovery is retried; a bad pass must not stop the gateway
                self.log.bind(event="discovery_failed").warning("peer discovery failed: {!r}", e)
            self._refreshed.set()
            await asyncio.sleep(self.config.discovery_interval)

    async def refresh(self) -> None:
        """One discovery pass over the stores (the fleet's own loop looks the workers up)."""
        stores = await self.swarm.lookup_all(STORES, timeout=self.config.discovery_timeout)
        found = [r.public_key for r in stores]
        own = self.ctx.identity.public_key
        if self.ctx.role("store") is not None and own not in found:
            found.insert(0, own)
        self.stores = found
        self.discovered_at = time.monotonic()

    # -- calls -----------------------------------------------------------------

    async def _store_call(self, method: str, params: dict[str, Any]) -> Any:
        """Call one of the stores, the last one that answered first; move on when one fails in a
        way another may not (errors.retryable)."""
        stores = list(self.stores)
        if not stores:
            raise SwarmdError(ERR_UNAVAILABLE, f"no store found to answer {method}")
        last: SwarmdError | None = None
        for pk in stores:
            try:
                ans = await self.swarm.request(pk, method, params, timeout=self.config.discovery_timeout * 3)
            except SwarmdError as e:
                if not retryable(e) or e.code == ERR_NOT_FOUND:
                    raise
                last = e
                continue
            if pk != self.stores[0] and pk in self.stores:  # sticky: ask this one first next time
                self.stores.remove(pk)
                self.stores.insert(0, pk)
            return ans
        assert last is not None
        raise last

    # -- InferenceBackend -----------------------------------------------------------

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, Any],
        outputs: list[str] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        if self.fleet is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        params: dict[str, Any] = {"model": model, "inputs": inputs}
        if version is not None:
            params["version"] = version
        if outputs is not None:
            params["outputs"] = outputs
        if request_id is not None:
            params["request_id"] = request_id
        res, lease = await self.fleet.route("runInference", params, model=model, budget=self.config.infer_timeout)
        return InferResult.from_wire(res, model, lease.public_key)

    async def _versions(self, model: str) -> list[ModelMeta]:
        now = time.monotonic()
        hit = self._meta.get(model)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.swarm is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        ans = await self._store_call("listModels", {"name": model})
        rows = ans.get("models") if isinstance(ans, dict) else None
        if not isinstance(rows, list):
            raise SwarmdError("ERR_PROTOCOL", "listModels answered without a models list")
        infos = self._infos(rows, model)
        if len(self._meta) > 10_000:
            self._meta.clear()
        self._meta[model] = (now + self.config.metadata_ttl, infos)
        return infos

    @staticmethod
    def _infos(rows: list[Any], model: str | None) -> list[ModelMeta]:
        out = []
        for r in rows:
            try:
                info = check_record(r)
            except (KeyError, TypeError, ValueError, SwarmdError):  # not a model record: skipped
                continue
            if model is None or info.name == model:
                out.append(info)
        out.sort(key=lambda i: version_key(i.version))
        versions = [i.version for i in out]
        for i in out:
            i.versions = [v for v in versions]
        return out

    async def model_metadata(self, model: str, version: str | None = None) -> ModelMeta:
        infos = await self._versions(model)
        if not infos:
            raise not_found(model, None)
        if version is None or version == "latest":
            return infos[-1]
        for i in infos:
            if i.version == version:
                return i
        raise not_found(model, version)

    async def list_models(self) -> list[ModelMeta]:
        if self.swarm is None:
            return []
        ans = await self._store_call("listModels", {})
        rows = ans.get("models") if isinstance(ans, dict) else []
        latest: dict[str, ModelMeta] = {}
        by_name: dict[str, list[str]] = {}
        for info in self._infos(rows if isinstance(rows, list) else [], None):
            latest[info.name] = info
            by_name.setdefault(info.name, []).append(info.version)
        for name, info in latest.items():
            info.versions = by_name[name]
        return [latest[n] for n in sorted(latest)]

    async def ready(self, model: str, version: str | None = None) -> bool:
        if self.fleet is None:
            return False
        # a model no worker has loaded yet is ready if any worker can fetch it
        return bool(self.fleet.balancer.candidates(model) or self.fleet.balancer.candidates(None))

    async def put_model(self, upload: UploadedModel) -> ModelMeta:
        if self.swarm is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        from swarmd.store.transfer import push_file

        if not self.stores:
            raise SwarmdError(ERR_UNAVAILABLE, "no store is reachable to take the model")
        pk = self.stores[0]
        peer = await self.swarm.connect(pk)  # our own key: the local peer, streams in-process
        meta = await push_file(peer, upload.path, upload.name, upload.version, tags=upload.tags,
                               description=upload.description or None)
        if not isinstance(meta, dict) or meta.get("digest") != upload.sha256:
            raise SwarmdError("ERR_CORRUPT", "the store recorded another digest than the gateway received")
        self._meta.pop(upload.name, None)
        return check_record(meta)

    def status(self) -> dict[str, Any]:
        fleet = self.fleet
        now = fleet.balancer.clock() if fleet is not None else 0.0
        return {
            "backend": "swarm",
            "stores": [k.hex() for k in self.stores],
            "workers": {lease.public_key: lease.to_dict(now) for lease in fleet.balancer.registry}
            if fleet is not None else {},
            "discovered_ago": round(time.monotonic() - self.discovered_at, 3) if self.discovered_at else None,
        }

    async def model_statistics(self, model: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton-shaped statistics summed over the workers that serve `model` (every worker
        when None), each asked getModelStatistics; a worker that does not answer is left out."""
        from swarmd.topics import worker_model_topic
        from swarmd.worker.stats import merge_statistics

        topic = worker_model_topic(model) if model else WORKERS
        recs = await self.swarm.lookup_all(topic, self.config.discovery_timeout)

        async def ask(pk: bytes) -> list[Any]:
            try:
                doc = await self.swarm.request(pk, "getModelStatistics", {"model": model, "version": version},
                                               self.config.discovery_timeout)
            except (SwarmdError, OSError, TimeoutError):
                return []
            return doc.get("model_stats", []) if isinstance(doc, dict) else []

        parts = await asyncio.gather(*(ask(r.public_key) for r in recs[:256]))
        return merge_statistics([d for p in parts for d in p if isinstance(p, list)])

    # -- the model repository (Triton's index/load/unload): the stores' catalog, the workers' memory --

    async def repository_index(self) -> list[dict[str, str]]:
        """The catalog: every version some store holds. Each is READY: a worker that has not
        loaded it fetches it from a store on its first request."""
        return [{"name": info.name, "version": v, "state": "READY", "reason": ""}
                for info in await self.list_models() for v in info.versions or [info.version]]

    async def _fan_out(self, method: str, params: dict[str, Any]) -> dict[str, tuple[Any, SwarmdError | None]]:
        """Call `method` on every routable worker at once, each within gateway.model_control_timeout:
        worker key -> (answer, error)."""
        if self.fleet is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        leases = self.fleet.balancer.candidates(None)
        if not leases:
            raise SwarmdError(ERR_UNAVAILABLE, f"no worker is known to {method} {params.get('model')!r} on; retry shortly")
        call, seconds = self.fleet.router.call, self.config.model_control_timeout

        async def one(lease: Any) -> tuple[Any, SwarmdError | None]:
            try:
                return await call(lease, method, params, seconds), None
            except SwarmdError as e:
                return None, e

        answers = await asyncio.gather(*(one(lease) for lease in leases))
        return {lease.public_key: a for lease, a in zip(leases, answers, strict=True)}

    async def load_model(self, model: str) -> dict[str, Any]:
        """Every routable worker fetches the model's newest version from the stores (verified
        against the catalog's digest, trusted stores only) and keeps it loaded (pinned, never
        evicted as idle) until it is unloaded. Succeeds when at least one worker loaded it."""
        info = await self.model_metadata(model, None)  # ERR_NOT_FOUND when no store holds it
        got = await self._fan_out("loadModel", {"model": info.name, "version": info.version})
        loaded = [k for k, (_, e) in got.items() if e is None]
        if not loaded:
            first = next(e for _, e in got.values() if e is not None)
            raise SwarmdError(first.code, f"no worker loaded {model!r}: {first.message}", first.data)
        assert self.fleet is not None
        for key in loaded:
            self.fleet.balancer.registry.add_model(key, info.name)  # route to them at once
        return {"model": info.name, "version": info.version,
                "workers": {k: "READY" if e is None else f"{e.code}: {e.message}" for k, (_, e) in got.items()}}

    async def unload_model(self, model: str) -> dict[str, Any]:
        """Every routable worker drops the model from memory (its accepted requests finish
        first). The model stays in the stores: a later request loads it again on a worker."""
        await self.model_metadata(model, None)  # ERR_NOT_FOUND when no store holds it
        got = await self._fan_out("unloadModel", {"model": model})
        failed = [e for _, e in got.values() if e is not None and e.code != ERR_NOT_FOUND]
        if failed and len(failed) == len(got):
            raise SwarmdError(failed[0].code, f"no worker unloaded {model!r}: {failed[0].message}", failed[0].data)
        return {"model": model, "workers": {
            k: ("UNLOADED" if e is None else "NOT_LOADED" if e.code == ERR_NOT_FOUND else f"{e.code}: {e.message}")
            for k, (_, e) in got.items()}}

    def worker_health(self) -> dict[str, dict[str, Any]]:
        """What this gateway's router knows of each worker (ejected, failures, suspected dead
        by others): the dashboard's view."""
        return self.fleet.health_view() if self.fleet is not None else {}

    def worker_count(self) -> int:
        return len(self.fleet.balancer.candidates(None)) if self.fleet is not None else 0


__all__ = ["SwarmBackend"]
