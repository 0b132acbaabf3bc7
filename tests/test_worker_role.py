"""The worker role's methods on a node with local models (no store): params checks, lazy load, drain on stop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, ERR_NOT_READY, SwarmdError
from swarmd.roles.base import NodeContext
from swarmd.roles.worker import WorkerRole
from swarmd.settings import Settings
from swarmd.worker.config import WorkerConfig
from tests.conftest import node_context
from tests.models import mlp_model, two_output_model

MLP = (16, 32, 4)


def make_ctx(tmp_path, **worker) -> NodeContext:
    return node_context(tmp_path, "worker", settings=Settings(worker=WorkerConfig(**worker)))


@pytest.fixture
def model_files(tmp_path):
    two = tmp_path / "two.onnx"
    two.write_bytes(two_output_model())
    mlp = tmp_path / "mlp.onnx"
    mlp.write_bytes(mlp_model(MLP))
    return {"two": two, "mlp": mlp}


async def test_local_models_serve_and_describe(tmp_path, model_files):
    ctx = make_ctx(tmp_path, models=[f"two={model_files['two']}", f"mlp:2={model_files['mlp']}"])
    role = WorkerRole(ctx)
    await role.start()
    try:
        assert role.engine.state.value == "ONLINE"
        x = np.ones((2, 4), np.float32)
        out = await role.run_inference(None, {"model": "two", "inputs": {"x": x, "y": x}, "outputs": ["sum"]})
        assert out["model"] == "two" and out["version"] == "1"
        np.testing.assert_array_equal(out["outputs"]["sum"], x + x)
        models = (await role.get_available_models(None, {}))["models"]
        assert {(m["name"], m["version"], m["state"]) for m in models} == {("two", "1", "READY"), ("mlp", "2", "READY")}
        two = next(m for m in models if m["name"] == "two")
        assert two["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]},
                                 {"name": "y", "dtype": "float32", "shape": [-1, 4]}]
        cap = await role.check_capacity(None, {})
        assert cap["accepting"] and cap["state"] == "ONLINE" and cap["queue_depth"] == 0
        health = await role.get_health(None, {})
        assert health["status"] == "healthy" and sorted(health["models"]) == ["mlp:2", "two:1"]
        assert role.payload()["models"] == ["mlp", "two"]
    finally:
        await role.stop()
        await ctx.tasks.close()


@pytest.mark.parametrize(
    "params, message",
    [
        ([1], "params must be a map"),
        ({}, "'model' (the model name) is required"),
        ({"model": 5}, "'model' must be a string"),
        ({"model": "two"}, "'inputs'"),
        ({"model": "two", "version": 3, "inputs": {}}, "'version' must be a string"),
    ],
)
async def test_bad_params(tmp_path, model_files, params, message):
    ctx = make_ctx(tmp_path, models=[f"two={model_files['two']}"])
    role = WorkerRole(ctx)
    await role.start()
    try:
        with pytest.raises(SwarmdError) as info:
            await role.run_inference(None, params)
        assert info.value.code == ERR_BAD_REQUEST
        assert message in info.value.message
    finally:
        await role.stop()
        await ctx.tasks.close()


async def test_unload_then_load_again_on_demand(tmp_path, model_files):
    ctx = make_ctx(tmp_path, models=[f"mlp={model_files['mlp']}"])
    role = WorkerRole(ctx)
    await role.start()
    try:
        x = {"input": np.ones((1, MLP[0]), np.float32)}
        first = await role.run_inference(None, {"model": "mlp", "inputs": x})
        assert (await role.unload_model(None, {"model": "mlp"})) == {"model": "mlp", "unloaded": ["1"]}
        assert role.engine.get("mlp") is None
        again = await role.run_inference(None, {"model": "mlp", "inputs": x})  # loads from its file again
        np.testing.assert_array_equal(first["outputs"]["output"], again["outputs"]["output"])
        await role.unload_model(None, {"model": "mlp"})
        desc = await role.load_model(None, {"model": "mlp"})
        assert desc["state"] == "READY" and desc["name"] == "mlp"
        with pytest.raises(SwarmdError) as info:
            await role.load_model(None, {"model": "nope"})
        assert info.value.code == ERR_NOT_FOUND
        with pytest.raises(SwarmdError) as info:
            await role.run_inference(None, {"model": "nope", "inputs": x})
        assert info.value.code == ERR_NOT_FOUND
    finally:
        await role.stop()
        await ctx.tasks.close()
    assert len(role.tasks) == 0, role.tasks.describe()  # stop() closed the role's scope, loads included


async def test_stop_drains_accepted_requests(tmp_path, model_files):
    ctx = make_ctx(tmp_path, models=[f"mlp={model_files['mlp']}"], max_queue=512)
    role = WorkerRole(ctx)
    await role.start()
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, MLP[0])).astype(np.float32) for _ in range(150)]
    tasks = [asyncio.create_task(role.run_inference(None, {"model": "mlp", "inputs": {"input": x}})) for x in xs]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(role.stop())
    await asyncio.sleep(0)
    with pytest.raises(SwarmdError) as info:
        await role.run_inference(None, {"model": "mlp", "inputs": {"input": xs[0]}})
    assert info.value.code == ERR_NOT_READY
    await stopping
    results = await asyncio.gather(*tasks)
    assert len(results) == 150 and all(r["outputs"]["output"].shape == (1, MLP[-1]) for r in results)
    await ctx.tasks.close()
