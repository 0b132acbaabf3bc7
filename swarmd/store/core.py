"""The model store without a network: blobs + catalog + the rules that bind them.

Rules: a model version is visible only once its blob is complete, verified,
parsed as ONNX and renamed into place, and its row committed; versions are
immutable (same name+version with another digest is ERR_CONFLICT, with the
same digest it is a no-op); a blob is deleted as soon as no live version
refers to it. All methods are blocking and thread-safe, so the asyncio glue
runs the slow ones (hashing, parsing) in worker threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd.errors import ERR_BAD_REQUEST, ERR_CONFLICT, ERR_CORRUPT, ERR_NOT_FOUND, SwarmdError
from swarmd.names import ModelMeta, check_description, check_digest, check_name, check_tags, check_version
from swarmd.store.blobs import READ_CHUNK, BlobStore, UploadSession
from swarmd.store.catalog import Catalog, now
from swarmd.store.config import StoreConfig
from swarmd.store.onnxsig import read_signature


@dataclass
class PushRequest:
    """What a client declares before sending bytes."""

    name: str
    digest: str
    size: int
    version: str | None = None
    tags: list[str] | None = None
    description: str | None = None

    def check(self) -> PushRequest:
        check_name(self.name)
        check_digest(self.digest)
        if self.version is not None:
            check_version(self.version)
        self.tags = check_tags(self.tags)
        self.description = check_description(self.description)
        return self


class Upload:
    """A push in progress: write chunks from `offset`, then ModelStore.complete()."""

    def __init__(self, store: ModelStore, req: PushRequest, session: UploadSession | None, have_blob: bool) -> None:
        self.store = store
        self.req = req
        self.session = session
        self.have_blob = have_blob
        self._done = False

    @property
    def offset(self) -> int:
        return self.req.size if self.have_blob or self.session is None else self.session.offset

    def write(self, chunk: bytes) -> None:
        if self.have_blob or self.session is None:
            if chunk:
                raise SwarmdError(ERR_BAD_REQUEST, f"blob {self.req.digest} is already complete; send no data")
            return
        self.session.write(chunk)

    def write_many(self, chunks: list[bytes]) -> None:
        """write() for a batch of chunks: one hash pass and one writev, no join copy."""
        if self.have_blob or self.session is None:
            self.write(b"".join(chunks))
            return
        self.session.write_many(chunks)

    def close(self) -> None:
        """Give up for now; the partial data stays for a resume."""
        if not self._done:
            self._done = True
            if self.session is not None:
                self.session.close()
            self.store._release(self.req.digest)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelStore:
    def __init__(self, root: Path, config: StoreConfig) -> None:
        self.root = root
        self.config = config
        root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(root)
        self.catalog = Catalog(root / "meta.sqlite")
        self._lock = threading.RLock()  # commit-vs-gc: a blob is never removed while a row is being added for it
        self._active: set[str] = set()  # digests with an upload open in this process
        self._scrub_cursor = ""
        self.recover()

    def close(self) -> None:
        self.catalog.close()

    # -- start-up ----------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """After a crash: drop blobs nothing refers to; rows whose blob is gone stay (replicas refill them)."""
        removed = self.gc()
        missing = len(self.catalog.live_digests() - self.blobs.digests())
        if removed or missing:
            logger.bind(event="store_recovered", orphans_removed=removed, blobs_missing=missing).info(
                "store recovered: removed {} orphan blobs, {} referenced blobs missing", removed, missing
            )
        return {"orphans_removed": removed, "blobs_missing": missing}

    # -- push ----------------------------------------------------------------

    def begin(self, req: PushRequest) -> Upload:
        """Open a push; ERR_CONFLICT early when name:version already holds other bytes."""
        req.check()
        if req.size > self.config.max_model_bytes:
            self.blobs.upload(req.digest, req.size, self.config.max_model_bytes)  # raises ERR_TOO_LARGE
        if req.version is not None:
            self._check_immutable(req.name, req.version, req.digest)
        with self._lock:
            if req.digest in self._active:
                raise SwarmdError(ERR_CONFLICT, f"an upload of blob {req.digest} is already in progress")
            self._active.add(req.digest)
        try:
            if self.blobs.has(req.digest) and self._blob_ok(req.digest):
                have = self.blobs.size(req.digest)
                if have != req.size:
                    raise SwarmdError(
                        ERR_BAD_REQUEST, f"declared size {req.size} differs from the {have} bytes of blob {req.digest}"
                    )
                return Upload(self, req, None, have_blob=True)
            session = self.blobs.upload(req.digest, req.size, self.config.max_model_bytes)
            return Upload(self, req, session, have_blob=False)
        except BaseException:
            self._release(req.digest)
            raise

    def _blob_ok(self, digest: str) -> bool:
        """True when the blob verifies; a corrupt one is quarantined and uploaded afresh."""
        try:
            self.blobs.verify(digest)
            return True
        except SwarmdError:
            return False

    def _release(self, digest: str) -> None:
        with self._lock:
            self._active.discard(digest)

    def _check_immutable(self, name: str, version: str, digest: str) -> None:
        row = self.catalog.row(name, version)
        if row is not None and row.digest != digest:
            raise SwarmdError(
                ERR_CONFLICT,
                f"{name}:{version} already exists with digest {row.digest}; versions are immutable, push a new version",
                {"digest": row.digest},
            )

    def _verified_signature(self, up: Upload) -> tuple[list[Any], list[Any]]:
        """Check the pushed bytes (digest, ONNX); bad bytes are dropped, not kept for a resume."""
        if up.have_blob:
            path = self.blobs.verify(up.req.digest)
        else:
            assert up.session is not None
            try:
                path = up.session.finish()
            except SwarmdError as e:
                if e.code == ERR_CORRUPT:
                    up.session.discard()
                raise
        try:
            return read_signature(path)
        except SwarmdError:
            if up.session is not None:
                up.session.discard()
            raise

    def complete(self, up: Upload, *, uploader: str = "") -> ModelMeta:
        """Verify, parse and publish the pushed model; on failure nothing new stays visible."""
        req = up.req
        try:
            inputs, outputs = self._verified_signature(up)
            with self._lock:
                meta = self._publish(req, inputs, outputs, uploader)
                if meta is None:  # conflict found at the last moment
                    if up.session is not None:
                        up.session.discard()
                    row = self.catalog.row(req.name, req.version or "")
                    raise SwarmdError(
                        ERR_CONFLICT,
                        f"{req.name}:{req.version} already exists with digest {row.digest if row else '?'}",
                    )
                if up.session is not None:
                    up.session.commit()
            logger.bind(event="model_stored", model=meta.name, version=meta.version, digest=meta.digest,
                        size=meta.size).info("stored {}:{}", meta.name, meta.version)
            return meta
        finally:
            up.close()

    def complete_replica(self, up: Upload, rows: list[ModelMeta]) -> list[ModelMeta]:
        """Publish a blob pulled from a peer with the peer's rows (original created/uploader), as
        read by names.check_record; the signature is ours, read from the verified bytes.

        A row is taken only where it does not clash with ours: not over another
        digest, not over a newer tombstone (a deletion here beats an older copy
        there); our own live row for the blob makes the pull a repair. When no
        row is taken or repaired the blob is dropped.
        """
        taken: list[ModelMeta] = []
        try:
            inputs, outputs = self._verified_signature(up)
            sig_in = [s.to_wire() for s in inputs]
            sig_out = [s.to_wire() for s in outputs]
            with self._lock:
                for r in rows:
                    if r.digest != up.req.digest or r.deleted is not None:
                        continue
                    mine = self.catalog.row(r.name, r.version)
                    if mine is not None and mine.digest == r.digest and mine.deleted is None:
                        taken.append(mine)  # a repair: our row is fine, its blob was lost
                        continue
                    if mine is not None and (mine.digest != r.digest or mine.updated >= r.updated):
                        continue
                    meta = replace(r, size=up.req.size, format="onnx", inputs=sig_in, outputs=sig_out)
                    self.catalog.upsert(meta)
                    taken.append(meta)
                if up.session is not None:
                    if taken:
                        up.session.commit()
                    else:
                        up.session.discard()
            for m in taken:
                logger.bind(event="model_replicated", model=m.name, version=m.version, digest=m.digest).info(
                    "replicated {}:{}", m.name, m.version
                )
            return taken
        finally:
            up.close()

    def apply_tombstones(self, rows: list[ModelMeta]) -> list[ModelMeta]:
        """Record deletions made on other stores of rows we hold (see replication.rows_to_adopt;
        rows read by names.check_record); collect freed blobs."""
        done: list[ModelMeta] = []
        with self._lock:
            for r in rows:
                if r.deleted is None:
                    continue
                mine = self.catalog.row(r.name, r.version)
                if mine is None or mine.digest != r.digest or mine.updated >= r.updated:
                    continue  # never a permanent row for a version we do not hold
                tomb = mine
                tomb.deleted, tomb.updated = float(r.deleted), float(r.updated)
                self.catalog.upsert(tomb)
                self._collect(tomb.digest)
                done.append(tomb)
        return done

    def _publish(self, req: PushRequest, inputs: list[Any], outputs: list[Any], uploader: str) -> ModelMeta | None:
        """Insert (or revive) the row; None on an immutability conflict. Caller holds _lock."""
        t = now()
        if req.version is None:
            same = [m for m in self.catalog.list(name=req.name, digest=req.digest)]
            if same:  # the same bytes pushed again without a version: that version, not a new one
                return max(same, key=lambda m: m.created)
            req.version = self.catalog.next_version(req.name)
        row = self.catalog.row(req.name, req.version)
        if row is not None:
            if row.digest != req.digest:
                return None
            if row.deleted is None:
                return row
        meta = ModelMeta(
            name=req.name,
            version=req.version,
            digest=req.digest,
            size=req.size,
            format="onnx",
            inputs=[s.to_wire() for s in inputs],
            outputs=[s.to_wire() for s in outputs],
            tags=list(req.tags or []),
            description=req.description or "",
            created=row.created if row is not None else t,
            uploader=uploader or (row.uploader if row is not None else ""),
            deleted=None,
            updated=max(t, row.updated + 1e-6) if row is not None else t,
        )
        self.catalog.upsert(meta)
        return meta

    def put_file(self, path: Path, name: str, version: str | None = None, *, tags: list[str] | None = None,
                 description: str | None = None, uploader: str = "") -> ModelMeta:
        """Push a local file (tests, benchmarks, operators on the store's own box)."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while buf := f.read(READ_CHUNK):
                h.update(buf)
        size = path.stat().st_size
        up = self.begin(PushRequest(name, h.hexdigest(), size, version, tags, description))
        with up, open(path, "rb") as f:
            f.seek(up.offset)
            while buf := f.read(READ_CHUNK):
                up.write(buf)
            return self.complete(up, uploader=uploader)

    # -- read ----------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelMeta:
        check_name(name)
        if version is not None and version != "latest":
            check_version(version)
        meta = self.catalog.live(name, version)
        if meta is None:
            what = f"{name}:{version}" if version not in (None, "latest") else f"any version of {name}"
            raise SwarmdError(ERR_NOT_FOUND, f"this store has no {what}")
        return meta

    def list(self, name: str | None = None, tag: str | None = None) -> list[ModelMeta]:
        if name is not None:
            check_name(name)
        if tag is not None:
            check_tags([tag])
        return self.catalog.list(name=name, tag=tag)

    def read(self, digest: str, offset: int = 0, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """Verified chunks of a blob this store holds for a live model."""
        check_digest(digest)
        if not self.catalog.referenced(digest):
            raise SwarmdError(ERR_NOT_FOUND, f"no model in this store has blob {digest}")
        return self.blobs.read(digest, offset, chunk)

    # -- delete / gc -----------------------------------------------------------

    def delete(self, name: str, version: str) -> ModelMeta:
        check_name(name)
        check_version(version)
        with self._lock:
            row = self.catalog.row(name, version)
            if row is None or row.deleted is not None:
                raise SwarmdError(ERR_NOT_FOUND, f"this store has no {name}:{version}")
            row.deleted = row.updated = max(now(), row.updated + 1e-6)
            self.catalog.upsert(row)
            self._collect(row.digest)
        logger.bind(event="model_deleted", model=name, version=version, digest=row.digest).info(
            "deleted {}:{}", name, version
        )
        return row

    def _collect(self, digest: str) -> bool:
        """Remove digest's blob if no live row refers to it and no upload holds it. Caller holds _lock."""
        if digest in self._active or self.catalog.referenced(digest):
            return False
        return self.blobs.remove(digest)

    def gc(self) -> int:
        """Remove every unreferenced blob and stale partial upload; returns blobs removed."""
        removed = 0
        with self._lock:
            for digest in self.blobs.digests() - self.catalog.live_digests():
                removed += self._collect(digest)
        self.blobs.sweep_incoming(self.config.incoming_ttl)
        return removed

    def scrub(self, count: int = 1) -> list[str]:
        """Re-hash the next `count` blobs (in digest order, resuming where the last call
        stopped) so rot is found even in blobs nobody reads; returns the corrupt ones."""
        digests = sorted(self.holdings())
        if not digests or count <= 0:
            return []
        after = [d for d in digests if d > self._scrub_cursor] or digests
        bad = []
        for d in after[:count]:
            self._scrub_cursor = d
            try:
                self.blobs.verify(d, force=True)
            except SwarmdError as e:
                if e.code == ERR_CORRUPT:
                    bad.append(d)
        return bad

    def holdings(self) -> set[str]:
        """Digests of live models whose blob is on disk (what this store can serve)."""
        return self.catalog.live_digests() & self.blobs.digests()

    def missing(self) -> set[str]:
        """Digests of live models whose blob is gone (quarantined, lost): to re-fetch from a replica."""
        return self.catalog.live_digests() - self.blobs.digests()

    def status(self) -> dict[str, int]:
        n, b = self.catalog.counts()
        return {"models": n, "bytes": b}
