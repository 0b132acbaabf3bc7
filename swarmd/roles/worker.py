"""The worker role: serve ONNX models to peers over RPC, announce state and load.

Glue only: the InferenceEngine (swarmd.worker.engine) validates, batches and
bounds; the ModelFetcher pulls models from stores; this module maps RPC
methods onto them (which model and version, and loading it: the mixin
`worker_models.WorkerModels`), keeps the worker's DHT announcements current (WORKERS and
one topic per served model, with state and live load), and on stop drains
before it withdraws, so no accepted request is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_NOT_READY,
    ConfigError,
    SwarmdError,
)
from swarmd.roles.base import NodeContext, Role
from swarmd.roles.worker_models import WorkerModels
from swarmd.rpc.params import as_params, str_param
from swarmd.topics import WORKERS, worker_model_topic
from swarmd.worker.cache import ModelCache
from swarmd.worker.config import WorkerConfig, parse_local_model
from swarmd.worker.engine import InferenceEngine
from swarmd.worker.fetch import ModelFetcher
from swarmd.worker.served import ServedModel, WorkerState

MAX_NAME = 256
WITHDRAW_TIMEOUT = 2.0  # bound on withdrawing our records on stop


def _model_params(params: Any, method: str) -> tuple[str, str | None]:
    p = as_params(params, method)
    model = str_param(p, "model", method, MAX_NAME)
    if not model:
        raise SwarmdError(ERR_BAD_REQUEST, f"{method}: 'model' (the model name) is required")
    version = str_param(p, "version", method, MAX_NAME)
    return model, (None if version in ("", "latest") else version)


class WorkerRole(WorkerModels, Role):
    name: ClassVar[str] = "worker"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.config: WorkerConfig = ctx.settings.worker
        self.engine = InferenceEngine(self.config)
        self.cache = ModelCache(ctx.data_dir / "worker" / "cache", self.config.cache_bytes)
        self.fetcher = (
            ModelFetcher(
                ctx.swarm, self.cache, self.config, local_blob=self._colocated_blob, local_call=self._colocated_call,
                trusted=lambda key, record: ctx.trusts(key, "store", record),
            )
            if ctx.swarm is not None
            else None
        )
        self.local: dict[tuple[str, str], Path] = {}
        for spec in self.config.models:
            name, version, path = parse_local_model(spec)
            self.local[(name, version)] = Path(path).expanduser()
        self._ensuring: dict[tuple[str, str | None], asyncio.Future[ServedModel]] = {}
        # Loaded models the operator asked for (loadModel, preload, worker.models): never evicted.
        self._pinned: set[tuple[str, str]] = set()
        # Models loaded by inference requests, least recently used first: a cache, evicted for room.
        self._lru: OrderedDict[tuple[str, str], None] = OrderedDict()
        # name -> (loop time checked, latest live version in the stores' catalogs)
        self._latest: dict[str, tuple[float, str]] = {}
        self._checking: dict[str, asyncio.Future[str]] = {}
        self._topics: dict[str, dict[str, Any]] = {}  # joined topic -> last payload
        self._announce_now = asyncio.Event()
        self._started = time.monotonic()
        self.log = logger.bind(role="worker")

    # -- lifecycle ------------------------------------------------------------

    @classmethod
    def preflight(cls, settings: Any, data_dir: Path) -> None:
        """Every worker.models file must exist and be readable (a typo fails at once, in one line)."""
        for spec in settings.worker.models:
            name, version, path = parse_local_model(spec)
            p = Path(path).expanduser()
            if not p.is_file() or not os.access(p, os.R_OK):
                why = "is not a readable file" if p.exists() else "does not exist"
                raise ConfigError(f"worker.models {name}:{version}: {p} {why}")

    async def start(self) -> None:
        if self.ctx.methods is not None:
            m = self.ctx.methods
            m.register("runInference", self.run_inference, op="r")
            m.register("checkCapacity", self.check_capacity, op="r")
            m.register("getAvailableModels", self.get_available_models, op="r")
            m.register("getHealth", self.get_health, op="r")
            m.register("getModelStatistics", self.get_model_statistics, op="r")
            m.register("loadModel", self.load_model, op="w")
            m.register("unloadModel", self.unload_model, op="w")
        self.ctx.metrics.add_text(self.triton_metrics)
        await self.sync_announcements()  # visible as JOINING while models load
        for (name, version), path in self.local.items():
            await self.engine.load(name, version, path)
            self._pinned.add((name, version))
        for spec in self.config.preload:
            name, _, version = spec.partition(":")
            try:
                await self.ensure(name, version or await self.current_version(name), pin=True)
            except SwarmdError as e:  # a store may come later; the model then loads on first request
                self.log.bind(event="preload_failed", model=spec, code=e.code).warning(
                    "could not preload {}: {}", spec, e.message)
        self.engine.set_online()
        await self.sync_announcements()
        if self.ctx.swarm is not None:
            self.tasks.spawn(self._announce_loop(), name="worker-announce")
        if self.fetcher is not None:
            self.tasks.spawn(self._catalog_loop(), name="worker-catalog")
        self.log.bind(event="worker_online", models=[m.name for m in self.engine.models()]).info("worker online")

    async def stop(self) -> None:
        """Stop taking work, tell the swarm (DRAINING), finish accepted requests, withdraw.
        With nothing accepted there is nothing to drain: withdraw at once."""
        self.engine.stop_accepting()
        try:
            if self.engine.queued or self.engine.in_flight:
                await self.sync_announcements()
                await self.engine.drain()
        finally:
            await self.close_tasks()  # the announce and catalog loops, model loads, checks and unloads
            await self._withdraw()
            await self.engine.close()

    def status(self) -> dict[str, Any]:
        snap = self.engine.snapshot()
        return {"state": self.engine.state.value, "models": [f"{m.name}:{m.version}" for m in self.engine.models()],
                "providers": {f"{m.name}:{m.version}": m.runtime.provider for m in self.engine.models()},
                "load": snap.to_wire()}

    # -- announcements --------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        return {
            "state": "DRAINING" if self.engine.state is WorkerState.STOPPED else self.engine.state.value,
            "models": sorted({m.name for m in self.engine.models()}),
            "load": {**self.engine.snapshot().to_wire(), "max_concurrent": self.config.max_concurrent_inferences},
        }

    async def sync_announcements(self) -> None:
        """Join topics of newly served models, leave those no longer served, refresh payloads."""
        swarm = self.ctx.swarm
        if swarm is None:
            return
        payload = self.payload()
        wanted = {WORKERS} | {worker_model_topic(n) for n in payload["models"]}
        timeout = self.config.store_timeout
        for topic in sorted(wanted):
            try:
                async with asyncio.timeout(timeout):
                    if topic not in self._topics:
                        await swarm.join(topic, announce=True, lookup=False, payload=payload, live=True)
                    elif self._topics[topic] != payload:
                        await swarm.update(topic, payload)
                self._topics[topic] = payload
            except (SwarmdError, TimeoutError) as e:
                self.log.bind(event="announce_failed", topic=topic).warning("announcing on {} failed: {!r}", topic, e)
        for topic in [t for t in self._topics if t not in wanted]:
            with contextlib.suppress(SwarmdError, TimeoutError):
                async with asyncio.timeout(timeout):
                    await swarm.leave(topic)
            self._topics.pop(topic, None)

    async def _withdraw(self) -> None:
        """Leave every topic at once, bounded: a DHT whose nodes are gone must not hold up
        a stop (our records are live ones and expire within seconds anyway)."""
        swarm = self.ctx.swarm
        if swarm is None:
            return

        async def leave(topic: str) -> None:
            try:
                async with asyncio.timeout(WITHDRAW_TIMEOUT):
                    await swarm.leave(topic)
            except (SwarmdError, TimeoutError) as e:
                self.log.bind(event="withdraw_failed", topic=topic).warning("leaving {} failed: {!r}", topic, e)

        topics = list(self._topics)
        self._topics.clear()
        await asyncio.gather(*(leave(t) for t in topics))

    async def _announce_loop(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as the
        # event fires, and this loop would then outlive stop().
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.announce_interval):
                    await self._announce_now.wait()
            self._announce_now.clear()
            await self.sync_announcements()

    # -- RPC methods ----------------------------------------------------------

    async def run_inference(self, ctx: Any, params: Any) -> dict[str, Any]:
        model, version = _model_params(params, "runInference")
        request_id = str_param(params, "request_id", "runInference", MAX_NAME)
        if "inputs" not in params:
            raise SwarmdError(ERR_BAD_REQUEST, "'inputs' (a map of input name to tensor) is required")
        budget = ctx.time_left() if ctx is not None else None
        if version is None:  # the stores' catalogs say which version is the latest, not what loaded last
            version = await self.current_version(model)
            if self.engine.get(model, version) is None:
                version = self._meanwhile(model, version)
        served = self.engine.get(model, version)
        if served is None and self.engine.state in (WorkerState.JOINING, WorkerState.ONLINE):
            wait = budget if budget is not None else self.config.default_timeout
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    served = await self.ensure(model, version)  # read-only: a cache entry, never pinned
            except TimeoutError:
                raise SwarmdError(ERR_NOT_READY, f"model '{model}' is still loading; retry shortly") from None
            if budget is not None:
                budget = ctx.time_left()
        self._touch(model, version)
        result = await self.engine.infer(
            model, params["inputs"], outputs=params.get("outputs"), version=version,
            budget=budget, request_id=request_id,
        )
        return result.to_wire()

    async def check_capacity(self, ctx: Any, params: Any) -> dict[str, Any]:
        return self.engine.capacity()

    async def get_available_models(self, ctx: Any, params: Any) -> dict[str, Any]:
        return {"models": self.engine.describe_models()}

    # Triton's metric names (nv_inference_*), so existing Triton dashboards read swarmd workers
    TRITON_COUNTERS = (
        ("nv_inference_request_success", "successful inference requests", lambda s: s.phases["success"].count),
        ("nv_inference_request_failure", "failed inference requests", lambda s: s.phases["fail"].count),
        ("nv_inference_count", "inferences performed (rows; a batch of N counts N)", lambda s: s.inference_count),
        ("nv_inference_exec_count", "model executions (runs; a batch counts one)", lambda s: s.execution_count),
        ("nv_inference_request_duration_us", "cumulative request time in the worker, queue included",
         lambda s: (s.phases["success"].ns + s.phases["fail"].ns) // 1000),
        ("nv_inference_queue_duration_us", "cumulative time requests waited in the queue",
         lambda s: s.phases["queue"].ns // 1000),
        ("nv_inference_compute_input_duration_us", "cumulative time stacking inputs",
         lambda s: s.phases["compute_input"].ns // 1000),
        ("nv_inference_compute_infer_duration_us", "cumulative time in onnxruntime",
         lambda s: s.phases["compute_infer"].ns // 1000),
        ("nv_inference_compute_output_duration_us", "cumulative time splitting outputs",
         lambda s: s.phases["compute_output"].ns // 1000),
    )

    def metrics(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        models = self.engine.models()
        out: list[Any] = []
        snap = self.engine.snapshot()
        out.append(GaugeMetricFamily("swarmd_worker_queue_depth", "requests waiting to run", value=snap.queue))
        out.append(GaugeMetricFamily("swarmd_worker_in_flight", "requests running", value=snap.in_flight))
        out.append(GaugeMetricFamily("swarmd_worker_models_loaded", "model versions loaded", value=len(models)))
        done = CounterMetricFamily("swarmd_worker_requests", "requests finished, by outcome", labels=["outcome"])
        done.add_metric(["ok"], snap.completed)
        done.add_metric(["failed"], snap.failed)
        out.append(done)
        return out

    def triton_metrics(self) -> bytes:
        """The nv_inference_* counters as Triton writes them (prometheus_client would rename a
        counter to NAME_total, and Triton dashboards query the bare names)."""
        from swarmd.gateway.metrics import escape_label

        lines: list[str] = []
        models = self.engine.models()
        for name, help_, read in self.TRITON_COUNTERS:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            for m in models:
                lines.append(f'{name}{{model="{escape_label(m.name)}",version="{escape_label(m.version)}"}} {read(m.stats)}')
        return ("\n".join(lines) + "\n").encode()

    async def get_model_statistics(self, ctx: Any, params: Any) -> dict[str, Any]:
        """Triton's statistics extension, per loaded model version: {"model_stats": [...]}."""
        p = as_params(params, "getModelStatistics")
        name, version = (str_param(p, k, "getModelStatistics", MAX_NAME) for k in ("model", "version"))
        return {"model_stats": self.engine.statistics(name, version)}

    async def get_health(self, ctx: Any, params: Any) -> dict[str, Any]:
        state = self.engine.state
        return {
            "status": {"ONLINE": "healthy", "JOINING": "starting"}.get(state.value, "draining"),
            "state": state.value,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "models": [f"{m.name}:{m.version}" for m in self.engine.models()],
            "providers": {f"{m.name}:{m.version}": m.runtime.provider for m in self.engine.models()},
            "load": self.engine.snapshot().to_wire(),
            "cache": {"bytes": self.cache.used(), "budget": self.cache.budget},
        }

    async def load_model(self, ctx: Any, params: Any) -> dict[str, Any]:
        model, version = _model_params(params, "loadModel")
        if self.engine.state not in (WorkerState.JOINING, WorkerState.ONLINE):
            raise SwarmdError(ERR_NOT_READY, f"worker is {self.engine.state.value.lower()}; not loading '{model}'")
        served = await self.ensure(model, version, pin=True)
        return served.describe()

    async def unload_model(self, ctx: Any, params: Any) -> dict[str, Any]:
        model, version = _model_params(params, "unloadModel")
        digests = {m.digest for m in self.engine.models() if m.name == model and (version is None or m.version == version)}
        versions = await self.engine.unload(model, version)
        still = {m.digest for m in self.engine.models()}
        self.cache.pinned -= digests - still
        for v in versions:
            self._pinned.discard((model, v))
            self._lru.pop((model, v), None)
        self._announce_now.set()
        return {"model": model, "unloaded": versions}


ROLE = WorkerRole
