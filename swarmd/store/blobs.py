"""Content-addressed blob files: the bytes of models, named by their sha256.

Layout under the store root:
    blobs/<d[:2]>/<d>        complete, verified blobs (read-only once there)
    incoming/<d>.part        partial uploads, keyed by the declared digest, resumable
    quarantine/<d>.<ts>      blobs that failed verification, kept for inspection

A blob only ever appears under blobs/ by rename of a fully written, fsynced and
verified file, so a crash at any moment leaves either the whole blob or none.
Reads are verified too: disks rot and people edit files, and a worker must
never load bytes that are not the model it asked for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    ERR_CORRUPT,
    ERR_NOT_FOUND,
    ERR_TOO_LARGE,
    SwarmdError,
)
from swarmd.names import DIGEST_RE, check_digest

READ_CHUNK = 1024 * 1024
IOV_BATCH = 512  # buffers per writev, under every system's IOV_MAX


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: list[bytes]) -> None:
    """writev until every byte is out (a short write resumes mid-chunk)."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views[:IOV_BATCH])
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


def hash_file(path: Path, limit: int | None = None) -> hashlib._Hash:
    """sha256 over the first `limit` bytes of path (all when None): read into one buffer (no
    allocation per read) and hashed in place."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(READ_CHUNK))
    left: float = math.inf if limit is None else limit
    with open(path, "rb", buffering=0) as f:
        while left > 0 and (got := f.readinto(buf[: int(min(READ_CHUNK, left))])):
            h.update(buf[:got])
            left -= got
    return h


class UploadSession:
    """One writer appending to incoming/<digest>.part; at most one per digest.

    `offset` is how many bytes are already there (resume point). `finish()`
    fsyncs, verifies the sha256 and returns the path of the verified part file;
    the caller decides (after parsing it) whether to `commit()` it as a blob.
    """

    def __init__(self, blobs: BlobStore, digest: str, size: int) -> None:
        self.blobs = blobs
        self.digest = digest
        self.size = size
        self.path = blobs.incoming / f"{digest}.part"
        self._closed = False
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SwarmdError(ERR_CONFLICT, f"an upload of blob {digest} is already in progress") from None
            raise
        self._fd = fd
        have = os.fstat(fd).st_size
        if have > size:  # a part longer than the declared size cannot be this blob: start over
            os.ftruncate(fd, 0)
            have = 0
        self.offset = have
        os.lseek(fd, have, os.SEEK_SET)
        # hash as bytes arrive, so finishing a big upload does not re-read it from disk
        self._hash = hash_file(self.path, have) if have else hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.write_many([chunk])

    def write_many(self, chunks: list[bytes]) -> None:
        """Hash and append chunks with one writev (no join copy); nothing is written when they
        would go past the declared size."""
        if self._closed:
            raise SwarmdError(ERR_BAD_REQUEST, "upload session is closed")
        total = sum(len(c) for c in chunks)
        if self.offset + total > self.size:
            raise SwarmdError(
                ERR_TOO_LARGE, f"upload sent more than the declared size of {self.size} bytes for blob {self.digest}"
            )
        update = self._hash.update
        for c in chunks:
            update(c)
        write_all(self._fd, chunks)
        self.offset += total

    def finish(self) -> Path:
        """fsync and verify; the part stays locked until commit() or close()."""
        if self.offset != self.size:
            raise SwarmdError(
                ERR_BAD_REQUEST, f"upload of blob {self.digest} incomplete: have {self.offset} of {self.size} bytes"
            )
        os.fsync(self._fd)
        got = self._hash.hexdigest()
        if got != self.digest:
            # The bytes are not what was declared: resuming from them is pointless.
            os.ftruncate(self._fd, 0)
            self.offset = 0
            self._hash = hashlib.sha256()
            raise SwarmdError(ERR_CORRUPT, f"uploaded bytes hash to {got}, not the declared sha256 {self.digest}")
        return self.path

    def commit(self) -> Path:
        """Move the verified part into blobs/ (atomically) and close the session."""
        dst = self.blobs.path(self.digest)
        dst.parent.mkdir(exist_ok=True)
        os.chmod(self.path, 0o444)
        os.replace(self.path, dst)
        _fsync_dir(dst.parent)
        _fsync_dir(self.path.parent)
        self.close()
        self.blobs.mark_verified(self.digest)  # hashed as it arrived: the first read needs no re-hash
        return dst

    def discard(self) -> None:
        """Drop the partial data (invalid model, bad bytes) and close."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        """Release the lock; the part stays for a later resume."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)  # closing drops the flock

    def __enter__(self) -> UploadSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "blobs"
        self.incoming = root / "incoming"
        self.quarantine_dir = root / "quarantine"
        for d in (self.dir, self.incoming, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        # digests whose file was verified at (size, mtime_ns): skips re-hashing unchanged files
        self._verified: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        return self.dir / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(check_digest(digest)).stat().st_size
        except FileNotFoundError:
            raise SwarmdError(ERR_NOT_FOUND, f"no blob {digest} in this store") from None

    def digests(self) -> set[str]:
        out: set[str] = set()
        for sub in self.dir.iterdir():
            if sub.is_dir():
                out.update(p.name for p in sub.iterdir() if DIGEST_RE.fullmatch(p.name))
        return out

    def upload(self, digest: str, size: int, max_bytes: int) -> UploadSession:
        check_digest(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SwarmdError(ERR_BAD_REQUEST, f"size must be a non-negative integer, got {size!r:.40}")
        if size > max_bytes:
            raise SwarmdError(ERR_TOO_LARGE, f"model of {size} bytes is over this store's limit of {max_bytes} bytes")
        return UploadSession(self, digest, size)

    def received(self, digest: str) -> int:
        """Bytes of digest this store already has: its size when complete, else the part's length."""
        check_digest(digest)
        with contextlib.suppress(FileNotFoundError):
            return self.path(digest).stat().st_size
        with contextlib.suppress(FileNotFoundError):
            return (self.incoming / f"{digest}.part").stat().st_size
        return 0

    def verify(self, digest: str, *, force: bool = False) -> Path:
        """The blob's path after checking its sha256; corrupt blobs are quarantined (ERR_CORRUPT).

        A blob already verified with the same size and mtime is not re-hashed unless
        `force` (the scrub uses it: bit rot changes neither).
        """
        p = self.path(check_digest(digest))
        try:
            st = p.stat()
        except FileNotFoundError:
            raise SwarmdError(ERR_NOT_FOUND, f"no blob {digest} in this store") from None
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if not force and self._verified.get(digest) == stamp:
                return p
        got = hash_file(p).hexdigest()
        if got != digest:
            self.quarantine(digest, f"content hashes to {got}")
            raise SwarmdError(ERR_CORRUPT, f"blob {digest} is corrupt on disk (hashes to {got}); quarantined")
        with self._lock:
            self._verified[digest] = stamp
        return p

    def mark_verified(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            st = self.path(digest).stat()
            with self._lock:
                self._verified[digest] = (st.st_size, st.st_mtime_ns)

    def read(self, digest: str, offset: int = 0, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """Chunks of a verified blob from offset; a blob that rots mid-read raises ERR_CORRUPT."""
        p = self.verify(digest)
        size = p.stat().st_size
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= size:
            raise SwarmdError(ERR_BAD_REQUEST, f"offset must be between 0 and {size}, got {offset!r:.40}")
        return self.read_raw(p, offset, chunk)

    @staticmethod
    def read_raw(p: Path, offset: int, chunk: int) -> Iterator[bytes]:
        """Chunks of a file from offset, unverified: for callers that hash as they go."""
        with open(p, "rb") as f:
            f.seek(offset)
            while True:
                buf = f.read(chunk)
                if not buf:
                    return
                yield buf

    def quarantine(self, digest: str, reason: str) -> None:
        src = self.path(digest)
        dst = self.quarantine_dir / f"{digest}.{time.time_ns()}"
        with self._lock:
            self._verified.pop(digest, None)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return
        logger.bind(event="blob_quarantined", digest=digest).error("blob {} quarantined: {}", digest, reason)

    def remove(self, digest: str) -> bool:
        with self._lock:
            self._verified.pop(digest, None)
        try:
            os.unlink(self.path(digest))
            return True
        except FileNotFoundError:
            return False

    def sweep_incoming(self, max_age: float, now: float | None = None) -> int:
        """Remove partial uploads untouched for max_age seconds (and unlocked)."""
        now = time.time() if now is None else now
        removed = 0
        for p in self.incoming.iterdir():
            try:
                if now - p.stat().st_mtime < max_age:
                    continue
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # being written right now
            try:
                os.unlink(p)
                removed += 1
            finally:
                os.close(fd)
        return removed
