"""The store core on real files and real SQLite: push, versions, delete, gc, resume, corruption."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_models import onnx_bytes, write_model

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    ERR_CORRUPT,
    ERR_INVALID_MODEL,
    ERR_NOT_FOUND,
    ERR_TOO_LARGE,
    SwarmdError,
)
from swarmd.settings import Settings
from swarmd.store.config import StoreConfig
from swarmd.store.core import ModelStore, PushRequest
from swarmd.store.onnxsig import read_signature


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "store", StoreConfig(max_model_bytes=1 << 20))
    yield s
    s.close()


def push_bytes(store: ModelStore, data: bytes, name: str, version: str | None = None, **kw):
    up = store.begin(PushRequest(name, sha(data), len(data), version, **kw))
    with up:
        up.write(data[up.offset:])
        return store.complete(up, uploader="ab" * 32)


def code_of(excinfo: pytest.ExceptionInfo[SwarmdError]) -> str:
    return excinfo.value.code


def test_settings_has_store_section() -> None:
    assert Settings().store.replication_factor == StoreConfig().replication_factor


def test_push_reads_signature_and_metadata(store: ModelStore, tmp_path: Path) -> None:
    f = write_model(tmp_path / "m.onnx", seed=1)
    meta = store.put_file(f, "tiny", "1", tags=["vision", "prod"], description="a tiny model", uploader="cd" * 32)
    assert meta.digest == sha(f.read_bytes())
    assert meta.size == f.stat().st_size
    assert meta.inputs == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert meta.outputs == [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]
    assert meta.tags == ["prod", "vision"]
    assert meta.uploader == "cd" * 32
    d = meta.to_dict()
    assert set(d) == {"name", "version", "digest", "size", "format", "inputs", "outputs", "tags", "description",
                      "created", "uploader"}
    assert store.get("tiny", "1") == meta
    assert store.get("tiny") == meta
    assert store.get("tiny", "latest") == meta
    assert b"".join(store.read(meta.digest)) == f.read_bytes()
    assert b"".join(store.read(meta.digest, 10)) == f.read_bytes()[10:]
    blob = store.blobs.path(meta.digest)
    assert blob.is_file() and blob.parent.parent == store.root / "blobs"
    assert list((store.root / "incoming").iterdir()) == []


def test_versions_are_immutable_and_idempotent(store: ModelStore) -> None:
    a, b = onnx_bytes(1), onnx_bytes(2)
    m1 = push_bytes(store, a, "m", "1")
    assert push_bytes(store, a, "m", "1") == m1  # same digest: no-op
    with pytest.raises(SwarmdError) as e:
        push_bytes(store, b, "m", "1")
    assert code_of(e) == ERR_CONFLICT and m1.digest in e.value.message
    assert store.get("m", "1").digest == m1.digest
    # the rejected bytes left nothing behind
    assert store.blobs.digests() == {m1.digest}
    assert list((store.root / "incoming").iterdir()) == []


def test_auto_versions_and_latest(store: ModelStore) -> None:
    m1 = push_bytes(store, onnx_bytes(1), "m")
    m2 = push_bytes(store, onnx_bytes(2), "m")
    assert (m1.version, m2.version) == ("1", "2")
    assert push_bytes(store, onnx_bytes(1), "m").version == "1"  # same bytes, no version: that version again
    assert store.get("m").version == "2"
    push_bytes(store, onnx_bytes(3), "m", "v1.0-beta")
    assert store.get("m").version == "2"  # latest by the version order, not the last pushed
    push_bytes(store, onnx_bytes(5), "m", "v3-beta")
    assert store.get("m").version == "v3-beta"  # 2 < 3-beta < 3
    assert push_bytes(store, onnx_bytes(4), "m").version == "4"  # above every major number used
    assert store.get("m").version == "4"
    assert [m.version for m in store.list(name="m")] == ["v1.0-beta", "1", "2", "v3-beta", "4"]


def test_list_and_search(store: ModelStore) -> None:
    push_bytes(store, onnx_bytes(1), "a", "1", tags=["x"])
    push_bytes(store, onnx_bytes(2), "a", "2", tags=["y"])
    push_bytes(store, onnx_bytes(3), "b", "1", tags=["x", "y"])
    assert [(m.name, m.version) for m in store.list()] == [("a", "1"), ("a", "2"), ("b", "1")]
    assert [(m.name, m.version) for m in store.list(name="a")] == [("a", "1"), ("a", "2")]
    assert [(m.name, m.version) for m in store.list(tag="x")] == [("a", "1"), ("b", "1")]
    assert [(m.name, m.version) for m in store.list(name="b", tag="y")] == [("b", "1")]
    assert store.list(name="nope") == []


def test_delete_tombstones_and_collects_blob(store: ModelStore) -> None:
    a = onnx_bytes(1)
    m1 = push_bytes(store, a, "m", "1")
    m2 = push_bytes(store, a, "n", "1")  # two names share one blob
    assert m1.digest == m2.digest
    store.delete("m", "1")
    with pytest.raises(SwarmdError) as e:
        store.get("m", "1")
    assert code_of(e) == ERR_NOT_FOUND
    assert store.blobs.has(m1.digest)  # still referenced by n:1
    store.delete("n", "1")
    assert not store.blobs.has(m1.digest)
    with pytest.raises(SwarmdError) as e:
        store.delete("n", "1")
    assert code_of(e) == ERR_NOT_FOUND
    with pytest.raises(SwarmdError) as e:
        list(store.read(m1.digest))
    assert code_of(e) == ERR_NOT_FOUND
    # the tombstone still guards the version
    with pytest.raises(SwarmdError) as e:
        push_bytes(store, onnx_bytes(2), "m", "1")
    assert code_of(e) == ERR_CONFLICT
    revived = push_bytes(store, a, "m", "1")
    assert store.get("m", "1") == revived and store.blobs.has(a and m1.digest)
    # numbering never reuses a deleted number
    assert push_bytes(store, onnx_bytes(5), "n").version == "2"


def test_resume_interrupted_upload(store: ModelStore) -> None:
    data = onnx_bytes(7, pad_floats=2000)
    req = PushRequest("r", sha(data), len(data), "1")
    up = store.begin(req)
    up.write(data[:3000])
    up.close()  # connection dropped
    assert store.blobs.received(sha(data)) == 3000
    with pytest.raises(SwarmdError) as e:
        store.get("r", "1")
    assert code_of(e) == ERR_NOT_FOUND
    up = store.begin(PushRequest("r", sha(data), len(data), "1"))
    assert up.offset == 3000
    up.write(data[3000:])
    meta = store.complete(up)
    assert b"".join(store.read(meta.digest)) == data
    assert store.blobs.received(sha(data)) == len(data)
    # once complete, a push of the same blob needs no bytes
    up = store.begin(PushRequest("r2", sha(data), len(data)))
    assert up.offset == len(data)
    with pytest.raises(SwarmdError) as e:
        up.write(b"x")
    assert code_of(e) == ERR_BAD_REQUEST
    assert store.complete(up).digest == meta.digest


def test_one_writer_per_blob_and_concurrent_publish(store: ModelStore) -> None:
    data = onnx_bytes(3)
    up = store.begin(PushRequest("c", sha(data), len(data), "1"))
    with pytest.raises(SwarmdError) as e:
        store.begin(PushRequest("c", sha(data), len(data), "1"))
    assert code_of(e) == ERR_CONFLICT
    up.write(data)
    store.complete(up)
    # many threads pushing the same model (blob present now) all get the same row
    results, errors = [], []

    def worker() -> None:
        try:
            for _ in range(5):
                try:
                    results.append(push_bytes(store, data, "c", "1"))
                except SwarmdError as err:
                    if err.code != ERR_CONFLICT:  # only "in progress" is allowed, and then retried
                        raise
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results and all(r == results[0] for r in results)
    assert len(store.list(name="c")) == 1


def test_concurrent_upload_from_another_process_is_refused(store: ModelStore, tmp_path: Path) -> None:
    data = onnx_bytes(4)
    up = store.begin(PushRequest("p", sha(data), len(data), "1"))
    other = ModelStore(store.root, store.config)  # a second opener, as another process would be
    try:
        with pytest.raises(SwarmdError) as e:
            other.begin(PushRequest("p", sha(data), len(data), "1"))
        assert code_of(e) == ERR_CONFLICT
    finally:
        other.close()
        up.close()


def test_corrupt_blob_detected_quarantined_and_healed(store: ModelStore) -> None:
    data = onnx_bytes(5)
    meta = push_bytes(store, data, "z", "1")
    path = store.blobs.path(meta.digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(b"\xff")
    with pytest.raises(SwarmdError) as e:
        list(store.read(meta.digest))
    assert code_of(e) == ERR_CORRUPT
    assert not path.exists()
    assert len(list((store.root / "quarantine").iterdir())) == 1
    assert store.missing() == {meta.digest} and store.holdings() == set()
    assert store.get("z", "1").digest == meta.digest  # metadata stays: a replica can refill the blob
    push_bytes(store, data, "z", "1")  # a re-push (or a replica pull) heals it
    assert b"".join(store.read(meta.digest)) == data
    assert store.missing() == set()


def test_wrong_bytes_rejected_and_dropped(store: ModelStore) -> None:
    data = onnx_bytes(6)
    up = store.begin(PushRequest("w", sha(data), len(data), "1"))
    up.write(b"\0" * len(data))
    with pytest.raises(SwarmdError) as e:
        store.complete(up)
    assert code_of(e) == ERR_CORRUPT
    assert list((store.root / "incoming").iterdir()) == []
    assert store.blobs.digests() == set() and store.list() == []


def test_invalid_onnx_leaves_nothing(store: ModelStore) -> None:
    for junk in (b"this is not a model", b"", onnx_bytes(1)[:-7]):
        with pytest.raises(SwarmdError) as e:
            push_bytes(store, junk, "bad", "1")
        assert code_of(e) == ERR_INVALID_MODEL, junk
    assert list((store.root / "incoming").iterdir()) == []
    assert store.blobs.digests() == set()
    assert store.catalog.list(include_deleted=True) == []


def test_size_limits(store: ModelStore) -> None:
    with pytest.raises(SwarmdError) as e:
        store.begin(PushRequest("big", "a" * 64, (1 << 20) + 1))
    assert code_of(e) == ERR_TOO_LARGE
    data = onnx_bytes(1)
    up = store.begin(PushRequest("s", sha(data), len(data) - 1, "1"))
    with pytest.raises(SwarmdError) as e:
        up.write(data)
    assert code_of(e) == ERR_TOO_LARGE
    up.close()
    up = store.begin(PushRequest("s", sha(data), len(data), "1"))
    up.write(data[:10])
    with pytest.raises(SwarmdError) as e:
        store.complete(up)
    assert code_of(e) == ERR_BAD_REQUEST and "incomplete" in e.value.message


@pytest.mark.parametrize(
    "req",
    [
        PushRequest("", "a" * 64, 1),
        PushRequest("has space", "a" * 64, 1),
        PushRequest("a:b", "a" * 64, 1),
        PushRequest("ok", "A" * 64, 1),
        PushRequest("ok", "a" * 63, 1),
        PushRequest("ok", "a" * 64, -1),
        PushRequest("ok", "a" * 64, 1, version="latest"),
        PushRequest("ok", "a" * 64, 1, version="1/2"),
        PushRequest("ok", "a" * 64, 1, tags=["bad tag"]),
        PushRequest("ok", "a" * 64, 1, tags="notalist"),  # type: ignore[arg-type]
        PushRequest("ok", "a" * 64, 1, description=5),  # type: ignore[arg-type]
    ],
)
def test_bad_requests(store: ModelStore, req: PushRequest) -> None:
    with pytest.raises(SwarmdError) as e:
        store.begin(req)
    assert code_of(e) == ERR_BAD_REQUEST


def test_bad_reads(store: ModelStore) -> None:
    meta = push_bytes(store, onnx_bytes(1), "m", "1")
    for args in (("nothex",), (meta.digest, -1), (meta.digest, meta.size + 1), (meta.digest, "0")):
        with pytest.raises(SwarmdError) as e:
            list(store.read(*args))
        assert code_of(e) == ERR_BAD_REQUEST
    for name, version in (("m", "2"), ("nope", None)):
        with pytest.raises(SwarmdError) as e:
            store.get(name, version)
        assert code_of(e) == ERR_NOT_FOUND
    with pytest.raises(SwarmdError) as e:
        store.get("m", "bad/version")
    assert code_of(e) == ERR_BAD_REQUEST


def test_gc_removes_orphans_and_stale_parts(store: ModelStore) -> None:
    data = onnx_bytes(9)
    orphan = store.blobs.path(sha(data))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(data)
    (store.root / "incoming" / f"{'b' * 64}.part").write_bytes(b"old")
    store.config.incoming_ttl = 0.0
    assert store.gc() == 1
    assert not orphan.exists()
    assert list((store.root / "incoming").iterdir()) == []


def test_metadata_is_sqlite_wal(store: ModelStore) -> None:
    push_bytes(store, onnx_bytes(1), "m", "1")
    db = sqlite3.connect(store.root / "meta.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT name, version FROM models").fetchall() == [("m", "1")]
    finally:
        db.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_signature_reader_rejects_garbage_precisely(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "g.onnx"
    p.write_bytes(data)
    try:
        read_signature(p)
    except SwarmdError as e:
        assert e.code == ERR_INVALID_MODEL


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=170), st.binary(min_size=1, max_size=4))
def test_signature_reader_on_mangled_models(tmp_path: Path, cut: int, junk: bytes) -> None:
    good = onnx_bytes(1)
    p = tmp_path / "g.onnx"
    p.write_bytes(good[:cut] + junk + good[cut + len(junk):])
    try:
        ins, outs = read_signature(p)
        assert all(isinstance(s.name, str) for s in ins + outs)
    except SwarmdError as e:
        assert e.code == ERR_INVALID_MODEL


def test_scrub_finds_rot_that_keeps_size_and_mtime(store: ModelStore) -> None:
    metas = [push_bytes(store, onnx_bytes(s), f"s{s}", "1") for s in (1, 2, 3)]
    victim = metas[1]
    path = store.blobs.path(victim.digest)
    st = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # rot leaves the stamp as it was
    store.blobs.verify(victim.digest)  # the cheap check trusts the unchanged stamp
    found: list[str] = []
    for _ in range(3):  # one blob per call, round robin
        found += store.scrub(1)
    assert found == [victim.digest]
    assert store.missing() == {victim.digest}
    assert store.scrub(5) == []  # the rest are sound
