"""The store role: serves the model store core over RPC and announces what it holds;
replication between stores (keeping every blob at `replication_factor` live
stores) is its mixin `store_replication.Replication`.

Methods (CONTRACTS.md): listModels, getModel, uploadStatus, deleteModel (w),
downloadBlob (stream), uploadModel (stream, w); plus storeState, which stores
call on each other to plan replication. Slow work (hashing, fsync, ONNX
parsing) runs in threads so one big upload never stalls other callers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CORRUPT,
    ERR_NOT_FOUND,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.names import ModelMeta, check_digest
from swarmd.node.deadline import within
from swarmd.roles.base import NodeContext, Role
from swarmd.roles.store_replication import PAGE_ROWS, Replication
from swarmd.rpc.params import as_params, int_param, str_param
from swarmd.store.blobs import hash_file
from swarmd.store.core import ModelStore, PushRequest
from swarmd.store.onnxsig import warm_up
from swarmd.store.transfer import BatchWriter, ReadAhead
from swarmd.topics import STORES, blob_topic, model_topic

MAX_INT = 2**63 - 1  # the largest integer param (msgpack int64)


class StoreRole(Replication, Role):
    name = "store"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.config = ctx.settings.store
        self.config.validate()
        self.store: ModelStore | None = None
        self.key = ctx.identity.public_hex
        self._upload_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # digest -> (lock, holders + waiters)
        self._downloads: dict[bytes, int] = {}  # caller key -> downloads it is running now
        self._announced: set[str] = set()
        self._announced_status: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._round_done = asyncio.Event()
        self.rounds = 0
        self.pulled = 0
        self._peers: dict[str, Any] = {}  # static peers' open connections, by key
        self._records: dict[str, Any] = {}  # STORES records from the last lookup, by key
        self._unreachable: set[str] = set()
        self._untrusted: set[str] = set()  # logged once each
        self._cursors: dict[str, int] = {}  # peer key -> change number of its catalog we have seen
        self._more = False  # a peer has changes we did not take this round
        self._more_rounds = 0
        # deletions, made on other stores, of rows we do not hold: a copy of such a row from a
        # store that has not heard of the deletion yet is refused (bounded, in memory only)
        self._deleted_elsewhere: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._full_round = False
        self._static_peers = [self._parse_peer(p) for p in self.config.peers]
        self.log = logger.bind(role="store", node=self.key[:16])

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.store = await asyncio.to_thread(ModelStore, self.ctx.data_dir / "store", self.config)
        await asyncio.to_thread(warm_up)
        m = self.ctx.methods
        if m is not None:
            m.register("listModels", self.list_models, op="r")
            m.register("getModel", self.get_model, op="r")
            m.register("uploadStatus", self.upload_status, op="r")
            m.register("deleteModel", self.delete_model, op="w")
            m.register("storeState", self.store_state, op="r", roles=("store",))  # replication peers only
            m.register_stream("downloadBlob", self.download_blob, op="r")
            m.register_stream("uploadModel", self.upload_model, op="w")
        if self.ctx.swarm is not None:
            self._announced_status = self.store.status()
            await self.ctx.swarm.join(STORES, announce=True, lookup=True, payload=self._announced_status, live=True)
            await self._announce()
        self.start_replication()
        self.log.bind(event="store_started", **self.store.status()).info("store serving")

    async def stop(self) -> None:
        await self.close_tasks(10.0)  # the replication loop
        m = self.ctx.methods
        if m is not None:
            for name in ("listModels", "getModel", "uploadStatus", "deleteModel", "storeState", "downloadBlob",
                         "uploadModel"):
                m.unregister(name)
        if self.ctx.swarm is not None:  # withdraw every announcement at once, bounded
            bound = self.ctx.swarm.config.leave_timeout
            leaves = [within(self.ctx.swarm.leave(t), bound) for t in sorted(self._announced) + [STORES]]
            await asyncio.gather(*leaves, return_exceptions=True)
            self._announced.clear()
        if self.store is not None:
            self.store.close()

    def metrics(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        s = self.store.status() if self.store is not None else {}
        return [GaugeMetricFamily("swarmd_store_bytes", "bytes of model blobs held", value=s.get("bytes", 0)),
                GaugeMetricFamily("swarmd_store_models", "model versions in the catalog", value=s.get("models", 0))]

    def status(self) -> dict[str, Any]:
        s = self.store.status() if self.store is not None else {}
        return {**s, "replication_rounds": self.rounds, "pulled": self.pulled}

    async def blob_path(self, digest: str) -> Path:
        """A verified local path of blob digest, for a co-located worker (no copy, no network)."""
        return await asyncio.to_thread(self.core.blobs.verify, check_digest(digest))

    @property
    def core(self) -> ModelStore:
        assert self.store is not None, "store role not started"
        return self.store

    # -- methods ---------------------------------------------------------------

    async def list_models(self, ctx: Any, params: Any) -> dict[str, Any]:
        m = "listModels"
        p = as_params(params, m, ("name", "tag", "digest", "include_deleted"))
        include_deleted = bool(p.get("include_deleted", False))
        digest = str_param(p, "digest", m)
        if digest is not None:
            check_digest(digest)
        name, tag = str_param(p, "name", m), str_param(p, "tag", m)
        if include_deleted or digest is not None:
            self.core.list(name=name, tag=tag)  # validates name and tag
            rows = self.core.catalog.list(name=name, tag=tag, digest=digest, include_deleted=include_deleted)
        else:
            rows = self.core.list(name=name, tag=tag)
        return {"models": [m.to_dict(replication=include_deleted) for m in rows]}

    async def get_model(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = as_params(params, "getModel", ("name", "version"), ("name",))
        name = str_param(p, "name", "getModel")
        return self.core.get(name, str_param(p, "version", "getModel")).to_dict()  # type: ignore[arg-type]

    async def upload_status(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = as_params(params, "uploadStatus", ("sha256",), ("sha256",))
        return {"received": self.core.blobs.received(check_digest(p["sha256"]))}

    async def delete_model(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = as_params(params, "deleteModel", ("name", "version"), ("name", "version"))
        row = await asyncio.to_thread(
            self.core.delete, str_param(p, "name", "deleteModel"), str_param(p, "version", "deleteModel")
        )
        self._wake.set()  # the loop withdraws the announcements; the caller does not wait on the DHT
        return {"deleted": row.to_dict()}

    async def store_state(self, ctx: Any, params: Any) -> dict[str, Any]:
        """Our holdings, and the catalog changes after change number `since` (one page)."""
        p = as_params(params, "storeState", ("since", "limit"))
        since = int_param(p, "since", "storeState", 0, 0, MAX_INT)
        limit = int_param(p, "limit", "storeState", PAGE_ROWS, 0, MAX_INT)
        core = self.core

        def read() -> dict[str, Any]:
            rows, cursor, head = core.catalog.changes(since, max(1, min(limit, PAGE_ROWS)))
            return {
                "have": sorted(core.holdings()),
                "missing": sorted(core.missing()),
                "refused": sorted(core.catalog.tombstoned_digests()),
                "models": [m.to_dict(replication=True) for m in rows],
                "cursor": cursor,
                "head": head,
                "more": cursor < head,
            }

        return await asyncio.to_thread(read)

    async def download_blob(self, ctx: Any, params: Any, stream: Any) -> dict[str, Any]:
        # Each download holds up to two chunks and its share of the connection's write buffer
        # while a client that does not read keeps it waiting: bound them per key and in total.
        cfg = self.config
        mine = self._downloads.get(ctx.peer, 0)
        if mine >= cfg.max_downloads_per_peer:
            raise SwarmdError(ERR_OVERLOADED, f"this key already runs {mine} downloads (store.max_downloads_per_peer)")
        total = sum(self._downloads.values())
        if total >= cfg.max_downloads:
            raise SwarmdError(ERR_OVERLOADED, f"store is serving {total} downloads (store.max_downloads); retry")
        self._downloads[ctx.peer] = mine + 1
        try:
            return await self._download_blob(params, stream)
        except TimeoutError:
            raise SwarmdError(
                ERR_TIMEOUT, f"the client read nothing for {cfg.transfer_timeout:g} s (store.transfer_timeout)"
            ) from None
        finally:
            left = self._downloads.get(ctx.peer, 1) - 1
            if left > 0:
                self._downloads[ctx.peer] = left
            else:
                self._downloads.pop(ctx.peer, None)

    async def _download_blob(self, params: Any, stream: Any) -> dict[str, Any]:
        p = as_params(params, "downloadBlob", ("digest", "offset"), ("digest",))
        digest = check_digest(p["digest"])
        offset = int_param(p, "offset", "downloadBlob", 0, 0, MAX_INT)
        core = self.core
        if not core.catalog.referenced(digest):
            raise SwarmdError(ERR_NOT_FOUND, f"no model in this store has blob {digest}")
        size = core.blobs.size(digest)
        if offset > size:
            raise SwarmdError(ERR_BAD_REQUEST, f"offset must be between 0 and {size}, got {offset}")
        path = core.blobs.path(digest)
        # Verify while sending: what we served must hash to the digest, or the client
        # gets ERR_CORRUPT instead of a result, and we quarantine the blob. A thread reads
        # and hashes the next chunk while this one is sent.
        # (awaiting a thread first also moves this handler into its own task, which
        # asyncio.timeout below needs: the RPC layer runs a handler's first step inline)
        h = await asyncio.to_thread(hash_file, path, offset) if offset else await asyncio.to_thread(hashlib.sha256)
        sent = offset
        timeout = self.config.transfer_timeout
        reader = ReadAhead(path, offset, self.config.chunk_bytes, h)
        try:
            while buf := await reader.next():
                sent += len(buf)
                async with asyncio.timeout(timeout):
                    await stream.send(buf)
        finally:
            await reader.close()
        if h.hexdigest() != digest:
            core.blobs.quarantine(digest, f"content hashes to {h.hexdigest()} while serving")
            self._wake.set()
            raise SwarmdError(ERR_CORRUPT, f"blob {digest} is corrupt on this store; quarantined, try another store")
        return {"size": sent, "digest": digest}

    async def upload_model(self, ctx: Any, params: Any, stream: Any) -> dict[str, Any]:
        m = "uploadModel"
        p = as_params(params, m, ("name", "version", "size", "sha256", "tags", "description", "offset"),
                      ("name", "size", "sha256"))
        req = PushRequest(
            name=p["name"], digest=p["sha256"], size=int_param(p, "size", m, 0, 0, MAX_INT), version=p.get("version"),
            tags=p.get("tags"), description=p.get("description"),
        ).check()
        offset = int_param(p, "offset", m, 0, 0, MAX_INT)
        lock, users = self._upload_locks.get(req.digest, (asyncio.Lock(), 0))
        self._upload_locks[req.digest] = (lock, users + 1)
        try:
            # Two pushes of the same bytes take turns; the second usually finds the blob done.
            async with lock:
                meta = await self._receive(ctx, req, offset, stream)
        finally:
            lock, users = self._upload_locks[req.digest]
            if users <= 1:
                del self._upload_locks[req.digest]
            else:
                self._upload_locks[req.digest] = (lock, users - 1)
        self._wake.set()  # announce and replicate in the background
        return meta.to_dict()

    async def _receive(self, ctx: Any, req: PushRequest, offset: int, stream: Any) -> ModelMeta:
        core = self.core
        up = await asyncio.to_thread(core.begin, req)
        writer = BatchWriter(up.write_many)
        done = False
        try:
            if offset > up.offset:
                raise SwarmdError(
                    ERR_BAD_REQUEST,
                    f"cannot resume at byte {offset}: this store has {up.offset} bytes of {req.digest}; "
                    f"resume from {up.offset}",
                    {"received": up.offset},
                )
            skip = up.offset - offset  # bytes the client re-sends that we already have
            timeout = self.config.transfer_timeout
            recv = stream.recv
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        buf = await recv()
                except TimeoutError:
                    raise SwarmdError(ERR_TIMEOUT, f"no upload data for {timeout:g} s") from None
                if buf is None:
                    break
                if skip:
                    cut = min(skip, len(buf))
                    skip -= cut
                    buf = buf[cut:]
                if buf:
                    await writer.add(buf)  # hashed and written in a thread while the next bytes arrive
            await writer.flush()
            uploader = ctx.peer.hex() if isinstance(getattr(ctx, "peer", None), bytes) else ""
            done = True
            return await asyncio.to_thread(core.complete, up, uploader=uploader)
        finally:
            if not done:  # the client went away: keep what arrived for its resume
                writer.salvage()
            up.close()

    # -- announcements -----------------------------------------------------------

    async def _announce(self) -> None:
        """Announce model_topic(name) / blob_topic(digest) for what we hold; withdraw the rest."""
        swarm = self.ctx.swarm
        if swarm is None or self.store is None:
            return
        models = {model_topic(m.name) for m in self.core.list()}
        want = models | {blob_topic(d) for d in self.core.holdings()}
        for topic in sorted(want - self._announced):
            # model topics say "a live store has NAME": short-lived, refreshed; blob topics
            # (one per blob, many) keep the long TTL: a fetch from a dead store fails over
            await swarm.join(topic, announce=True, lookup=False, live=topic in models)
            self._announced.add(topic)
        for topic in sorted(self._announced - want):
            await swarm.leave(topic)
            self._announced.discard(topic)
        status = self.core.status()
        if status != self._announced_status:
            await swarm.update(STORES, status)
            self._announced_status = status


ROLE = StoreRole
