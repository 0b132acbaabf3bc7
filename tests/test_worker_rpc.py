"""The worker over real RPC on loopback: tensors in and out, error codes, deadlines, drain."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.node.identity import Identity
from swarmd.roles.worker import WorkerRole
from swarmd.rpc import Methods, RpcServer, connect
from swarmd.settings import Settings
from swarmd.worker.config import WorkerConfig
from tests.conftest import node_context
from tests.models import mlp_model, two_output_model

MLP = (16, 32, 4)


class Served:
    """A worker role behind a real RpcServer on 127.0.0.1, and a client connected to it."""

    def __init__(self, tmp_path, **worker) -> None:
        self.identity = Identity.generate()
        self.methods = Methods()
        self.ctx = node_context(tmp_path, "worker", settings=Settings(worker=WorkerConfig(**worker)),
                                identity=self.identity, methods=self.methods)
        self.role = WorkerRole(self.ctx)
        self.server = RpcServer(self.identity, self.methods)
        self.peer = None

    async def __aenter__(self) -> Served:
        await self.role.start()
        await self.server.start()
        self.peer = await connect(None, "127.0.0.1", self.server.port, remote_public_key=self.identity.public_key)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.peer.close()
        await self.role.stop()
        await self.server.stop()
        await self.ctx.tasks.close()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "two.onnx").write_bytes(two_output_model())
    (tmp_path / "mlp.onnx").write_bytes(mlp_model(MLP))
    return [f"two={tmp_path / 'two.onnx'}", f"mlp={tmp_path / 'mlp.onnx'}"]


async def test_inference_over_rpc(tmp_path, files):
    async with Served(tmp_path, models=files) as s:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = await s.peer.call("runInference", {"model": "two", "inputs": {"x": x, "y": x}}, timeout=30)
        assert out["model"] == "two" and out["version"] == "1"
        assert isinstance(out["outputs"]["prod"], np.ndarray)
        np.testing.assert_array_equal(out["outputs"]["prod"], x * x)
        np.testing.assert_array_equal(out["outputs"]["sum"], x + x)
        big_endian = x.astype(">f4")
        out = await s.peer.call("runInference", {"model": "two", "inputs": {"x": big_endian, "y": x}, "outputs": ["sum"]},
                                timeout=30)
        assert list(out["outputs"]) == ["sum"]
        np.testing.assert_array_equal(out["outputs"]["sum"], x + x)
        models = await s.peer.call("getAvailableModels", {}, timeout=30)
        assert {m["name"] for m in models["models"]} == {"two", "mlp"}
        cap = await s.peer.call("checkCapacity", {}, timeout=30)
        assert cap["state"] == "ONLINE" and cap["accepting"] is True
        health = await s.peer.call("getHealth", {}, timeout=30)
        assert health["status"] == "healthy"


async def test_errors_over_rpc(tmp_path, files):
    async with Served(tmp_path, models=files) as s:
        with pytest.raises(SwarmdError) as info:
            await s.peer.call("runInference", {"model": "mlp", "inputs": {"input": np.zeros((1, 15), np.float32)}}, timeout=30)
        assert info.value.code == ERR_BAD_REQUEST
        assert info.value.message == "input 'input' has shape [1, 15], expected [-1, 16]"
        with pytest.raises(SwarmdError) as info:
            await s.peer.call("runInference", {"model": "none", "inputs": {}}, timeout=30)
        assert info.value.code == ERR_NOT_FOUND
        with pytest.raises(SwarmdError) as info:
            await s.peer.call("runInference", {"model": "mlp", "inputs": {"input": [[0.0] * 16]}}, timeout=30)
        assert info.value.code == ERR_BAD_REQUEST


async def test_load_unload_over_rpc(tmp_path, files):
    async with Served(tmp_path, models=files) as s:
        assert (await s.peer.call("unloadModel", {"model": "mlp"}, timeout=30))["unloaded"] == ["1"]
        assert "mlp" not in {m["name"] for m in (await s.peer.call("getAvailableModels", {}, timeout=30))["models"]}
        desc = await s.peer.call("loadModel", {"model": "mlp"}, timeout=30)
        assert desc["state"] == "READY" and desc["inputs"][0]["shape"] == [-1, 16]


async def test_overload_and_deadline_over_rpc(tmp_path, files):
    import threading

    async with Served(tmp_path, models=files, max_queue=2, batching=False, max_concurrent_inferences=1) as s:
        gate = threading.Event()
        blocker = s.role.engine.executor.submit(gate.wait, 60)
        try:
            x = {"input": np.ones((1, 16), np.float32)}
            call = lambda t=30: s.peer.call("runInference", {"model": "mlp", "inputs": x}, timeout=t)  # noqa: E731
            first = asyncio.create_task(call())
            eng = s.role.engine
            while eng.in_flight < 1:
                await asyncio.sleep(0.001)
            # The caller's deadline travels in the envelope: it expires while queued, never runs.
            with pytest.raises(SwarmdError) as info:
                await call(0.2)
            assert info.value.code == ERR_TIMEOUT
            queued = [asyncio.create_task(call()) for _ in range(2)]
            while eng.queued < 2:
                await asyncio.sleep(0.001)
            with pytest.raises(SwarmdError) as info:
                await call()
            assert info.value.code == ERR_OVERLOADED
        finally:
            gate.set()
            blocker.result()
        await first
        await asyncio.gather(*queued)
        assert eng.snapshot().batches == 3


async def test_drain_over_rpc_loses_nothing(tmp_path, files):
    s = Served(tmp_path, models=files, max_queue=512, max_batch_size=8)
    await s.__aenter__()
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(200)]
    tasks = [asyncio.create_task(s.peer.call("runInference", {"model": "mlp", "inputs": {"input": x}}, timeout=60)) for x in xs]
    eng = s.role.engine
    while eng.queued + eng.in_flight + eng.snapshot().completed < 200:
        await asyncio.sleep(0.001)
    stopping = asyncio.create_task(s.role.stop())
    await asyncio.sleep(0)
    with pytest.raises(SwarmdError) as info:
        await s.peer.call("runInference", {"model": "mlp", "inputs": {"input": xs[0]}}, timeout=30)
    assert info.value.code == ERR_NOT_READY
    await stopping
    results = await asyncio.gather(*tasks)
    ref = np.concatenate(xs)
    assert len(results) == 200
    got = np.concatenate([r["outputs"]["output"] for r in results])
    import onnxruntime as ort

    sess = ort.InferenceSession(mlp_model(MLP), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, np.concatenate([sess.run(None, {"input": x})[0] for x in xs]))
    assert ref.shape == (200, 16)
    await s.peer.close()
    await s.server.stop()
    await s.ctx.tasks.close()
