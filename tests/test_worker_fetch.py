"""A worker with no local models fetches them from a real store role over a real swarm:
resolve name[:version] with getModel, download by digest, verify, cache, load, serve."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
import pytest

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.roles.worker import WorkerRole
from swarmd.topics import blob_topic
from swarmd.worker.config import WorkerConfig
from tests.dht_testnet import DhtTestnet
from tests.models import mlp_model
from tests.test_worker_swarm import SwarmNode, wait_for_record

MLP = (16, 32, 4)


@pytest.fixture
async def net():  # noqa: ANN201
    n = await DhtTestnet.create(6)
    yield n
    await n.close()


async def start_store(net, tmp_path, blobs: dict[str, bytes]):  # noqa: ANN001, ANN201
    """A store node already holding `blobs` ({"name:version": onnx bytes}), announced on the swarm."""
    from swarmd.roles.store import StoreRole
    from swarmd.store.core import ModelStore

    node = SwarmNode(net, tmp_path)
    node.ctx.roles = ("store",)
    core = ModelStore(tmp_path / "store", node.ctx.settings.store)
    for spec, blob in blobs.items():
        name, version = spec.split(":")
        path = tmp_path / f"{name}-{version}.onnx"
        path.write_bytes(blob)
        core.put_file(path, name, version)
    core.close()
    await node.start()
    role = StoreRole(node.ctx)
    node.ctx._roles["store"] = role
    await role.start()
    return node, role


async def test_fetch_resolve_cache_and_serve(net, tmp_path):
    v1, v2 = mlp_model(MLP, seed=1), mlp_model(MLP, seed=2)
    store, store_role = await start_store(net, tmp_path / "s", {"mlp:1": v1, "mlp:2": v2})
    wnode = await SwarmNode(net, tmp_path / "w", announce_interval=0.2).start()
    worker = WorkerRole(wnode.ctx)
    client = await SwarmNode(net, tmp_path / "c").start()
    try:
        await worker.start()
        wk = wnode.identity.public_key
        for blob in (v1, v2):  # the store has announced what it holds
            await wait_for_record(client.swarm, blob_topic(hashlib.sha256(blob).hexdigest()), store.identity.public_key)
        x = np.random.default_rng(0).standard_normal((3, MLP[0])).astype(np.float32)
        call = {"model": "mlp", "inputs": {"input": x}}
        out = await client.swarm.request(wk, "runInference", call, timeout=60)  # fetched and loaded on demand
        assert out["version"] == "2"
        direct2 = ort.InferenceSession(v2, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(out["outputs"]["output"], direct2.run(None, {"input": x})[0])
        d2 = hashlib.sha256(v2).hexdigest()
        assert worker.cache.get(d2).read_bytes() == v2 and d2 in worker.cache.pinned
        desc = await client.swarm.request(wk, "loadModel", {"model": "mlp", "version": "1"}, timeout=60)
        assert desc["digest"] == hashlib.sha256(v1).hexdigest() and desc["state"] == "READY"
        out1 = await client.swarm.request(wk, "runInference", {**call, "version": "1"}, timeout=60)
        direct1 = ort.InferenceSession(v1, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(out1["outputs"]["output"], direct1.run(None, {"input": x})[0])
        await wait_for_record(client.swarm, "swarmd/workers/mlp", wk, lambda p: p["state"] == "ONLINE")
        with pytest.raises(SwarmdError) as info:
            await client.swarm.request(wk, "runInference", {**call, "model": "absent"}, timeout=60)
        assert info.value.code == ERR_NOT_FOUND
        with pytest.raises(SwarmdError) as info:
            await client.swarm.request(wk, "loadModel", {"model": "mlp", "version": "9"}, timeout=60)
        assert info.value.code == ERR_NOT_FOUND
        # Unloaded, then loaded again with every store gone: from the cache, by its known digest.
        await worker.unload_model(None, {"model": "mlp", "version": "2"})
        assert d2 not in worker.cache.pinned
        await store_role.stop()
        await store.stop()
        assert (await worker.load_model(None, {"model": "mlp", "version": "2"}))["digest"] == d2
    finally:
        await worker.stop()
        await client.stop()
        await wnode.stop()
        await store_role.stop()
        await store.stop()


async def test_colocated_store_blob_used_in_place(net, tmp_path):
    blob = mlp_model(MLP, seed=5)
    store, store_role = await start_store(net, tmp_path, {"m:1": blob})
    try:
        store.ctx.settings.worker = WorkerConfig()
        worker = WorkerRole(store.ctx)  # same node: worker + store
        await worker.start()
        try:
            desc = await worker.load_model(None, {"model": "m"})
            assert desc["digest"] == hashlib.sha256(blob).hexdigest()
            assert worker.cache.used() == 0  # no copy: loaded from the store's verified blob
            x = np.ones((1, MLP[0]), np.float32)
            out = await worker.run_inference(None, {"model": "m", "inputs": {"input": x}})
            assert out["outputs"]["output"].shape == (1, MLP[-1])
        finally:
            await worker.stop()
    finally:
        await store_role.stop()
        await store.stop()


async def test_corrupt_store_blob_is_refused_then_fetched_from_a_good_store(net, tmp_path):
    blob = mlp_model(MLP, seed=9)
    digest = hashlib.sha256(blob).hexdigest()
    bad, bad_role = await start_store(net, tmp_path / "bad", {"m:1": blob})
    path = bad_role.core.blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # rots on disk after it was stored and announced
    path.write_bytes(bytes(data))
    wnode = await SwarmNode(net, tmp_path / "w").start()
    worker = WorkerRole(wnode.ctx)
    good = good_role = None
    try:
        await worker.start()
        await wait_for_record(wnode.swarm, blob_topic(digest), bad.identity.public_key)
        with pytest.raises(SwarmdError) as info:
            await worker.load_model(None, {"model": "m"})
        assert "ERR_CORRUPT" in info.value.message
        assert worker.cache.used() == 0 and list(worker.cache.tmp_dir.iterdir()) == []  # nothing half-written kept
        good, good_role = await start_store(net, tmp_path / "good", {"m:1": blob})
        await wait_for_record(wnode.swarm, blob_topic(digest), good.identity.public_key)
        desc = await worker.load_model(None, {"model": "m"})
        assert desc["digest"] == digest and worker.cache.get(digest).read_bytes() == blob
    finally:
        await worker.stop()
        await wnode.stop()
        for role, node in ((bad_role, bad), (good_role, good)):
            if role is not None:
                await role.stop()
                await node.stop()


async def test_preload_at_start_and_missing_preload_is_not_fatal(net, tmp_path):
    blob = mlp_model(MLP, seed=6)
    store, store_role = await start_store(net, tmp_path, {"pre:3": blob})
    try:
        store.ctx.settings.worker = WorkerConfig(preload=["pre:3", "absent"])
        worker = WorkerRole(store.ctx)
        await worker.start()  # "absent" is logged and skipped; it may appear in a store later
        try:
            assert [(m.name, m.version) for m in worker.engine.models()] == [("pre", "3")]
            assert worker.engine.state.value == "ONLINE"
        finally:
            await worker.stop()
    finally:
        await store_role.stop()
        await store.stop()


async def test_download_resumes_from_an_offset(net, tmp_path):
    """A transfer cut short goes on from the bytes already received (here: half, written beforehand)."""
    blob = mlp_model((64, 256, 4), seed=7)
    digest = hashlib.sha256(blob).hexdigest()
    store, store_role = await start_store(net, tmp_path / "s", {"r:1": blob})
    wnode = await SwarmNode(net, tmp_path / "w").start()
    worker = WorkerRole(wnode.ctx)
    try:
        await worker.start()
        writer = worker.cache.writer(digest, len(blob))
        half = len(blob) // 2
        writer.write(blob[:half])
        await worker.fetcher._pull(store.identity.public_key, digest, writer)
        assert writer.received == len(blob)
        assert writer.commit().read_bytes() == blob
    finally:
        await worker.stop()
        await wnode.stop()
        await store_role.stop()
        await store.stop()
