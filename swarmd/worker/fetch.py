"""Getting a model from the swarm's stores: resolve its name, download its blob.

A name[:version] is resolved to metadata (digest, size, signature) by asking
the trusted stores announcing model_topic(name) (a version asked for must come
back as that version; "latest" is the newest live version of their merged
catalogs by swarmd.versions); the blob is then pulled by digest from a trusted
store announcing blob_topic(digest), resuming from the bytes already received
when a store fails midway, and verified against its sha256 before it enters
the cache. Concurrent requests for the same digest share one download.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

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
from swarmd.names import ModelMeta, check_record
from swarmd.topics import STORES, blob_topic, model_topic
from swarmd.versions import version_key
from swarmd.worker.cache import ModelCache
from swarmd.worker.config import WorkerConfig

STORE_KEYS_TTL = 10.0  # seconds a lookup of which stores hold a model is reused for version checks
MAX_VERSIONS = 10_000  # rows of one store's listing of one name we read


def check_metadata(meta: Any, name: str) -> ModelMeta:
    """A store's record of a model (getModel answer, listModels row), checked as every store
    checks one (swarmd.names.check_record); a bad one is the store's protocol error."""
    try:
        meta = check_record(meta)
    except SwarmdError as e:
        raise SwarmdError(ERR_PROTOCOL, f"store metadata for '{name}': {e.message}") from None
    if meta.format != "onnx":
        raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' is stored as {meta.format!r}; this worker runs onnx only")
    return meta


def _check_row(row: Any, name: str) -> ModelMeta | None:
    """One row of a store's listModels answer for `name`, or None when it is not one."""
    try:
        meta = check_metadata(row, name)
    except SwarmdError:
        return None
    return meta if meta.name == name else None


class ModelFetcher:
    """Resolves names and versions against the catalogs of trusted stores, and fetches blobs.

    Only stores `trusted(key)` admits are asked anything or downloaded from: a
    key that merely announces a model topic gets no say in what a worker runs.
    The latest version of a name is the newest live version, by the one
    version order (swarmd.versions), of the merged catalogs of those stores.
    """

    def __init__(
        self,
        swarm: Any,
        cache: ModelCache,
        config: WorkerConfig,
        local_blob: Callable[[str], Awaitable[Path | None]] | None = None,
        local_call: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
        trusted: Callable[[bytes, Any], bool] | None = None,
    ) -> None:
        self.swarm = swarm
        self.cache = cache
        self.config = config
        # A store in this same process: its verified blob is used in place, no copy, no socket.
        self.local_blob = local_blob
        # That store's methods, asked first: no lookup, no race with its announce. Raises
        # ERR_NOT_FOUND when there is no co-located store.
        self.local_call = local_call
        self.trusted = trusted or (lambda key, record: True)  # (key, its DHT record) -> may we use it?
        self._downloads: dict[str, asyncio.Future[Path]] = {}
        # Versions are immutable, so a (name, version) once resolved needs no store again: a model
        # unloaded and loaded later comes straight from the cache even if every store is gone.
        self._known: dict[tuple[str, str], ModelMeta] = {}
        self._names: set[str] = set()  # names some trusted store has listed: they exist
        self._store_keys: dict[str, tuple[float, list[bytes]]] = {}  # topic -> (when looked up, trusted keys)
        self.log = logger.bind(part="worker-fetch")

    async def _stores(self, topic: str, *, fresh: bool = True) -> list[bytes]:
        """Trusted stores announcing topic (a lookup at most every STORE_KEYS_TTL s unless fresh)."""
        loop = asyncio.get_running_loop()
        hit = self._store_keys.get(topic)
        if not fresh and hit is not None and loop.time() - hit[0] < STORE_KEYS_TTL and hit[1]:
            keys = list(hit[1])
        else:
            async with asyncio.timeout(self.config.store_timeout):
                records = await self.swarm.lookup_all(topic)
            keys = []
            for r in records:
                key = r.public_key
                if self.trusted(key, r):
                    keys.append(key)
                else:
                    self.log.bind(event="untrusted_store", peer=key.hex()[:16]).debug(
                        "ignoring {} on {}: not a trusted store", key.hex()[:16], topic)
            if len(self._store_keys) > 4096:
                self._store_keys.clear()
            self._store_keys[topic] = (loop.time(), keys)
        random.shuffle(keys)  # spread load across stores holding the same thing
        return keys

    async def _any_store_reachable(self) -> bool:
        """Does any trusted store announce itself at all? (tells 'no such model' from 'no store')"""
        try:
            return bool(await self._stores(STORES, fresh=False))
        except (SwarmdError, TimeoutError):
            return False

    async def _ask(self, key: bytes | None, method: str, params: dict[str, Any]) -> Any:
        if key is None:
            assert self.local_call is not None
            return await self.local_call(method, params)
        return await self.swarm.request(key, method, params, timeout=self.config.store_timeout)

    async def versions(self, name: str) -> list[ModelMeta]:
        """Live versions of name, merged over the trusted stores that hold it (oldest first).

        Each store answers with its rows, tombstones included; a (name, version)
        takes the row with the newest `updated`, as replication does, so a
        version deleted on one store is gone here before replication spreads it.
        ERR_NOT_FOUND when no store holds a live version, ERR_UNAVAILABLE when no
        store answered.
        """
        params = {"name": name, "include_deleted": True}
        sources: list[bytes | None] = [None] if self.local_call is not None else []
        try:
            sources += [k for k in await self._stores(model_topic(name), fresh=False)
                        if k != getattr(self.swarm, "public_key", None)]
        except TimeoutError:
            pass
        if not sources:
            await self._none_announce(name)

        async def one(key: bytes | None) -> Any:
            try:
                async with asyncio.timeout(self.config.store_timeout):
                    return await self._ask(key, "listModels", params)
            except (SwarmdError, TimeoutError) as e:
                return e

        answers = await asyncio.gather(*(one(k) for k in sources))
        rows: dict[str, ModelMeta] = {}
        answered = 0
        for key, ans in zip(sources, answers, strict=True):
            if isinstance(ans, BaseException):
                if key is not None:
                    self.log.bind(event="resolve_failed", store=key.hex()[:16]).info(
                        "store could not list {}: {}", name, ans)
                continue
            models = ans.get("models") if isinstance(ans, dict) else None
            if not isinstance(models, list):
                continue
            if key is None and not models:
                continue  # the co-located store does not hold it: no say (others may)
            answered += 1
            for row in models[:MAX_VERSIONS]:
                meta = _check_row(row, name)
                if meta is None:
                    continue
                have = rows.get(meta.version)
                if have is None or meta.updated > have.updated:
                    rows[meta.version] = meta
        if not answered:
            remote = [a for k, a in zip(sources, answers, strict=True) if k is not None]
            if not remote or any(not isinstance(a, BaseException) for a in remote):
                await self._none_announce(name)
            raise SwarmdError(ERR_UNAVAILABLE, f"no store holding model '{name}' could be reached; retry shortly")
        live = [m for m in rows.values() if m.deleted is None]
        if not live:
            self._names.discard(name)
            for key in [k for k in self._known if k[0] == name]:
                self._known.pop(key, None)
            raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' not found in any store")
        self._names.add(name)
        gone = {v for (n, v) in self._known if n == name} - {m.version for m in live}
        for v in gone:  # deleted: a request naming it must not be served from what we knew
            self._known.pop((name, v), None)
        for m in live:
            self._remember(name, m)
        return sorted(live, key=lambda m: version_key(m.version))

    async def _none_announce(self, name: str) -> NoReturn:
        if name in self._names or not await self._any_store_reachable():
            raise SwarmdError(ERR_UNAVAILABLE, f"no store holding model '{name}' can be reached; retry shortly")
        raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' not found in any store")

    async def resolve(self, name: str, version: str | None = None) -> ModelMeta:
        """Metadata of name:version, or of the latest version when None; checked against the name asked."""
        if version in (None, "", "latest"):
            return (await self.versions(name))[-1]
        if (name, version) in self._known:
            return self._known[(name, version)]
        params: dict[str, Any] = {"name": name, "version": version}
        sources: list[bytes | None] = [None] if self.local_call is not None else []
        try:
            sources += await self._stores(model_topic(name))
        except TimeoutError:
            pass
        last: SwarmdError | None = None
        for key in sources:
            try:
                meta = check_metadata(await self._ask(key, "getModel", params), name)
                if meta.name != name or meta.version != version:
                    raise SwarmdError(ERR_PROTOCOL, f"store answered getModel {name}:{version} with "
                                      f"{meta.name!r:.40}:{meta.version!r:.40}")
                self._names.add(name)
                self._remember(name, meta)
                return meta
            except SwarmdError as e:
                if key is None:
                    continue  # no co-located store, or it lacks this version: ask the swarm's
                last = e
                self.log.bind(event="resolve_failed", store=key.hex()[:16], code=e.code).info(
                    "store could not resolve {}:{}: {}", name, version, e.message)
        if last is None:
            await self._none_announce(name)
        if last.code == ERR_NOT_FOUND:
            raise SwarmdError(ERR_NOT_FOUND, f"model '{name}' version {version!r} not found in any store")
        raise SwarmdError(ERR_UNAVAILABLE, f"no store could resolve model '{name}': {last.code}: {last.message}")

    def _remember(self, name: str, meta: ModelMeta) -> None:
        if len(self._known) < 4096:
            self._known[(name, meta.version)] = meta

    async def fetch(self, meta: ModelMeta) -> Path:
        """The verified blob for `meta` in the cache, downloading it once if missing."""
        digest, size = meta.digest, meta.size
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
        stores = [k for k in await self._stores(blob_topic(digest)) if k != own]  # trusted ones only
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
