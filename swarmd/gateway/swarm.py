"""SwarmBackend: inference and models served by the swarm's roles over RPC.

Data path, by gateway.route (each measured in docs/gateway.md):
- "fleet" (default): the gateway embeds the orchestrator's Fleet (registry fed
  by the workers' DHT records, health checks, latency-aware choice, failover)
  and calls the chosen worker's `runInference` directly: one hop.
- "direct": ask an orchestrator `findAvailableWorker {model}`, then call the
  worker's `runInference`; a worker-side failure (closed, timeout, overloaded,
  not ready) is retried on another worker within the request's budget.
- "orchestrator": send `routeInferenceRequest` to an orchestrator, which
  chooses, calls and retries (two hops).
With no orchestrator reachable "direct" still serves: it picks the least-loaded
ONLINE worker from the workers' own topic records.

Metadata comes from the stores (`listModels {name}`) and is cached for
gateway.metadata_ttl seconds, so a metadata lookup does not sit on the hot path.
A co-located role is reached through swarm.request with our own key, which
the swarm dispatches in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
from loguru import logger

from swarmd.errors import (
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.gateway.backend import InferResult, ModelInfo, UploadedModel, not_found, version_key
from swarmd.gateway.config import GatewayConfig
from swarmd.node.deadline import within
from swarmd.orchestrator.remote import RemoteRouter, SwarmView
from swarmd.rpc import CallContext
from swarmd.topics import GATEWAYS, ORCHESTRATORS, STORES, WORKERS


def _hex(pk: bytes) -> str:
    return pk.hex()


class SwarmBackend:
    def __init__(self, ctx: Any, config: GatewayConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.router = RemoteRouter(self._request)
        self._meta: dict[str, tuple[float, list[ModelInfo]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._refreshed = asyncio.Event()
        self.fleet: Any = None  # swarmd.orchestrator.fleet.Fleet when route == "fleet"
        self._last_rescue = -1e9  # monotonic time of the last WORKERS lookup made because all known failed
        self._own_pk: bytes = ctx.identity.public_key
        self._own_hex = self._own_pk.hex()
        self.log = logger.bind(role="gateway", part="swarm_backend")

    @property
    def swarm(self) -> Any:
        return self.ctx.swarm

    def _own(self, role: str) -> bytes | None:
        return self.ctx.identity.public_key if self.ctx.role(role) is not None else None

    # -- lifecycle and discovery ---------------------------------------------------

    async def start(self) -> None:
        if self.swarm is None:
            self.log.bind(event="no_swarm").warning("no swarm in this node: the gateway can only report 503")
            return
        self._loop_task = self.ctx.tasks.spawn(self._discover_loop(), name="gateway-discovery")
        if self.config.route == "fleet":
            from swarmd.orchestrator.config import OrchestratorConfig
            from swarmd.orchestrator.fleet import Fleet

            cfg = getattr(self.ctx.settings, "orchestrator", None) or OrchestratorConfig()
            self.fleet = Fleet(cfg, self.ctx.identity, swarm=self.swarm)
            # Calls go through the swarm: pooled connections, and in-process dispatch for a co-located worker.
            self.fleet.router.call = self._fleet_call
            self.fleet.monitor.call = self._fleet_call
            await self.fleet.start(self.ctx.tasks)
        with contextlib.suppress(TimeoutError):
            await within(self._refreshed.wait(), 5.0)

    async def _fleet_call(self, lease: Any, method: str, params: Any, seconds: float) -> Any:
        if lease.public_key == self._own_hex and asyncio.current_task() is not None:
            m = self.swarm.methods.get(method)
            if m is not None and not m.stream:
                return await self._call_own(m, method, params, seconds)
        return await self.swarm.request(bytes.fromhex(lease.public_key), method, params, timeout=seconds)

    async def _call_own(self, m: Any, method: str, params: Any, seconds: float) -> Any:
        """A co-located worker's handler, awaited in this request's own Task under asyncio.timeout.

        swarm.request does the same for our own key through asyncio.wait_for, which wraps
        the handler in a second Task: one more loop turn to start it and one to collect it,
        on every request of the `make run` layout. The handler sees the same CallContext.
        """
        ctx = CallContext(self._own_pk, method, 0, asyncio.get_running_loop().time() + seconds, None)
        try:
            async with asyncio.timeout(seconds):
                return await m.handler(ctx, params)
        except TimeoutError:
            raise SwarmdError(ERR_TIMEOUT, f"{method!r} did not answer within {seconds:g} s") from None

    async def stop(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)  # never swallows a cancel of stop()
            self._loop_task = None
        if self.swarm is not None:
            with contextlib.suppress(Exception):
                await within(self.swarm.leave(GATEWAYS), 2.0)

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
        """One discovery pass over the role topics."""
        t = self.config.discovery_timeout
        orchs, stores, workers = await asyncio.gather(
            self.swarm.lookup_all(ORCHESTRATORS, timeout=t),
            self.swarm.lookup_all(STORES, timeout=t),
            self.swarm.lookup_all(WORKERS, timeout=t),
        )
        p = SwarmView(at=time.monotonic())
        own = self.ctx.identity.public_key
        p.orchestrators = [r.public_key for r in orchs]
        p.stores = [r.public_key for r in stores]
        for role, lst in (("orchestrator", p.orchestrators), ("store", p.stores)):
            if self.ctx.role(role) is not None and own not in lst:
                lst.insert(0, own)
        for r in workers:
            payload = r.payload if isinstance(r.payload, dict) else {}
            if payload.get("state", "ONLINE") == "ONLINE":
                p.workers[r.public_key] = payload
        if self.ctx.role("worker") is not None and own not in p.workers:
            p.workers[own] = {"state": "ONLINE"}
        self.router.view = p

    @property
    def peers(self) -> SwarmView:
        """What the last discovery pass saw (held by the router, which routes on it)."""
        return self.router.view

    # -- calls -----------------------------------------------------------------

    async def _request(self, pk: bytes, method: str, params: dict[str, Any], timeout: float) -> Any:  # noqa: ASYNC109
        return await self.swarm.request(pk, method, params, timeout=timeout)

    async def _call_any(self, candidates: list[bytes], method: str, params: dict[str, Any]) -> Any:
        return await self.router.call_any(candidates, method, params)

    async def _choose(self, model: str, exclude: set[bytes]) -> bytes:
        return await self.router.choose(model, exclude)

    # -- InferenceBackend -----------------------------------------------------------

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        if self.swarm is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        params: dict[str, Any] = {"model": model, "inputs": inputs}
        if version is not None:
            params["version"] = version
        if outputs is not None:
            params["outputs"] = outputs
        if request_id is not None:
            params["request_id"] = request_id
        deadline = time.monotonic() + self.config.infer_timeout
        if self.fleet is not None:
            b = self.fleet.balancer
            try:
                res, lease = await self.fleet.route("runInference", params, model=model,
                                                    budget=self.config.infer_timeout)
            except SwarmdError as e:
                if e.code not in (ERR_NOT_FOUND, ERR_UNAVAILABLE):
                    raise
                others = b.candidates(None)
                if e.code == ERR_UNAVAILABLE and len(others) <= len(b.candidates(model)):
                    # Every worker we know of that could take it has failed. Our list is as old as
                    # the last WORKERS lookup (dht_refresh): a worker that announced since then can
                    # take it, so look once more before giving up (at most once a second).
                    await self._rescue_lookup(deadline)
                    others = b.candidates(None)
                if not others:
                    if e.code == ERR_NOT_FOUND:
                        raise SwarmdError(ERR_UNAVAILABLE, "no worker is available yet; retry shortly") from None
                    raise
                if e.code == ERR_UNAVAILABLE and len(others) <= len(b.candidates(model)):
                    raise  # every worker that could take it has failed
                # Nobody serves it yet, or everyone who did has failed: any other worker fetches
                # the model from a store on its first request.
                res, lease = await self.fleet.route("runInference", params, model=None,
                                                    budget=max(0.1, deadline - time.monotonic()))
            return self._result(res, model, bytes.fromhex(lease.public_key))
        if self.config.route == "orchestrator":
            try:
                res = await self._call_any(self.peers.orchestrators, "routeInferenceRequest", params)
                return self._result(res, model)
            except SwarmdError as e:
                if e.code != ERR_NOT_FOUND or not self.peers.workers:
                    raise
                # no worker has loaded the model yet: the direct path below lets one fetch it
        res, pk = await self.router.infer(params, max(deadline - time.monotonic(), 0.0))
        return self._result(res, model, pk)

    async def _rescue_lookup(self, deadline: float) -> None:
        """One WORKERS lookup within the request's deadline, at most once a second across requests."""
        now = time.monotonic()
        if now - self._last_rescue < 1.0 or deadline - now <= 0.0:
            return
        self._last_rescue = now
        try:
            async with asyncio.timeout(deadline - now):
                await self.fleet.discover_once()
        except (SwarmdError, TimeoutError) as e:
            self.log.bind(event="rescue_lookup_failed", error=str(e)).info("worker lookup failed: {}", e)

    @staticmethod
    def _result(res: Any, model: str, pk: bytes | None = None) -> InferResult:
        if not isinstance(res, dict) or not isinstance(res.get("outputs"), dict):
            raise SwarmdError("ERR_PROTOCOL", "runInference answered without an outputs map")
        worker = res.get("worker")
        return InferResult(
            model=str(res.get("model", model)),
            version=str(res.get("version", "")),
            outputs={str(k): np.asarray(v) for k, v in res["outputs"].items()},
            worker=worker if isinstance(worker, str) else (pk.hex() if pk else None),
        )

    async def _versions(self, model: str) -> list[ModelInfo]:
        now = time.monotonic()
        hit = self._meta.get(model)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.swarm is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        ans = await self._call_any(self.peers.stores, "listModels", {"name": model})
        rows = ans.get("models") if isinstance(ans, dict) else None
        if not isinstance(rows, list):
            raise SwarmdError("ERR_PROTOCOL", "listModels answered without a models list")
        infos = self._infos(rows, model)
        if len(self._meta) > 10_000:
            self._meta.clear()
        self._meta[model] = (now + self.config.metadata_ttl, infos)
        return infos

    @staticmethod
    def _infos(rows: list[Any], model: str | None) -> list[ModelInfo]:
        out = []
        for r in rows:
            try:
                info = ModelInfo.from_metadata(r)
            except (KeyError, TypeError, ValueError):
                continue
            if model is None or info.name == model:
                out.append(info)
        out.sort(key=lambda i: version_key(i.version))
        versions = [i.version for i in out]
        for i in out:
            i.versions = [v for v in versions]
        return out

    async def model_metadata(self, model: str, version: str | None = None) -> ModelInfo:
        infos = await self._versions(model)
        if not infos:
            raise not_found(model, None)
        if version is None or version == "latest":
            return infos[-1]
        for i in infos:
            if i.version == version:
                return i
        raise not_found(model, version)

    async def list_models(self) -> list[ModelInfo]:
        if self.swarm is None:
            return []
        ans = await self._call_any(self.peers.stores, "listModels", {})
        rows = ans.get("models") if isinstance(ans, dict) else []
        latest: dict[str, ModelInfo] = {}
        by_name: dict[str, list[str]] = {}
        for info in self._infos(rows if isinstance(rows, list) else [], None):
            latest[info.name] = info
            by_name.setdefault(info.name, []).append(info.version)
        for name, info in latest.items():
            info.versions = by_name[name]
        return [latest[n] for n in sorted(latest)]

    async def ready(self, model: str, version: str | None = None) -> bool:
        if self.fleet is not None:  # a model no worker has loaded yet is ready if any worker can fetch it
            return bool(self.fleet.balancer.candidates(model) or self.fleet.balancer.candidates(None))
        try:
            await self._choose(model, set())
        except SwarmdError as e:
            if e.code in (ERR_UNAVAILABLE, ERR_NOT_FOUND, ERR_NOT_READY):
                return False
            raise
        return True

    async def put_model(self, upload: UploadedModel) -> ModelInfo:
        if self.swarm is None:
            raise SwarmdError(ERR_NOT_READY, "this gateway is not connected to a swarm")
        from swarmd.store.transfer import push_file

        if not self.peers.stores:
            raise SwarmdError(ERR_UNAVAILABLE, "no store is reachable to take the model")
        pk = self.peers.stores[0]
        peer = await self._connect(pk)
        meta = await push_file(peer, upload.path, upload.name, upload.version, tags=upload.tags,
                               description=upload.description or None)
        if not isinstance(meta, dict) or meta.get("digest") != upload.sha256:
            raise SwarmdError("ERR_CORRUPT", "the store recorded another digest than the gateway received")
        self._meta.pop(upload.name, None)
        return ModelInfo.from_metadata(meta)

    async def _connect(self, pk: bytes) -> Any:
        """An RPC peer for streams; for our own key, dial our own RPC server on loopback."""
        if pk != self.ctx.identity.public_key:
            return await self.swarm.connect(pk)
        from swarmd.rpc import connect

        port = self.ctx.ports.get("rpc") or self.ctx.ports.get("tcp")
        if not port:
            raise SwarmdError(ERR_UNAVAILABLE, "the co-located store has no RPC port to stream to")
        return await connect(self.ctx.identity, "127.0.0.1", port, remote_public_key=pk)

    def status(self) -> dict[str, Any]:
        p = self.peers
        return {
            "backend": "swarm",
            "route": self.config.route,
            "orchestrators": [_hex(k) for k in p.orchestrators],
            "stores": [_hex(k) for k in p.stores],
            "workers": {_hex(k): v for k, v in p.workers.items()},
            "discovered_ago": round(time.monotonic() - p.at, 3) if p.at else None,
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

    def worker_count(self) -> int:
        if self.fleet is not None:
            return len(self.fleet.balancer.candidates(None))
        return len(self.peers.workers)


__all__ = ["SwarmBackend"]
