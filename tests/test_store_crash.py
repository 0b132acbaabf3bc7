"""kill -9 in the middle of a push, in a real subprocess: nothing half-made is visible after restart."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_models import onnx_bytes

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.store.config import StoreConfig
from swarmd.store.core import ModelStore, PushRequest

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from swarmd.store.config import StoreConfig
    from swarmd.store.core import ModelStore, PushRequest
    root, stage, digest, path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    data = Path(path).read_bytes()
    store = ModelStore(Path(root), StoreConfig())
    up = store.begin(PushRequest("crash", digest, len(data), "1"))
    if stage == "mid-upload":
        up.write(data[: len(data) // 2])
        print("written", flush=True)
        time.sleep(60)  # the parent kills us here
    elif stage == "after-rename":
        up.write(data)
        up.session.finish()
        up.session.commit()  # blob renamed into place, metadata row not yet written
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_child(root: Path, stage: str, data: bytes, tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), stage, digest, str(src)],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        if stage == "mid-upload":
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"written"
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_kill_mid_upload_then_resume(tmp_path: Path) -> None:
    root = tmp_path / "store"
    data = onnx_bytes(11, pad_floats=5000)
    run_child(root, "mid-upload", data, tmp_path)
    store = ModelStore(root, StoreConfig())
    try:
        with pytest.raises(SwarmdError) as e:
            store.get("crash", "1")
        assert e.value.code == ERR_NOT_FOUND
        assert store.list() == [] and store.blobs.digests() == set()
        digest = hashlib.sha256(data).hexdigest()
        assert store.blobs.received(digest) == len(data) // 2
        up = store.begin(PushRequest("crash", digest, len(data), "1"))  # the dead writer's lock is gone
        assert up.offset == len(data) // 2
        up.write(data[up.offset:])
        meta = store.complete(up)
        assert b"".join(store.read(meta.digest)) == data
    finally:
        store.close()


def test_kill_between_blob_and_row(tmp_path: Path) -> None:
    root = tmp_path / "store"
    data = onnx_bytes(12)
    run_child(root, "after-rename", data, tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    assert (root / "blobs" / digest[:2] / digest).is_file()  # the crash left an orphan blob
    store = ModelStore(root, StoreConfig())
    try:
        assert store.list() == []
        assert store.blobs.digests() == set()  # recovery collected it
    finally:
        store.close()
