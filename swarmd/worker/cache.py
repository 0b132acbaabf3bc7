"""Model blobs on disk, by sha256 digest, within a size budget (LRU eviction).

A worker that restarts or reloads a model should not download it again, but
a worker that has served many models must not fill its disk: the least
recently used blobs go first, never one that is loaded right now. Blobs are
written to a temporary file, verified against their digest, then renamed, so
a blob in the cache is always whole and correct.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from loguru import logger

from swarmd.errors import ERR_CORRUPT, ERR_TOO_LARGE, SwarmdError
from swarmd.names import check_digest


class BlobWriter:
    """Receives one blob in chunks; commit() verifies and publishes it."""

    def __init__(self, cache: ModelCache, digest: str, size: int) -> None:
        self.cache = cache
        self.digest = digest
        self.size = size
        self.received = 0
        self._hash = hashlib.sha256()
        self.tmp = cache.tmp_dir / f"{digest}.{os.getpid()}.{id(self):x}.part"
        self._f = open(self.tmp, "wb")  # closed by commit() or abort()

    def write(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.size:
            self.abort()
            raise SwarmdError(ERR_CORRUPT, f"blob {self.digest[:16]} is longer than its announced {self.size} bytes")
        self._f.write(chunk)
        self._hash.update(chunk)
        self.received += len(chunk)

    def commit(self) -> Path:
        self._f.close()
        got = self._hash.hexdigest()
        if self.received != self.size or got != self.digest:
            self.tmp.unlink(missing_ok=True)
            raise SwarmdError(
                ERR_CORRUPT,
                f"downloaded blob does not match: expected sha256 {self.digest} and {self.size} bytes, "
                f"got {got} and {self.received} bytes",
            )
        path = self.cache.path(self.digest)
        os.replace(self.tmp, path)
        self.cache.evict()
        return path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


class ModelCache:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget = budget_bytes
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.iterdir():  # partial downloads of a previous run
            stale.unlink(missing_ok=True)
        self.pinned: set[str] = set()  # digests loaded right now: never evicted

    def path(self, digest: str) -> Path:
        return self.root / f"{check_digest(digest)}.onnx"

    def get(self, digest: str) -> Path | None:
        """The cached blob's path (marking it recently used), or None."""
        path = self.path(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def writer(self, digest: str, size: int) -> BlobWriter:
        check_digest(digest)
        if size > self.budget:
            raise SwarmdError(ERR_TOO_LARGE, f"model blob of {size} bytes exceeds the worker's cache budget of {self.budget}")
        return BlobWriter(self, digest, size)

    def entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.root.glob("*.onnx"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def used(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> list[str]:
        """Remove least recently used, unpinned blobs until within budget."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed: list[str] = []
        for _, size, p in entries:
            if total <= self.budget:
                break
            digest = p.stem
            if digest in self.pinned:
                continue
            p.unlink(missing_ok=True)
            total -= size
            removed.append(digest)
            logger.bind(event="cache_evict", digest=digest[:16], size=size).info("evicted model blob from cache")
        return removed
