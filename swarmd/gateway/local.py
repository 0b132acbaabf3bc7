"""LocalBackend: onnxruntime in the gateway's own process (the standalone gateway).

Models live under <models_dir>/<name>/<version>/model.onnx with a meta.json
beside it. Sessions load at start and on upload; inference runs on two run
threads (run slots) because onnxruntime releases the GIL, so the event loop keeps
serving HTTP while a model computes (running lone requests inline on the loop
was tried: it helps one connection and serialises everything under load, since
the loop never sees the requests still waiting in socket buffers).

Requests that arrive while both run slots are busy queue, and the next run takes
the compatible ones together, with the worker's own batching rules and code
(swarmd/worker/batcher.py: at most 32 rows a run, no waiting for company; a
stacked run that fails is re-run request by request so only the faulty one gets
the error). Measured here (issue 20) on the 784-1024-1024-10 MLP: a batch-1 run
streams all 7.4 MB of weights for one row, so one run per request made the
backend most of both fronts' CPU per request. A batch goes to a run thread through
a SimpleQueue and comes back by call_soon_threadsafe: a ThreadPoolExecutor's future,
work item, idle semaphore and future chaining cost the loop thread ~8 µs a request.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from swarmd.errors import ERR_CONFLICT, ERR_NOT_IMPLEMENTED, SwarmdError
from swarmd.gateway.backend import (
    InferResult,
    UploadedModel,
    not_found,
)
from swarmd.names import ModelMeta, check_name, check_version
from swarmd.versions import next_version, version_key
from swarmd.worker.batcher import Pending, PendingState, execute, internal_error, take_batch
from swarmd.worker.config import BatchingConfig
from swarmd.worker.runtime import ModelRuntime

BATCHING = BatchingConfig()  # the worker's defaults


@dataclass
class _Loaded:
    info: ModelMeta
    runtime: ModelRuntime  # built the one way a worker builds it (providers, CPU fallback, signature)
    queue: deque[Pending] = field(default_factory=deque)  # requests waiting for a run slot
    batchable: bool = False  # runtime.signature.batchable, read once (a property that walks the specs)

    def __post_init__(self) -> None:
        self.batchable = self.runtime.signature.batchable


class LocalBackend:
    """Serves the ONNX models found in a directory, in this process."""

    def __init__(self, models_dir: Path, *, threads: int = 1, pool_size: int = 2) -> None:
        self.models_dir = Path(models_dir)
        self.threads = threads
        self._models: dict[str, dict[str, _Loaded]] = {}
        self._latest: dict[str, _Loaded] = {}  # each model's newest version, kept with _models (no sort per request)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-load")  # model loads
        # the run slots: threads taking batches from one queue, answering through call_soon_threadsafe
        # (no concurrent.futures.Future, work item, semaphore or future chaining per batch: issue 20)
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._runners = [threading.Thread(target=self._run_batches, name=f"gateway-ort-{i}", daemon=True)
                         for i in range(pool_size)]
        self._free = pool_size  # run slots not running a batch
        self._waiting: deque[_Loaded] = deque()  # models with queued requests, in the order they queued

    async def start(self) -> None:
        for t in self._runners:
            t.start()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for model_dir in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            for vdir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if (vdir / "model.onnx").is_file():
                    try:
                        self._load(model_dir.name, vdir.name, vdir)
                    except SwarmdError as e:
                        logger.bind(event="model_skipped", model=model_dir.name, version=vdir.name).warning(
                            "skipping model {}:{}: {}", model_dir.name, vdir.name, e.message
                        )

    async def stop(self) -> None:
        for _ in self._runners:
            self._jobs.put(None)
        for t in self._runners:
            if t.is_alive():
                t.join(timeout=30.0)  # a batch already in onnxruntime finishes first
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _runtime(self, path: Path) -> ModelRuntime:
        return ModelRuntime(path, intra_op_threads=self.threads)

    def _load(self, name: str, version: str, vdir: Path, runtime: ModelRuntime | None = None) -> ModelMeta:
        if runtime is None:
            runtime = self._runtime(vdir / "model.onnx")
        meta: dict[str, Any] = {}
        try:
            meta = json.loads((vdir / "meta.json").read_text())
        except (OSError, ValueError):
            pass
        info = ModelMeta(
            name=name,
            version=version,
            digest=str(meta.get("digest", "")),
            size=(vdir / "model.onnx").stat().st_size,
            inputs=[t.to_wire() for t in runtime.signature.inputs],
            outputs=[t.to_wire() for t in runtime.signature.outputs],
            tags=list(meta.get("tags", [])),
            description=str(meta.get("description", "")),
            created=float(meta.get("created", 0.0)),
        )
        versions = self._models.setdefault(name, {})
        versions[version] = _Loaded(info, runtime)
        ordered = sorted(versions, key=version_key)
        for loaded in versions.values():
            loaded.info.versions = list(ordered)
        self._latest[name] = versions[ordered[-1]]
        return info

    def _get(self, model: str, version: str | None) -> _Loaded:
        if version is None or version == "latest":
            loaded = self._latest.get(model)
            if loaded is None:
                raise not_found(model, None)
            return loaded
        versions = self._models.get(model)
        if not versions:
            raise not_found(model, None)
        loaded = versions.get(version)
        if loaded is None:
            raise not_found(model, version)
        return loaded

    async def list_models(self) -> list[ModelMeta]:
        return [self._get(name, None).info for name in sorted(self._models)]

    async def model_metadata(self, model: str, version: str | None = None) -> ModelMeta:
        return self._get(model, version).info

    async def ready(self, model: str, version: str | None = None) -> bool:
        self._get(model, version)
        return True

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        return await self.submit(model, version, inputs, outputs, request_id)

    def submit(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        request_id: str | None = None,
    ) -> asyncio.Future[InferResult]:
        """infer() without a coroutine: validate and queue now (raises SwarmdError), answer
        through the returned future. Cancelling it drops the request if it has not run yet."""
        loaded = self._get(model, version)
        feeds, names, rows = loaded.runtime.signature.validate(loaded.info.name, inputs, outputs,
                                                               batch=loaded.batchable)
        now = time.monotonic()
        future: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        p = Pending(feeds, names, rows, now, now, future, request_id=request_id)
        if not loaded.queue:
            self._waiting.append(loaded)
        loaded.queue.append(p)
        if self._free:
            self._pump()
        return future

    def _pump(self) -> None:
        """Start a batch on each free run slot, models taking turns."""
        loop = asyncio.get_running_loop()
        while self._free and self._waiting:
            loaded = self._waiting.popleft()
            batch = [p for p in take_batch(loaded.queue, BATCHING) if not p.future.done()]  # done: cancelled
            if loaded.queue:
                self._waiting.append(loaded)
            if not batch:
                continue
            self._free -= 1
            for p in batch:
                p.state = PendingState.RUNNING
            self._jobs.put((loop, loaded, batch))

    def _run_batches(self) -> None:
        """A run slot's thread: run each batch it is handed, hand the results back to the loop."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, loaded, batch = job
            try:
                results: Any = execute(loaded.runtime.run, loaded.info.name, batch[0].outputs,
                                       [p.feeds for p in batch], [p.rows for p in batch])
            except BaseException as e:  # a bug in execute: every request of the batch hears of it
                results = e
            try:
                loop.call_soon_threadsafe(self._finished, loaded, batch, results)
            except RuntimeError:  # the loop is closed: nobody waits for these answers any more
                return

    def _finished(self, loaded: _Loaded, batch: list[Pending], results: list[Any] | BaseException) -> None:
        self._free += 1
        info = loaded.info
        if isinstance(results, BaseException):
            results = [internal_error(info.name, results)] * len(batch)
        for p, result in zip(batch, results, strict=True):
            p.state = PendingState.DONE
            if p.future.done():
                continue
            if isinstance(result, SwarmdError):
                p.future.set_exception(result)
            else:
                p.future.set_result(InferResult(info.name, info.version, dict(zip(p.outputs, result, strict=True))))
        self._pump()

    async def put_model(self, upload: UploadedModel) -> ModelMeta:
        check_name(upload.name)
        existing = self._models.get(upload.name, {})
        version = upload.version
        if version is None:
            version = next_version(existing)
        check_version(version)
        if version in existing:
            if existing[version].info.digest == upload.sha256:
                return existing[version].info
            raise SwarmdError(ERR_CONFLICT, f"model {upload.name!r} version {version!r} exists with another digest")
        vdir = self.models_dir / upload.name / version
        tmp = self.models_dir / upload.name / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            shutil.move(str(upload.path), tmp / "model.onnx")
            meta = {
                "digest": upload.sha256,
                "tags": upload.tags,
                "description": upload.description,
                "created": time.time(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            self._runtime(tmp / "model.onnx")  # refuse a file onnxruntime cannot load
            os.replace(tmp, vdir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._load(upload.name, version, vdir)

    def status(self) -> dict[str, Any]:
        return {"backend": "local", "models": sorted(self._models), "workers": 1}

    async def model_statistics(self, model: str | None, version: str | None) -> list[dict[str, Any]]:
        raise SwarmdError(ERR_NOT_IMPLEMENTED, "a standalone gateway (gateway.local_models_dir) keeps no model "
                                                 "statistics; workers do: run the model on a worker")

    def worker_count(self) -> int:
        return 1

    # -- the model repository (Triton's load/unload/index): models_dir is the repository -------

    def _on_disk(self, model: str) -> list[tuple[str, Path]]:
        mdir = self.models_dir / model
        if not mdir.is_dir() or model.startswith("."):
            return []
        return sorted(((v.name, v) for v in mdir.iterdir() if v.is_dir() and (v / "model.onnx").is_file()
                       and not v.name.startswith(".")), key=lambda t: version_key(t[0]))

    async def repository_index(self) -> list[dict[str, str]]:
        out = []
        names = {p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        for name in sorted(names | set(self._models)):
            loaded = self._models.get(name, {})
            versions = {v for v, _ in self._on_disk(name)} | set(loaded)
            for v in sorted(versions, key=version_key):
                if v in loaded:
                    out.append({"name": name, "version": v, "state": "READY", "reason": ""})
                else:
                    out.append({"name": name, "version": v, "state": "UNAVAILABLE", "reason": "unloaded"})
        return out

    async def load_model(self, model: str) -> dict[str, Any]:
        """(Re)load every version of `model` found under models_dir: a version whose file
        changed on disk is read again, like Triton's load of an already loaded model."""
        check_name(model)
        found = self._on_disk(model)
        if not found:
            raise not_found(model, None)
        loop = asyncio.get_running_loop()
        runtimes = [(v, vdir, await loop.run_in_executor(self._pool, self._runtime, vdir / "model.onnx"))
                    for v, vdir in found]
        self._models.pop(model, None)  # versions gone from disk are gone from memory too
        self._latest.pop(model, None)
        for v, vdir, runtime in runtimes:
            self._load(model, v, vdir, runtime)
        return {"model": model, "loaded": [v for v, _, _ in runtimes]}

    async def unload_model(self, model: str) -> dict[str, Any]:
        check_name(model)
        versions = self._models.pop(model, None)
        self._latest.pop(model, None)
        if versions is None and not self._on_disk(model):
            raise not_found(model, None)
        return {"model": model, "unloaded": sorted(versions or (), key=version_key)}
