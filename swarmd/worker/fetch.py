"""Getting a model from the swarm's stores: resolve its name, download its blob.

A name[:version] is resolved to metadata (digest, size, signature) by asking
a store announcing model_topic(name); the blob is then pulled by digest from
any store announcing blob_topic(digest), resuming from the bytes already
received when a store fails midway, and verified against its sha256 before it
enters the cache. Concurrent requests for the same digest share one download.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_CORRUPT,
    ERR_NOT_FOUND,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.topics import blob_topic, model_topic
from swarmd.worker.cache import ModelCache, check_digest
from swarmd.worker.config import WorkerConfig


def _record_key(record: Any) -> bytes:
    key = record.public_key if hasattr(record, "public_key") else record["public_key"]
    return bytes.fromhex(key) if isinstance(key, str) else bytes(key)


def check_metadata(meta: Any, name: str) -> dict[str, Any]:
    """The fields of a store's getModel answer the worker relies on, type-checked."""
    if not isinstance(meta, dict):
        raise SwarmdError(ERR_PROTOCOL, f"store answered getModel for '{name}' with {type(meta).__name__}, not a map")
    check_digest(meta.get("digest"))
    size = meta.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SwarmdError(ERR_PROTOCOL, f"store metadata for '{name}' has no valid size: {size!r:.40}")
    if not isinstance(meta.get("version"), str):
        raise SwarmdError(ERR_PROTOCOL, f"store metadata for '{name}' has no version string")
    fmt = meta.get("format", "onnx")
    if fmt != "onnx":
        raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' is stored as {fmt!r}; this worker runs onnx only")
    return meta


class ModelFetcher:
    def __init__(
        self,
        swarm: Any,
        cache: ModelCache,
        config: WorkerConfig,
        local_blob: Callable[[str], Awaitable[Path | None]] | None = None,
        local_meta: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
    ) -> None:
        self.swarm = swarm
        self.cache = cache
        self.config = config
        # A store in this same process: its verified blob is used in place, no copy, no socket.
        self.local_blob = local_blob
        self.local_meta = local_meta  # that store's getModel, asked first: no lookup, no race with its announce
        self._downloads: dict[str, asyncio.Future[Path]] = {}
        # Versions are immutable, so a (name, version) once resolved needs no store again: a model
        # unloaded and loaded later comes straight from the cache even if every store is gone.
        self._known: dict[tuple[str, str], dict[str, Any]] = {}
        self.log = logger.bind(part="worker-fetch")

    async def _stores(self, topic: str) -> list[bytes]:
        async with asyncio.timeout(self.config.store_timeout):
            records = await self.swarm.lookup_all(topic)
        keys = [_record_key(r) for r in records]
        random.shuffle(keys)  # spread load across stores holding the same thing
        return keys

    async def resolve(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Model metadata from the first store that answers; ERR_NOT_FOUND if none has it."""
        if version not in (None, "", "latest") and (name, version) in self._known:
            return self._known[(name, version)]
        params: dict[str, Any] = {"name": name}
        if version not in (None, "", "latest"):
            params["version"] = version
        if self.local_meta is not None:
            try:
                meta = check_metadata(await self.local_meta(params), name)
                self._remember(name, meta)
                return meta
            except SwarmdError as e:
                if e.code != ERR_NOT_FOUND:
                    raise
        stores = await self._stores(model_topic(name))
        if not stores:
            raise SwarmdError(ERR_NOT_FOUND, f"no store announces model '{name}'")
        last: SwarmdError | None = None
        for key in stores:
            try:
                meta = check_metadata(
                    await self.swarm.request(key, "getModel", params, timeout=self.config.store_timeout), name
                )
                self._remember(name, meta)
                return meta
            except SwarmdError as e:
                last = e
                self.log.bind(event="resolve_failed", store=key.hex()[:16], code=e.code).info(
                    "store could not resolve {}: {}", name, e.message)
        assert last is not None
        if last.code == ERR_NOT_FOUND:
            raise SwarmdError(ERR_NOT_FOUND, f"model '{name}'{f' version {version!r}' if version else ''} not found in any store")
        raise SwarmdError(ERR_UNAVAILABLE, f"no store could resolve model '{name}': {last.code}: {last.message}")

    def _remember(self, name: str, meta: dict[str, Any]) -> None:
        if len(self._known) < 4096:
            self._known[(name, meta["version"])] = meta

    async def fetch(self, meta: dict[str, Any]) -> Path:
        """The verified blob for `meta` in the cache, downloading it once if missing."""
        digest, size = meta["digest"], meta["size"]
        path = self.cache.get(digest)
        if path is not None:
            return path
        if self.local_blob is not None and (path := await self.local_blob(digest)) is not None:
            return path
        if size > self.config.max_model_bytes:
            raise SwarmdError(ERR_TOO_LARGE, f"model blob of {size} bytes exceeds worker.max_model_bytes ({self.config.max_model_bytes})")
        if digest in self._downloads:
            return await asyncio.shield(self._downloads[digest])
        fut: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._downloads[digest] = fut
        try:
            async with asyncio.timeout(self.config.fetch_timeout):
                path = await self._download(digest, size)
            fut.set_result(path)
            return path
        except TimeoutError:
            err = SwarmdError(ERR_UNAVAILABLE, f"downloading blob {digest[:16]} took longer than {self.config.fetch_timeout}s")
            fut.set_exception(err)
            fut.exception()
            raise err from None
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else SwarmdError(ERR_UNAVAILABLE, "download cancelled"))
            fut.exception()
            raise
        finally:
            del self._downloads[digest]

    async def _download(self, digest: str, size: int) -> Path:
        own = getattr(self.swarm, "public_key", None)
        stores = [k for k in await self._stores(blob_topic(digest)) if k != own]
        if not stores:
            raise SwarmdError(ERR_NOT_FOUND, f"no store announces blob {digest}")
        writer = self.cache.writer(digest, size)
        try:
            last: SwarmdError | None = None
            for key in stores:
                try:
                    await self._pull(key, digest, writer)
                    path = writer.commit()
                    self.log.bind(event="blob_fetched", digest=digest[:16], size=size, store=key.hex()[:16]).info(
                        "fetched model blob")
                    return path
                except SwarmdError as e:
                    last = e
                    self.log.bind(event="blob_fetch_failed", store=key.hex()[:16], code=e.code,
                                  received=writer.received).warning("download from store failed: {}", e.message)
                    if e.code == ERR_CORRUPT:  # what we have may be wrong: start over from the next store
                        writer.abort()
                        writer = self.cache.writer(digest, size)
            assert last is not None
            raise SwarmdError(ERR_UNAVAILABLE, f"no store delivered blob {digest[:16]}: {last.code}: {last.message}")
        finally:
            writer.abort()

    async def _pull(self, key: bytes, digest: str, writer: Any) -> None:
        """Append the rest of the blob from one store, from writer.received on."""
        try:
            await self._pull_from(key, digest, writer)
        except TimeoutError:
            raise SwarmdError(ERR_TIMEOUT, f"store {key.hex()[:16]} stalled sending blob {digest[:16]}") from None

    async def _pull_from(self, key: bytes, digest: str, writer: Any) -> None:
        async with asyncio.timeout(self.config.store_timeout):
            peer = await self.swarm.connect(key)
        stream = await peer.open_stream(
            "downloadBlob", {"digest": digest, "offset": writer.received}, timeout=self.config.fetch_timeout
        )
        async with stream:
            while True:
                async with asyncio.timeout(self.config.store_timeout):
                    chunk = await stream.recv()
                if chunk is None:
                    break
                writer.write(chunk)
            async with asyncio.timeout(self.config.store_timeout):
                await stream.result()
        if writer.received != writer.size:
            raise SwarmdError(ERR_PROTOCOL, f"store ended blob {digest[:16]} at {writer.received} of {writer.size} bytes")
