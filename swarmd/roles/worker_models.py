"""Which models a worker serves, and loading them.

The version an unversioned request gets is the newest live version in the
trusted stores' merged catalogs (checked at most every catalog_interval; local
models: the newest configured); versions deleted from the stores are unloaded.
A model loads once per key (from a local file or fetched from a store),
operator-loaded models are pinned, request-loaded ones are a cache evicted
least recently used first. `WorkerModels` is a mixin of `WorkerRole`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

from swarmd.errors import (
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.node.supervisor import Supervisor
from swarmd.roles.base import NodeContext
from swarmd.versions import latest
from swarmd.worker.cache import ModelCache
from swarmd.worker.config import WorkerConfig
from swarmd.worker.engine import InferenceEngine
from swarmd.worker.fetch import ModelFetcher
from swarmd.worker.served import ServedModel, WorkerState


class WorkerModels:
    """current_version / ensure and the catalog checks, loads and evictions behind them."""

    ctx: NodeContext
    config: WorkerConfig
    engine: InferenceEngine
    cache: ModelCache
    fetcher: ModelFetcher | None
    local: dict[tuple[str, str], Path]
    log: Any
    _ensuring: dict[tuple[str, str | None], asyncio.Future[ServedModel]]
    _pinned: set[tuple[str, str]]
    _lru: OrderedDict[tuple[str, str], None]
    _latest: dict[str, tuple[float, str]]
    _checking: dict[str, asyncio.Future[str]]
    tasks: Supervisor  # the role's scope (roles.base.Role.tasks): closed on stop
    _announce_now: asyncio.Event

    async def _colocated_call(self, method: str, params: dict[str, Any]) -> Any:
        """getModel or listModels on a store role running in this process, called through our own
        key's local peer as a remote store is called; ERR_NOT_FOUND when there is none."""
        if getattr(self.ctx.role("store"), "store", None) is None or self.ctx.swarm is None:
            raise SwarmdError(ERR_NOT_FOUND, "no store in this process")
        return await self.ctx.swarm.local_peer().call(method, params, timeout=self.config.store_timeout)

    async def _colocated_blob(self, digest: str) -> Path | None:
        """The verified blob in a store role running in this process (StoreRole.blob_path), if it has it."""
        blob_path = getattr(self.ctx.role("store"), "blob_path", None)
        if blob_path is None:
            return None
        try:
            return Path(await blob_path(digest))
        except (OSError, SwarmdError):
            return None

    def _local_path(self, name: str, version: str | None) -> tuple[str, Path] | None:
        matches = [(v, p) for (n, v), p in self.local.items() if n == name and (version is None or v == version)]
        return matches[-1] if matches else None

    async def current_version(self, name: str) -> str:
        """The version an unversioned request for name is served by.

        Local models (worker.models): the newest configured version. Otherwise the
        newest live version of the trusted stores' merged catalogs (swarmd.versions),
        checked at most catalog_interval ago, never whatever was loaded last. When
        the stores cannot be reached, the last answer (or the newest loaded
        version) keeps serving; a name the stores say is gone is ERR_NOT_FOUND.
        """
        if self.local:
            local = [v for (n, v) in self.local if n == name]
            if local:
                return latest(local)  # type: ignore[return-value]
        if self.fetcher is not None:
            hit = self._latest.get(name)
            # the catalog loop refreshes served names every interval: requests seldom wait on a store
            # (checked first: this runs per request, the scan of loaded versions below does not need to)
            if hit is not None and asyncio.get_running_loop().time() - hit[0] < self.config.catalog_interval * 1.5:
                return hit[1]
        loaded = latest(m.version for m in self.engine.models() if m.name == name)
        if self.fetcher is None:
            if loaded is None:
                raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' is not loaded on this worker")
            return loaded
        hit = self._latest.get(name)
        task = self._check(name)
        fallback = hit[1] if hit is not None else loaded
        try:
            # With an answer in hand, a slow store does not hold requests up for long.
            async with asyncio.timeout(None if fallback is None else min(2.0, self.config.store_timeout)):
                return await asyncio.shield(task)
        except TimeoutError:
            if fallback is None:
                raise SwarmdError(ERR_UNAVAILABLE, f"the stores did not say which version of '{name}' is the latest") from None
            return fallback
        except SwarmdError as e:
            if fallback is None or e.code not in (ERR_UNAVAILABLE, ERR_TIMEOUT):
                raise
            return fallback

    def _check(self, name: str) -> asyncio.Future[str]:
        """The outcome of the one catalog check of name in progress, started if there is none."""
        fut = self._checking.get(name)
        if fut is None:
            if len(self._checking) >= 64:
                raise SwarmdError(ERR_OVERLOADED, "too many model catalogs being checked at once; retry shortly")
            fut = asyncio.get_running_loop().create_future()
            self._checking[name] = fut
            self.tasks.spawn(self._run_check(name, fut), name=f"worker-catalog-{name}")
        return fut

    async def _run_check(self, name: str, fut: asyncio.Future[str]) -> None:
        """Owned by the role's task scope: the outcome goes to the waiters, never crashes the node."""
        try:
            fut.set_result(await self._check_catalog(name))
        except asyncio.CancelledError:
            fut.set_exception(SwarmdError(ERR_NOT_READY, "the worker is stopping"))
            fut.exception()
            raise
        except Exception as e:
            fut.set_exception(e if isinstance(e, SwarmdError) else SwarmdError(ERR_UNAVAILABLE, f"catalog check failed: {e!r:.200}"))
            fut.exception()  # retrieved: nobody may be waiting
        finally:
            self._checking.pop(name, None)

    async def _check_catalog(self, name: str) -> str:
        """Ask the stores for name's live versions; note the latest, unload deleted ones."""
        loop = asyncio.get_running_loop()
        assert self.fetcher is not None
        try:
            metas = await self.fetcher.versions(name)
        except SwarmdError as e:
            if e.code == ERR_NOT_FOUND:
                self._latest.pop(name, None)
                self._retire(name, set())
            elif name in self._latest:  # keep serving what we knew; ask again after the interval
                self._latest[name] = (loop.time(), self._latest[name][1])
            raise
        live = {m.version for m in metas}
        self._latest[name] = (loop.time(), metas[-1].version)
        self._retire(name, live)
        return metas[-1].version

    def _retire(self, name: str, live: set[str]) -> None:
        """Unload the versions of name the stores no longer hold (after their requests finish)."""
        for m in self.engine.models():
            if m.name == name and m.version not in live and (name, m.version) not in self.local and not m.closing:
                self.log.bind(event="model_retired", model=name, version=m.version).info(
                    "{}:{} was deleted from the stores; unloading it", name, m.version)
                self._spawn_unload(name, m.version)

    def _spawn_unload(self, name: str, version: str) -> None:
        self.tasks.spawn(self._unload(name, version), name=f"worker-unload-{name}")

    async def _unload(self, name: str, version: str) -> None:
        digests = {m.digest for m in self.engine.models() if m.name == name and m.version == version}
        try:
            await self.engine.unload(name, version)
        except SwarmdError:
            return  # already gone
        self._pinned.discard((name, version))
        self._lru.pop((name, version), None)
        self.cache.pinned -= digests - {m.digest for m in self.engine.models()}
        self._announce_now.set()

    async def _catalog_loop(self) -> None:
        """Keep each served name's latest version fresh, so requests rarely wait on a store."""
        while True:
            await asyncio.sleep(self.config.catalog_interval)
            names = {m.name for m in self.engine.models()} - {n for (n, _) in self.local}
            for name in sorted(names):
                with contextlib.suppress(SwarmdError, TimeoutError):
                    async with asyncio.timeout(self.config.store_timeout):
                        await asyncio.shield(self._check(name))

    def _meanwhile(self, name: str, newest: str) -> str:
        """The version an unversioned request gets while the newest is not loaded yet.

        The newest starts loading in the background; until it is ready, the newest
        version already loaded (every loaded one is live: deleted ones are unloaded
        when the catalog says so) keeps serving, so a push never stalls traffic for
        the time a big model takes to fetch. With none loaded, the request waits.
        """
        loaded = latest(m.version for m in self.engine.models() if m.name == name and not m.closing)
        if loaded is None or self.engine.state not in (WorkerState.JOINING, WorkerState.ONLINE):
            return newest
        with contextlib.suppress(SwarmdError):
            self._load_job(name, newest, False)  # its failure is logged by the next request that waits
        return loaded

    def _touch(self, name: str, version: str) -> None:
        if (name, version) in self._lru:
            self._lru.move_to_end((name, version))

    async def _make_room(self, pin: bool) -> None:
        """Unload least recently used request-loaded models until one more fits in max_models."""
        while len(self.engine.describe_models()) >= self.config.max_models:  # loaded and loading
            victim = next((k for k in self._lru if k not in self._pinned and self.engine.get(*k) is not None), None)
            if victim is None:
                raise SwarmdError(
                    ERR_OVERLOADED,
                    f"worker already serves {len(self.engine.models())} models pinned by its operator "
                    f"(worker.max_models = {self.config.max_models}); unload one first",
                )
            self._lru.pop(victim, None)
            self.log.bind(event="model_evicted", model=victim[0], version=victim[1]).info(
                "unloading {}:{} (least recently used) to make room", *victim)
            await self._unload(*victim)

    def _settle(self, served: ServedModel, pin: bool) -> None:
        key = (served.name, served.version)
        if pin or key in self._pinned:
            self._pinned.add(key)
            self._lru.pop(key, None)
        else:
            self._lru[key] = None
            self._lru.move_to_end(key)

    async def ensure(self, name: str, version: str | None = None, *, pin: bool = False) -> ServedModel:
        """The served model name:version, loading it (from a local file or the stores) if needed.

        One load per key. pin: the operator asked for it (never evicted); otherwise it is
        a cache entry for requests, evicted least recently used first.
        """
        if version is None:
            version = await self.current_version(name)
        served = self.engine.get(name, version)
        if served is not None and not served.closing:
            self._settle(served, pin)
            return served
        served = await asyncio.shield(self._load_job(name, version, pin))
        self._settle(served, pin)
        return served

    def _load_job(self, name: str, version: str, pin: bool) -> asyncio.Future[ServedModel]:
        """The one load of name:version in progress, started if there is none."""
        key = (name, version)
        job = self._ensuring.get(key)
        if job is None and len(self._ensuring) >= self.config.max_concurrent_loads:
            raise SwarmdError(
                ERR_OVERLOADED, f"{len(self._ensuring)} model loads already in progress; retry '{name}' later"
            )
        if job is None:
            job = asyncio.get_running_loop().create_future()
            self._ensuring[key] = job
            self.tasks.spawn(self._ensure_job(name, version, job, pin), name=f"worker-load-{name}")
        return job

    async def _ensure_job(self, name: str, version: str, job: asyncio.Future[ServedModel], pin: bool) -> None:
        """Owned by the role's task scope; failures go to the waiters, never crash the node."""
        try:
            served = await self._load(name, version, pin)
            if not job.done():
                job.set_result(served)
        except asyncio.CancelledError:
            if not job.done():
                job.set_exception(SwarmdError(ERR_NOT_READY, f"loading '{name}' was cancelled (worker stopping)"))
                job.exception()
            raise
        except Exception as e:
            if not job.done():
                job.set_exception(e)
                job.exception()
        finally:
            self._ensuring.pop((name, version), None)

    async def _load(self, name: str, version: str, pin: bool) -> ServedModel:
        local = self._local_path(name, version)
        if local is not None:
            await self._make_room(pin)
            served = await self.engine.load(name, local[0], local[1])
        elif self.fetcher is None:
            raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' is not configured on this worker and it has no swarm to fetch it from")
        else:
            meta = await self.fetcher.resolve(name, version)
            served = self.engine.get(name, meta.version)
            if served is None:
                path = await self.fetcher.fetch(meta)
                self.cache.pinned.add(meta.digest)
                try:
                    await self._make_room(pin)
                    served = await self.engine.load(name, meta.version, path, digest=meta.digest)
                except BaseException:
                    if meta.digest not in {m.digest for m in self.engine.models()}:
                        self.cache.pinned.discard(meta.digest)
                    raise
        self._settle(served, pin)
        self._announce_now.set()
        return served
