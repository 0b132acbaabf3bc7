"""The store role: serves the model store core over RPC, announces what it holds,
and keeps every blob at `replication_factor` live stores.

Methods (CONTRACTS.md): listModels, getModel, uploadStatus, deleteModel (w),
downloadBlob (stream), uploadModel (stream, w); plus storeState, which stores
call on each other to plan replication. Slow work (hashing, fsync, ONNX
parsing) runs in threads so one big upload never stalls other callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    ERR_CORRUPT,
    ERR_NOT_FOUND,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.node.deadline import within
from swarmd.roles.base import NodeContext, Role
from swarmd.settings import parse_hostport
from swarmd.store.blobs import check_digest, hash_file
from swarmd.store.catalog import ModelMeta, check_description, check_name, check_tags, check_version, now
from swarmd.store.core import ModelStore, PushRequest
from swarmd.store.onnxsig import warm_up
from swarmd.store.replication import Pull, from_the_future, plan_replication, rows_to_adopt
from swarmd.store.transfer import BatchWriter, ReadAhead, pull_stream
from swarmd.topics import STORES, blob_topic, model_topic

MAX_STATE_ROWS = 100_000  # bound on a peer's digest lists we are willing to read
PAGE_ROWS = 2_000  # catalog changes one storeState answer carries (and we take from one peer per round)
MAX_ROUND_ROWS = 20_000  # catalog changes taken from all peers in one round; the rest wait for the next
MAX_ROWS_PER_BLOB = 64  # name:version rows a replica pull may publish for one blob
MAX_EAGER_ROUNDS = 8  # rounds run back to back while peers have more changes, before the interval again
MAX_UNHELD_DELETIONS = 10_000  # remembered deletions of rows we do not hold (in memory, oldest dropped)


def _params(params: Any, allowed: set[str], required: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise SwarmdError(ERR_BAD_REQUEST, f"params must be a map, got {type(params).__name__}")
    unknown = set(params) - allowed
    if unknown:
        raise SwarmdError(
            ERR_BAD_REQUEST, f"unknown params {sorted(map(str, unknown))}; expected some of {sorted(allowed)}"
        )
    missing = required - set(params)
    if missing:
        raise SwarmdError(ERR_BAD_REQUEST, f"missing params {sorted(missing)}")
    return params


def _opt_str(p: dict[str, Any], key: str) -> str | None:
    v = p.get(key)
    if v is not None and not isinstance(v, str):
        raise SwarmdError(ERR_BAD_REQUEST, f"{key} must be a string, got {type(v).__name__}")
    return v


def _opt_int(p: dict[str, Any], key: str, default: int = 0) -> int:
    v = p.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SwarmdError(ERR_BAD_REQUEST, f"{key} must be a non-negative integer, got {v!r:.40}")
    return v


def _meta_from_wire(obj: Any) -> ModelMeta:
    """A catalog row from a peer, type-checked field by field."""
    if not isinstance(obj, dict):
        raise SwarmdError(ERR_BAD_REQUEST, "catalog row must be a map")
    try:
        deleted = obj.get("deleted")
        m = ModelMeta(
            name=obj["name"], version=obj["version"], digest=obj["digest"], size=obj["size"],
            format=obj.get("format", "onnx"), tags=obj.get("tags", []), description=obj.get("description", ""),
            created=float(obj["created"]), uploader=obj.get("uploader", ""),
            deleted=float(deleted) if deleted is not None else None, updated=float(obj["updated"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"malformed catalog row from peer: {e!r:.120}") from None
    for key, tp in (("size", int), ("uploader", str), ("format", str)):
        if not isinstance(getattr(m, key), tp) or isinstance(getattr(m, key), bool):
            raise SwarmdError(ERR_BAD_REQUEST, f"catalog row field {key} must be {tp.__name__}")
    check_name(m.name)
    check_version(m.version)
    check_digest(m.digest)
    m.tags = check_tags(m.tags)
    m.description = check_description(m.description)
    if not all(math.isfinite(t) for t in (m.created, m.updated, m.deleted or 0.0)):
        raise SwarmdError(ERR_BAD_REQUEST, "catalog row times must be finite numbers")
    if m.size < 0 or len(m.uploader) > 64 or m.format != "onnx":
        raise SwarmdError(ERR_BAD_REQUEST, "catalog row has a negative size, a long uploader or a format other than onnx")
    return m


@dataclass
class PeerState:
    """What one store told us about itself in a replication round.

    models: the catalog changes after our cursor for it (one page), not its catalog.
    """

    key: str
    have: set[str]
    missing: set[str]
    refused: set[str]
    models: list[ModelMeta]
    cursor: int = 0
    head: int = 0
    more: bool = False
    dropped: int = field(default=0)
    since: int = 0


def _parse_state(key: str, obj: Any, since: int) -> PeerState:
    """A peer's storeState answer, type-checked (run in a thread: it can be thousands of rows)."""
    if not isinstance(obj, dict):
        raise SwarmdError(ERR_BAD_REQUEST, "storeState answer must be a map")
    sets = {}
    for name in ("have", "missing", "refused"):
        v = obj.get(name, [])
        if not isinstance(v, list) or len(v) > MAX_STATE_ROWS:
            raise SwarmdError(ERR_BAD_REQUEST, f"storeState.{name} must be a list of at most {MAX_STATE_ROWS}")
        sets[name] = {check_digest(d) for d in v}
    rows = obj.get("models", [])
    if not isinstance(rows, list) or len(rows) > PAGE_ROWS:
        raise SwarmdError(ERR_BAD_REQUEST, f"storeState.models must be a list of at most {PAGE_ROWS} rows")
    cursor, head = obj.get("cursor", 0), obj.get("head", 0)
    for v in (cursor, head):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SwarmdError(ERR_BAD_REQUEST, "storeState cursor and head must be non-negative integers")
    if rows and cursor <= since:
        raise SwarmdError(ERR_BAD_REQUEST, "storeState sent changes without moving its cursor")
    t = now()
    models, dropped = [], 0
    for r in rows:
        m = _meta_from_wire(r)
        if from_the_future(m, t):
            dropped += 1
            continue
        models.append(m)
    return PeerState(key, sets["have"], sets["missing"], sets["refused"], models, cursor, head,
                     bool(obj.get("more")), dropped, since)


class StoreRole(Role):
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
        self._loop_task: asyncio.Task[None] | None = None
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

    def set_static_peers(self, entries: list[str]) -> None:
        """Replace the HEXKEY@HOST:PORT stores replicated with besides the swarm's; starts a round."""
        self._static_peers = [self._parse_peer(p) for p in entries]
        self._wake.set()

    @staticmethod
    def _parse_peer(text: str) -> tuple[str, str, int]:
        key, sep, addr = text.partition("@")
        try:
            if not sep or len(bytes.fromhex(key)) != 32:
                raise ValueError
        except ValueError:
            raise SwarmdError(ERR_BAD_REQUEST, f"store.peers entry must be HEXKEY@HOST:PORT, got {text!r}") from None
        host, port = parse_hostport(addr, what="store.peers address")
        return key.lower(), host, port

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

    def start_replication(self) -> None:
        """Run the replication loop (on the node's supervisor; stop() cancels it)."""
        if self._loop_task is None:
            self._loop_task = self.ctx.tasks.spawn(self._replicate_loop(), name="store-replication")

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=10.0)
            if not done:
                self.log.bind(event="stop_slow").warning("replication loop did not stop within 10 s")
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
        p = _params(params, {"name", "tag", "digest", "include_deleted"})
        include_deleted = bool(p.get("include_deleted", False))
        digest = _opt_str(p, "digest")
        if digest is not None:
            check_digest(digest)
        name, tag = _opt_str(p, "name"), _opt_str(p, "tag")
        if include_deleted or digest is not None:
            self.core.list(name=name, tag=tag)  # validates name and tag
            rows = self.core.catalog.list(name=name, tag=tag, digest=digest, include_deleted=include_deleted)
        else:
            rows = self.core.list(name=name, tag=tag)
        return {"models": [m.to_dict(replication=include_deleted) for m in rows]}

    async def get_model(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = _params(params, {"name", "version"}, {"name"})
        name = _opt_str(p, "name")
        return self.core.get(name, _opt_str(p, "version")).to_dict()  # type: ignore[arg-type]

    async def upload_status(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = _params(params, {"sha256"}, {"sha256"})
        return {"received": self.core.upload_status(check_digest(p["sha256"]))}

    async def delete_model(self, ctx: Any, params: Any) -> dict[str, Any]:
        p = _params(params, {"name", "version"}, {"name", "version"})
        row = await asyncio.to_thread(self.core.delete, _opt_str(p, "name"), _opt_str(p, "version"))
        self._wake.set()  # the loop withdraws the announcements; the caller does not wait on the DHT
        return {"deleted": row.to_dict()}

    async def store_state(self, ctx: Any, params: Any) -> dict[str, Any]:
        """Our holdings, and the catalog changes after change number `since` (one page)."""
        p = _params(params, {"since", "limit"})
        since, limit = _opt_int(p, "since"), _opt_int(p, "limit", PAGE_ROWS)
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
        p = _params(params, {"digest", "offset"}, {"digest"})
        digest = check_digest(p["digest"])
        offset = _opt_int(p, "offset")
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
        p = _params(params, {"name", "version", "size", "sha256", "tags", "description", "offset"},
                    {"name", "size", "sha256"})
        req = PushRequest(
            name=p["name"], digest=p["sha256"], size=_opt_int(p, "size"), version=p.get("version"),
            tags=p.get("tags"), description=p.get("description"),
        ).check()
        offset = _opt_int(p, "offset")
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

    # -- replication ---------------------------------------------------------------

    async def _peer_keys(self) -> list[str]:
        """The stores we replicate with: static peers, and those announcing STORES that we trust.

        The one place the peer set is decided (NodeContext.trusts): a key that may not
        write to us gets no say in our catalog by answering storeState either.
        """
        keys = {k for k, _, _ in self._static_peers}  # named by the operator: trusted
        swarm = self.ctx.swarm
        if swarm is not None:
            self._records = {}
            for rec in await swarm.lookup_all(STORES):
                if self.ctx.trusts(rec.public_key, "store", rec, replica=True):
                    self._records[rec.public_key.hex()] = rec
                elif rec.public_key.hex() not in self._untrusted:
                    self._untrusted.add(rec.public_key.hex())
                    self.log.bind(event="replica_refused", peer=rec.public_key.hex()[:16]).warning(
                        "not replicating with store {}: it is not a trusted store of this swarm",
                        rec.public_key.hex()[:16])
            keys |= set(self._records)
        keys.discard(self.key)
        return sorted(keys)

    async def _call(self, key: str, method: str, params: Any, timeout: float) -> Any:
        peer = await self._connect(key)
        return await peer.call(method, params, timeout=timeout)

    async def _connect(self, key: str) -> Any:
        """An RPC connection to store `key`: a static peer's own, or the swarm's pooled one."""
        for k, host, port in self._static_peers:
            if k == key:
                peer = self._peers.get(key)
                if peer is None or peer.is_closed:
                    from swarmd.rpc import connect

                    peer = await connect(self.ctx.identity, host, port, remote_public_key=bytes.fromhex(key),
                                         timeout=self.config.transfer_timeout)
                    self._peers[key] = peer
                return peer
        swarm = self.ctx.swarm
        if swarm is not None:
            async with asyncio.timeout(self.config.transfer_timeout):
                return await swarm.connect(bytes.fromhex(key), self._records.get(key))
        raise SwarmdError(ERR_BAD_REQUEST, f"no way to reach store {key[:16]}")

    async def _replicate_loop(self) -> None:
        self._peers = {}
        timed = False  # woken rounds (upload, delete, corruption) skip the scrub: it competes with transfers
        try:
            while True:
                timed, self._full_round = timed or self._full_round, False
                try:
                    if timed and await asyncio.to_thread(self.core.scrub, self.config.scrub_per_round):
                        self._wake.set()  # something rotted: the next round re-fetches it at once
                    await self._announce()
                    await self.replicate_once()
                    await self._announce()
                    await asyncio.to_thread(self.core.gc)
                except SwarmdError as e:
                    self.log.bind(event="replication_failed", code=e.code).warning("replication round: {}", e.message)
                except (OSError, TimeoutError) as e:  # a bad round must not take the store down; the next one retries
                    self.log.bind(event="replication_failed", error=type(e).__name__).warning(
                        "replication round failed: {!r}", e
                    )
                self.rounds += 1
                self._round_done.set()
                self._wake.clear()
                # a peer has more changes than one round takes: go on at once, a few rounds in a
                # row at most (a peer that always has more must not keep this loop spinning)
                self._more_rounds = self._more_rounds + 1 if self._more else 0
                if self._more and self._more_rounds <= MAX_EAGER_ROUNDS:
                    self._wake.set()
                self._more = False
                interval = self.config.replicate_interval * (0.8 + 0.4 * random.random())
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as
                # the wake-up does, and the loop would outlive stop()
                timed = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                        timed = False
        finally:
            peers, self._peers = self._peers, {}
            for peer in peers.values():
                with contextlib.suppress(Exception):
                    await peer.close()

    async def wait_round(self) -> None:
        """Run a full round now (scrub included) and wait for it to finish (tests, operators)."""
        self._full_round = True
        self._round_done.clear()
        self._wake.set()
        await self._round_done.wait()

    async def _state_of(self, key: str, budget: int) -> PeerState | None:
        since = self._cursors.get(key, 0)
        try:
            obj = await self._call(key, "storeState", {"since": since, "limit": max(1, min(budget, PAGE_ROWS))},
                                   self.config.transfer_timeout)
            state = await asyncio.to_thread(_parse_state, key, obj, since)
        except (SwarmdError, OSError, TimeoutError) as e:
            self._peers.pop(key, None)
            if key not in self._unreachable:  # one line per change, not one per round: a dead
                self._unreachable.add(key)  # store's record lingers on STORES until it expires
                self.log.bind(event="store_unreachable", peer=key[:16]).info("store {} unreachable: {}", key[:16], e)
            return None
        if key in self._unreachable:
            self._unreachable.discard(key)
            self.log.bind(event="store_reachable", peer=key[:16]).info("store {} reachable again", key[:16])
        if state.dropped:
            self.log.bind(event="rows_refused", peer=key[:16], count=state.dropped).warning(
                "refused {} catalog rows from store {} stamped in the future", state.dropped, key[:16])
        return state

    async def replicate_once(self) -> list[Pull]:
        """One round: learn peers' state and catalog changes, adopt their deletions, pull what the plan gives us."""
        core = self.core
        keys = await self._peer_keys()
        random.shuffle(keys)  # the round's row budget goes to different peers first each round
        budget = MAX_ROUND_ROWS
        states: list[PeerState] = []
        for batch in [keys[i:i + 8] for i in range(0, len(keys), 8)]:
            share = max(1, min(PAGE_ROWS, budget // max(1, len(batch))))
            got = await asyncio.gather(*(self._state_of(k, share) for k in batch))
            for st in got:
                if st is not None:
                    states.append(st)
                    budget -= len(st.models)
        adopted: list[ModelMeta] = []
        t = now()
        for st in states:
            adopt, unheld = await asyncio.to_thread(rows_to_adopt, core.catalog.row, st.models, t)
            for r in unheld:
                self._deleted_elsewhere[(r.name, r.version, r.digest)] = r.updated
                self._deleted_elsewhere.move_to_end((r.name, r.version, r.digest))
            while len(self._deleted_elsewhere) > MAX_UNHELD_DELETIONS:
                self._deleted_elsewhere.popitem(last=False)
            if adopt:
                adopted += await asyncio.to_thread(core.apply_tombstones, adopt)
            # a head behind our cursor: the peer lost its catalog (or a new one has its key): start over
            self._cursors[st.key] = st.cursor if st.head >= st.since else 0
            self._more = self._more or st.more or st.head < st.since  # the next round comes at once
        if adopted:
            self.log.bind(event="deletions_adopted", count=len(adopted)).info(
                "adopted {} deletions made on other stores", len(adopted)
            )
        refused = await asyncio.to_thread(core.catalog.tombstoned_digests)
        mine = PeerState(self.key, core.holdings(), core.missing(), refused, [])
        every = [mine, *states]
        plan = plan_replication(
            {s.key: s.have for s in every}, [s.key for s in every], self.config.replication_factor,
            wanted={s.key: s.missing for s in every}, refused={s.key: s.refused for s in every},
        )
        todo = [p for p in plan if p.store == self.key]
        by_key = {s.key: s for s in states}
        sem = asyncio.Semaphore(max(1, self.config.max_parallel_pulls))

        async def run(p: Pull) -> bool:
            async with sem:
                return await self._pull(p, by_key[p.source])

        results = await asyncio.gather(*(run(p) for p in todo))
        return [p for p, ok in zip(todo, results, strict=True) if ok]

    async def _rows_for(self, source: str, digest: str) -> list[ModelMeta]:
        """The source's live rows for one blob, checked: not from the future, not deleted elsewhere, capped."""
        ans = await self._call(source, "listModels", {"digest": digest, "include_deleted": True},
                               self.config.transfer_timeout)
        rows = ans.get("models") if isinstance(ans, dict) else None
        if not isinstance(rows, list):
            raise SwarmdError(ERR_BAD_REQUEST, "listModels answer must hold a models list")

        def parse() -> list[ModelMeta]:
            t = now()
            out = []
            for r in rows[:MAX_ROWS_PER_BLOB * 4]:
                m = _meta_from_wire(r)
                if m.digest != digest or m.deleted is not None or from_the_future(m, t):
                    continue
                gone = self._deleted_elsewhere.get((m.name, m.version, m.digest))
                if gone is not None and gone >= m.updated:
                    continue
                out.append(m)
            return out[:MAX_ROWS_PER_BLOB]

        return await asyncio.to_thread(parse)

    async def _pull(self, p: Pull, source: PeerState) -> bool:
        log = self.log.bind(event="replica_pull", digest=p.digest, source=p.source[:16])
        try:
            rows = await self._rows_for(p.source, p.digest)
        except (SwarmdError, OSError, TimeoutError) as e:
            log.warning("cannot list the rows of {} on {}: {}", p.digest[:16], p.source[:16], e)
            return False
        if not rows:
            return False
        core = self.core
        first = rows[0]
        try:
            up = await asyncio.to_thread(core.begin, PushRequest(first.name, p.digest, first.size, first.version))
        except SwarmdError as e:
            if e.code != ERR_CONFLICT:
                log.warning("cannot pull {}: {}", p.digest[:16], e.message)
            return False
        try:
            if not up.have_blob:
                peer = await self._connect(p.source)
                await pull_stream(peer, p.digest, up.offset, up.write_many, size=first.size,
                                  timeout=self.config.transfer_timeout)
            taken = await asyncio.to_thread(core.complete_replica, up, rows)
        except (SwarmdError, OSError, TimeoutError) as e:
            log.warning("pull of {} from {} failed: {}", p.digest[:16], p.source[:16], e)
            return False
        finally:
            up.close()
        self.pulled += bool(taken)
        return bool(taken)


ROLE = StoreRole
