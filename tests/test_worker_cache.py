"""The on-disk model cache: verified writes, LRU eviction within a budget, pinned blobs kept."""

from __future__ import annotations

import hashlib
import os

import pytest

from swarmd.errors import ERR_BAD_REQUEST, ERR_CORRUPT, ERR_TOO_LARGE, SwarmdError
from swarmd.worker.cache import ModelCache


def put(cache: ModelCache, data: bytes, chunk: int = 7) -> str:
    digest = hashlib.sha256(data).hexdigest()
    w = cache.writer(digest, len(data))
    for i in range(0, len(data), chunk):
        w.write(data[i : i + chunk])
    w.commit()
    return digest


def test_write_verify_and_get(tmp_path):
    cache = ModelCache(tmp_path, 1000)
    d = put(cache, b"a" * 100)
    assert cache.get(d).read_bytes() == b"a" * 100
    assert cache.get("0" * 64) is None
    assert list(cache.tmp_dir.iterdir()) == []


def test_corrupt_blob_is_refused_and_leaves_nothing(tmp_path):
    cache = ModelCache(tmp_path, 1000)
    digest = hashlib.sha256(b"good").hexdigest()
    w = cache.writer(digest, 4)
    w.write(b"evil")
    with pytest.raises(SwarmdError) as info:
        w.commit()
    assert info.value.code == ERR_CORRUPT
    assert cache.get(digest) is None and list(cache.tmp_dir.iterdir()) == []
    w = cache.writer(digest, 4)
    with pytest.raises(SwarmdError) as info:
        w.write(b"too long")
    assert info.value.code == ERR_CORRUPT
    assert list(cache.tmp_dir.iterdir()) == []


def test_bad_digest_and_oversize(tmp_path):
    cache = ModelCache(tmp_path, 10)
    for bad in ("../../etc/passwd", "A" * 64, "", 5):
        with pytest.raises(SwarmdError) as info:
            cache.get(bad)
        assert info.value.code == ERR_BAD_REQUEST
    with pytest.raises(SwarmdError) as info:
        cache.writer("0" * 64, 11)
    assert info.value.code == ERR_TOO_LARGE


def test_lru_eviction_spares_recent_and_pinned(tmp_path):
    cache = ModelCache(tmp_path, 250)
    a = put(cache, b"a" * 100)
    b = put(cache, b"b" * 100)
    os.utime(cache.path(a), (1, 1))
    os.utime(cache.path(b), (2, 2))
    assert cache.get(a) is not None  # a becomes the most recently used
    c = put(cache, b"c" * 100)  # 300 > 250: the least recently used goes
    assert cache.get(b) is None
    assert cache.get(a) is not None and cache.get(c) is not None
    os.utime(cache.path(a), (1, 1))
    os.utime(cache.path(c), (2, 2))
    cache.pinned.add(a)  # loaded right now: kept although least recently used
    d = put(cache, b"d" * 100)
    assert cache.get(c) is None
    assert cache.get(a) is not None and cache.get(d) is not None
    assert cache.used() == 200


def test_stale_partials_removed_on_start(tmp_path):
    ModelCache(tmp_path, 10)
    (tmp_path / "tmp" / "x.part").write_bytes(b"half")
    assert list(ModelCache(tmp_path, 10).tmp_dir.iterdir()) == []
