"""The store role over real RPC on loopback: push, pull, resume, errors, replication between stores."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from store_models import onnx_bytes, write_model
from store_nodes import Node, start_store

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    ERR_CORRUPT,
    ERR_INVALID_MODEL,
    ERR_NOT_FOUND,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.node.identity import Identity
from swarmd.rpc import connect
from swarmd.store.transfer import pull_file, push_file

T = 30.0  # generous: the machine is shared


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await start_store(tmp_path / "a", max_model_bytes=8 << 20)
    yield n
    await n.stop()


@pytest.fixture
async def peer(node: Node) -> AsyncIterator[Any]:
    p = await connect(None, "127.0.0.1", node.server.port, remote_public_key=node.ident.public_key, timeout=T)
    yield p
    await p.close()


async def code(coro: Any) -> str:
    try:
        await coro
    except SwarmdError as e:
        return e.code
    raise AssertionError("expected a SwarmdError")


async def test_push_show_list_pull_delete(node: Node, peer: Any, tmp_path: Path) -> None:
    f = write_model(tmp_path / "m.onnx", seed=1, pad_floats=50_000)
    seen: list[tuple[int, int]] = []
    meta = await push_file(peer, f, "tiny", "1", tags=["t1"], description="d", chunk=16 * 1024,
                           progress=lambda d, t: seen.append((d, t)), timeout=T)
    assert meta["digest"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert meta["uploader"] != "" and len(meta["uploader"]) == 64
    assert seen[-1] == (f.stat().st_size, f.stat().st_size)
    assert await peer.call("getModel", {"name": "tiny"}, timeout=T) == meta
    assert await peer.call("getModel", {"name": "tiny", "version": "latest"}, timeout=T) == meta
    assert (await peer.call("listModels", {"tag": "t1"}, timeout=T))["models"] == [meta]
    assert (await peer.call("listModels", {"tag": "nope"}, timeout=T))["models"] == []
    out = tmp_path / "out.onnx"
    assert await pull_file(peer, meta["digest"], out, size=meta["size"], timeout=T) == meta["size"]
    assert out.read_bytes() == f.read_bytes()
    assert not (tmp_path / "out.onnx.part").exists()
    await peer.call("deleteModel", {"name": "tiny", "version": "1"}, timeout=T)
    assert await code(peer.call("getModel", {"name": "tiny"}, timeout=T)) == ERR_NOT_FOUND
    assert await code(pull_file(peer, meta["digest"], tmp_path / "gone", timeout=T)) == ERR_NOT_FOUND
    assert await code(peer.call("deleteModel", {"name": "tiny", "version": "1"}, timeout=T)) == ERR_NOT_FOUND


async def test_interrupted_upload_resumes(node: Node, peer: Any, tmp_path: Path) -> None:
    data = onnx_bytes(2, pad_floats=1_300_000)  # ~5 MiB: more than one write batch
    digest = hashlib.sha256(data).hexdigest()
    stream = await peer.open_stream("uploadModel", {"name": "r", "size": len(data), "sha256": digest})
    await stream.send(data[: 4_500_000])
    for _ in range(500):  # wait until the store has written a batch, then go away mid-upload
        received = (await peer.call("uploadStatus", {"sha256": digest}, timeout=T))["received"]
        if received >= 4 << 20:
            break
        await asyncio.sleep(0.01)
    assert 4 << 20 <= received <= 4_500_000
    stream.abort()
    with pytest.raises(SwarmdError):
        await stream.result()
    assert await code(peer.call("getModel", {"name": "r"}, timeout=T)) == ERR_NOT_FOUND
    received = (await peer.call("uploadStatus", {"sha256": digest}, timeout=T))["received"]
    assert 4 << 20 <= received <= 4_500_000  # what arrived before the abort is kept
    # resuming ahead of what the store has is refused with the right offset
    stream = await peer.open_stream("uploadModel", {"name": "r", "size": len(data), "sha256": digest,
                                                    "offset": len(data) - 10})
    assert await code(stream.result()) == ERR_BAD_REQUEST
    f = tmp_path / "r.onnx"
    f.write_bytes(data)
    sent: list[int] = []
    meta = await push_file(peer, f, "r", progress=lambda d, t: sent.append(d), timeout=T)
    # it resumed from what the store kept (the bytes still in flight at the abort may land after our look)
    assert received <= sent[0] <= 4_500_000
    assert meta["version"] == "1" and meta["size"] == len(data)


async def test_concurrent_pushes_of_same_model(node: Node, tmp_path: Path) -> None:
    f = write_model(tmp_path / "c.onnx", seed=3, pad_floats=30_000)
    peers = [await connect(None, "127.0.0.1", node.server.port, remote_public_key=node.ident.public_key)
             for _ in range(3)]
    try:
        metas = await asyncio.gather(*(push_file(p, f, "c", "1", chunk=8192, timeout=T) for p in peers))
    finally:
        for p in peers:
            await p.close()
    assert all(m == metas[0] for m in metas)
    assert len(node.role.core.list()) == 1


async def test_error_paths(node: Node, peer: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not onnx" * 10)
    assert await code(push_file(peer, bad, "bad", timeout=T)) == ERR_INVALID_MODEL
    assert node.role.core.blobs.digests() == set()
    assert list((node.role.core.root / "incoming").iterdir()) == []
    a = write_model(tmp_path / "a.onnx", seed=4)
    b = write_model(tmp_path / "b.onnx", seed=5)
    await push_file(peer, a, "m", "1", timeout=T)
    assert await code(push_file(peer, b, "m", "1", timeout=T)) == ERR_CONFLICT
    big = tmp_path / "big.onnx"
    big.write_bytes(onnx_bytes(6, pad_floats=2_200_000))  # over the 8 MiB limit of this store
    assert await code(push_file(peer, big, "big", timeout=T)) == ERR_TOO_LARGE
    assert await code(peer.call("getModel", {"name": "nope"}, timeout=T)) == ERR_NOT_FOUND
    assert await code(peer.call("getModel", {}, timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("getModel", ["m"], timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("getModel", {"name": "m", "bogus": 1}, timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("getModel", {"name": 5}, timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("listModels", {"tag": "bad tag"}, timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("uploadStatus", {"sha256": "xyz"}, timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("deleteModel", {"name": "m"}, timeout=T)) == ERR_BAD_REQUEST
    assert await code(peer.call("downloadBlob", {"digest": "0" * 64}, timeout=T)) == ERR_BAD_REQUEST  # not a stream
    s = await peer.open_stream("downloadBlob", {"digest": "0" * 64})
    assert await code(s.result()) == ERR_NOT_FOUND
    s = await peer.open_stream("uploadModel", {"name": "m", "size": -1, "sha256": "0" * 64})
    assert await code(s.result()) == ERR_BAD_REQUEST
    # wrong bytes for the declared digest
    data = a.read_bytes()
    s = await peer.open_stream("uploadModel", {"name": "w", "size": len(data), "sha256": "1" * 64})
    await s.send(data)
    await s.close()
    assert await code(s.result()) == ERR_CORRUPT
    assert await code(peer.call("noSuchMethod", {}, timeout=T)) == ERR_UNKNOWN_METHOD
    # the store keeps serving after all that
    assert len((await peer.call("listModels", {}, timeout=T))["models"]) == 1


async def test_corrupt_blob_is_refused_on_download(node: Node, peer: Any, tmp_path: Path) -> None:
    f = write_model(tmp_path / "z.onnx", seed=7, pad_floats=20_000)
    meta = await push_file(peer, f, "z", timeout=T)
    path = node.role.core.blobs.path(meta["digest"])
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-3:] = b"\x00\x01\x02"
    path.write_bytes(bytes(data))
    out = tmp_path / "z.out"
    assert await code(pull_file(peer, meta["digest"], out, timeout=T)) == ERR_CORRUPT
    assert not out.exists()
    assert node.role.core.missing() == {meta["digest"]}


async def wait_for(pred: Any, rounds: list[Node]) -> None:
    for _ in range(50):
        for n in rounds:
            await asyncio.wait_for(n.role.wait_round(), T)
        if pred():
            return
    raise AssertionError("condition not reached after 50 replication rounds")


async def test_replication_reaches_factor_and_survives_a_dead_store(tmp_path: Path) -> None:
    idents = [Identity.generate() for _ in range(3)]
    ports = []
    nodes: list[Node] = []
    try:
        # start servers first so each knows the others' addresses
        for i, ident in enumerate(idents):
            n = await start_store(tmp_path / f"s{i}", ident, replicate_interval=3600.0)
            ports.append(n.server.port)
            nodes.append(n)
        for n in nodes:
            n.role.set_static_peers([o.addr for o in nodes if o is not n])
        a = nodes[0]
        f = write_model(tmp_path / "m.onnx", seed=8, pad_floats=20_000)
        meta = a.role.core.put_file(f, "m", "1", tags=["x"])
        holders = lambda ns: [n for n in ns if meta.digest in n.role.core.holdings()]  # noqa: E731
        await wait_for(lambda: len(holders(nodes)) == 2, nodes)
        replica = next(n for n in holders(nodes) if n is not a)
        copy = replica.role.core.get("m", "1")
        assert (copy.created, copy.tags, copy.inputs) == (meta.created, meta.tags, meta.inputs)
        # a dies; the survivors bring the blob back to two copies
        await a.stop()
        nodes.remove(a)
        await wait_for(lambda: len(holders(nodes)) == 2, nodes)
        # a deletion on one store spreads to the other
        nodes[0].role.core.delete("m", "1")
        await wait_for(lambda: not holders(nodes), nodes)
        assert all(n.role.core.list() == [] for n in nodes)
    finally:
        for n in nodes:
            await n.stop()


async def test_replica_repairs_a_corrupt_blob(tmp_path: Path) -> None:
    a = await start_store(tmp_path / "a", replicate_interval=3600.0)
    b = await start_store(tmp_path / "b", replicate_interval=3600.0)
    try:
        a.role.set_static_peers([b.addr])
        b.role.set_static_peers([a.addr])
        f = write_model(tmp_path / "m.onnx", seed=9)
        meta = a.role.core.put_file(f, "m", "1")
        await wait_for(lambda: meta.digest in b.role.core.holdings(), [a, b])
        path = b.role.core.blobs.path(meta.digest)
        os.chmod(path, 0o644)
        path.write_bytes(b"rotten" + path.read_bytes()[6:])
        with pytest.raises(SwarmdError) as e:
            list(b.role.core.read(meta.digest))
        assert e.value.code == ERR_CORRUPT
        await wait_for(lambda: meta.digest in b.role.core.holdings(), [a, b])
        assert b"".join(b.role.core.read(meta.digest)) == f.read_bytes()
        # silent rot (same size, same mtime) that nobody reads: the scrub finds it, a replica refills it
        path = b.role.core.blobs.path(meta.digest)
        st = path.stat()
        os.chmod(path, 0o644)
        path.write_bytes(b"ROTTEN" + path.read_bytes()[6:])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        quarantined = len(list((b.role.core.root / "quarantine").iterdir()))

        def refilled() -> bool:
            return (len(list((b.role.core.root / "quarantine").iterdir())) > quarantined
                    and meta.digest in b.role.core.holdings())

        await wait_for(refilled, [a, b])
        assert b"".join(b.role.core.read(meta.digest)) == f.read_bytes()
    finally:
        await a.stop()
        await b.stop()


async def test_download_resumes_from_a_part_file_and_checks_it(node: Node, peer: Any, tmp_path: Path) -> None:
    f = write_model(tmp_path / "d.onnx", seed=13, pad_floats=60_000)
    data = f.read_bytes()
    meta = await push_file(peer, f, "d", timeout=T)
    out = tmp_path / "d.out"
    (tmp_path / "d.out.part").write_bytes(data[:100_000])  # an earlier pull that was interrupted
    seen: list[int] = []
    await pull_file(peer, meta["digest"], out, size=meta["size"], progress=lambda d, t: seen.append(d), timeout=T)
    assert seen[0] > 100_000 and seen[0] - 100_000 <= 256 * 1024  # the first chunk came after the part
    assert out.read_bytes() == data
    # a part holding other bytes cannot produce the digest: the pull fails and drops it
    out.unlink()
    (tmp_path / "d.out.part").write_bytes(b"\0" * 100_000)
    assert await code(pull_file(peer, meta["digest"], out, size=meta["size"], timeout=T)) == ERR_CORRUPT
    assert not out.exists() and not (tmp_path / "d.out.part").exists()


async def test_downloads_a_key_does_not_read_are_capped_and_time_out_cleanly(tmp_path: Path) -> None:
    """Four read-only connections calling only downloadBlob pinned +730 MiB and logged a traceback."""
    from loguru import logger

    # transfer_timeout: long enough that all twelve calls arrive while the first ones still wait
    node = await start_store(tmp_path / "s", transfer_timeout=4.0, max_downloads_per_peer=3, max_downloads=5)
    lines: list[str] = []
    sink = logger.add(lines.append, level="ERROR")
    hoarders = []
    try:
        pusher = await connect(None, "127.0.0.1", node.server.port, remote_public_key=node.ident.public_key, timeout=T)
        f = write_model(tmp_path / "big.onnx", seed=3, pad_floats=1_000_000)  # ~4 MB: more than a stream's credit
        meta = await push_file(pusher, f, "big", timeout=T)
        streams = []
        for _ in range(2):  # two keys that never read what they asked for
            h = await connect(None, "127.0.0.1", node.server.port, remote_public_key=node.ident.public_key, timeout=T)
            hoarders.append(h)
            for _ in range(6):
                streams.append(await h.open_stream("downloadBlob", {"digest": meta["digest"]}, timeout=T))
        results = await asyncio.gather(*(s.result() for s in streams), return_exceptions=True)
        codes = sorted(r.code for r in results if isinstance(r, SwarmdError))
        assert len(codes) == len(results) == 12, results
        # 3 per key, 5 in all ran, and ended with ERR_TIMEOUT; everything beyond was refused at once
        assert codes.count("ERR_TIMEOUT") == 5 and codes.count("ERR_OVERLOADED") == 7, codes
        assert node.role._downloads == {}
        assert not [ln for ln in lines if "handler raised" in ln], lines
        # a client that reads still gets the whole blob
        out = tmp_path / "big.out"
        await pull_file(pusher, meta["digest"], out, timeout=T)
        assert out.read_bytes() == f.read_bytes()
        await pusher.close()
    finally:
        logger.remove(sink)
        for h in hoarders:
            await h.close()
        await node.stop()
