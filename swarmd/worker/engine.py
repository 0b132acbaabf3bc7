"""The inference engine: loaded models, load and drain.

Models load in an executor thread, one load per name:version, and unload once
their queued and running requests finished; drain stops admission and waits
for the accepted work. Admission and batch dispatch, the hot path, are the
mixin `dispatch.Dispatch`; a loaded model is a `served.ServedModel`.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    SwarmdError,
)
from swarmd.versions import latest
from swarmd.worker.config import BatchingConfig, WorkerConfig
from swarmd.worker.dispatch import Dispatch
from swarmd.worker.runtime import ModelRuntime
from swarmd.worker.served import ServedModel, WorkerState, file_sha256
from swarmd.worker.stats import LoadSnapshot, LoadStats


class InferenceEngine(Dispatch):
    def __init__(self, config: WorkerConfig) -> None:
        config.validate()
        self.config = config
        self.state = WorkerState.JOINING
        self.stats = LoadStats()
        self.queued = 0
        self.in_flight = 0
        self._models: dict[tuple[str, str], ServedModel] = {}
        # name -> version answered when none is asked: the newest loaded by swarmd.versions (the
        # worker role asks its stores which version is the latest and passes it explicitly)
        self._default: dict[str, str] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[ServedModel]] = {}
        self._free = config.max_concurrent_inferences  # run slots not in use
        self._turn = 0
        self.executor = ThreadPoolExecutor(
            max_workers=config.max_concurrent_inferences, thread_name_prefix="swarmd-infer"
        )
        self._runs: set[asyncio.Future[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.log = logger.bind(part="worker")

    # -- models ---------------------------------------------------------------

    async def load(
        self, name: str, version: str, source: Path | bytes, *, digest: str | None = None
    ) -> ServedModel:
        """Load a model from a file or bytes and start serving it; idempotent per (name, version).

        A second call while the first is loading waits for it instead of
        loading twice.
        """
        key = (name, version)
        if key in self._models:
            return self._models[key]
        if key in self._loading:
            return await asyncio.shield(self._loading[key])
        if self.state in (WorkerState.DRAINING, WorkerState.STOPPED):
            raise SwarmdError(ERR_NOT_READY, f"worker is {self.state.value.lower()}; not loading '{name}'")
        if len(self._models) + len(self._loading) >= self.config.max_models:
            raise SwarmdError(
                ERR_OVERLOADED,
                f"worker already serves {len(self._models)} models (worker.max_models = {self.config.max_models}); "
                "unload one first",
            )
        fut: asyncio.Future[ServedModel] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            served = await self._load(name, version, source, digest)
            fut.set_result(served)
            return served
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else SwarmdError(ERR_NOT_READY, "load cancelled"))
            fut.exception()  # mark retrieved: a load nobody else waited for must not warn
            raise
        finally:
            del self._loading[key]

    async def _load(self, name: str, version: str, source: Path | bytes, digest: str | None) -> ServedModel:
        cfg = self.config

        def build() -> tuple[ModelRuntime, str, int]:
            if isinstance(source, Path):
                d, size = file_sha256(source) if digest is None else (digest, source.stat().st_size)
            else:
                d, size = digest or hashlib.sha256(source).hexdigest(), len(source)
            rt = ModelRuntime(source, intra_op_threads=cfg.intra_op_threads, inter_op_threads=cfg.inter_op_threads,
                              providers=cfg.providers)
            return rt, d, size

        runtime, digest, size = await asyncio.to_thread(build)
        policy = cfg.batching_for(name)
        if policy.enabled and not runtime.signature.batchable:
            policy = BatchingConfig(False, policy.max_batch_size, policy.max_queue_delay_us)
        served = ServedModel(name, version, digest, runtime, policy, size=size)
        served.idle.set()
        self._models[(name, version)] = served
        self._default[name] = latest(v for (n, v) in self._models if n == name) or version
        for note in runtime.notes:
            self.log.bind(event="provider_unavailable", model=name).warning("worker.providers: {}", note)
        if runtime.fallback is not None:
            self.log.bind(event="provider_fallback", model=name, version=version).warning(
                "model {}:{}: {}", name, version, runtime.fallback)
        self.log.bind(event="model_loaded", model=name, version=version, digest=digest[:16],
                      batching=policy.enabled, provider=runtime.provider).info(
            "loaded model {}:{} on {}", name, version, runtime.provider)
        return served

    def loading(self, name: str, version: str | None = None) -> bool:
        return any(k[0] == name and (version is None or k[1] == version) for k in self._loading)

    def get(self, name: str, version: str | None = None) -> ServedModel | None:
        if version is None or version in ("", "latest"):
            version = self._default.get(name)
            if version is None:
                return None
        return self._models.get((name, version))

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """Triton-shaped statistics of the loaded models (one name, one version, or all)."""
        return [m.stats.to_triton(m.name, m.version) for m in self._models.values()
                if (name is None or m.name == name) and (version in (None, "") or m.version == version)]

    def describe_models(self) -> list[dict[str, Any]]:
        out = [m.describe() for m in self._models.values()]
        out += [{"name": n, "version": v, "state": "LOADING"} for (n, v) in self._loading]
        return out

    async def unload(self, name: str, version: str | None = None) -> list[str]:
        """Stop serving a model after its accepted requests finish; returns the versions unloaded."""
        targets = [m for (n, v), m in self._models.items() if n == name and (version in (None, "", "latest") or v == version)]
        if not targets:
            raise SwarmdError(ERR_NOT_FOUND, f"model '{name}'{f' version {version!r}' if version else ''} is not loaded")
        for m in targets:
            m.closing = True
        for m in targets:
            await m.idle.wait()
            self._models.pop((m.name, m.version), None)
            if m.delay_timer is not None:
                m.delay_timer.cancel()
            self.log.bind(event="model_unloaded", model=m.name, version=m.version).info(
                "unloaded model {}:{}", m.name, m.version)
        remaining = latest(v for (n, v) in self._models if n == name)
        if remaining is not None:
            self._default[name] = remaining
        else:
            self._default.pop(name, None)
        return [m.version for m in targets]

    # -- load, lifecycle --------------------------------------------------------

    def snapshot(self) -> LoadSnapshot:
        return self.stats.snapshot(self.queued, self.in_flight, len(self._models))

    def capacity(self) -> dict[str, Any]:
        snap = self.snapshot()
        return {
            "state": self.state.value,
            "queue_depth": snap.queue,
            "max_queue": self.config.max_queue,
            "in_flight": snap.in_flight,
            "max_concurrent": self.config.max_concurrent_inferences,
            "accepting": self.state in (WorkerState.JOINING, WorkerState.ONLINE) and snap.queue < self.config.max_queue,
            "ewma_ms": round(snap.ewma_ms, 3),
            "rps": round(snap.rps, 1),
            "models": len(self._models),
        }

    def set_online(self) -> None:
        if self.state is WorkerState.JOINING:
            self.state = WorkerState.ONLINE

    def stop_accepting(self) -> None:
        """Enter DRAINING: new requests and loads are refused, accepted ones still run."""
        if self.state is not WorkerState.STOPPED:
            self.state = WorkerState.DRAINING

    async def drain(self, grace: float | None = None) -> bool:
        """Take no new work, finish what was accepted. True when everything finished in time.
        With nothing accepted there is nothing to wait for: True at once, and the drain ends
        the moment the last accepted request does, never at the grace period."""
        self.stop_accepting()
        if self._idle.is_set():
            return True
        self.log.bind(event="draining", queued=self.queued, in_flight=self.in_flight).info("draining")
        try:
            async with asyncio.timeout(grace if grace is not None else self.config.drain_timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            self.log.bind(event="drain_timeout", queued=self.queued, in_flight=self.in_flight).warning(
                "drain did not finish in time")
            return False

    async def close(self) -> None:
        """Drain, then stop dispatchers and the executor threads."""
        if self.state is not WorkerState.STOPPED:
            await self.drain()
        self.state = WorkerState.STOPPED
        for run in list(self._runs):
            run.cancel()
        for served in self._models.values():
            for p in served.queue:
                if not p.future.done():
                    p.future.set_exception(SwarmdError(ERR_NOT_READY, "worker stopped before the request ran"))
                if p.timer is not None:
                    p.timer.cancel()
            served.queue.clear()
            if served.delay_timer is not None:
                served.delay_timer.cancel()
        self._models.clear()
        self._default.clear()
        await asyncio.to_thread(self.executor.shutdown, wait=True)
