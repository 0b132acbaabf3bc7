"""The worker core with real onnxruntime on tiny models: validation, batching, overload, deadlines, drain."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import numpy as np
import onnxruntime as ort
import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_INVALID_MODEL,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ConfigError,
    SwarmdError,
)
from swarmd.worker.batcher import Pending, take_batch
from swarmd.worker.config import BatchingConfig, WorkerConfig, parse_local_model
from swarmd.worker.engine import InferenceEngine, WorkerState
from tests.models import fixed_shape_model, gather_model, mlp_model, two_output_model

MLP = (16, 32, 32, 4)


def cfg(**kw) -> WorkerConfig:
    kw.setdefault("max_concurrent_inferences", 1)
    return WorkerConfig(**kw)


async def settle(predicate, limit: float = 30.0) -> None:
    """Yield to the loop until `predicate()` holds (the engine has no event for every count)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


OPEN_GATES: list[threading.Event] = []


class Gate:
    """Occupies the engine's only executor thread until opened, so requests pile up deterministically."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.event = threading.Event()
        OPEN_GATES.append(self.event)
        self.fut = engine.executor.submit(self.event.wait, 60)

    def open(self) -> None:
        self.event.set()


@pytest.fixture
async def engine_factory():
    engines: list[InferenceEngine] = []

    def make(**kw) -> InferenceEngine:
        e = InferenceEngine(cfg(**kw))
        engines.append(e)
        return e

    yield make
    for gate in OPEN_GATES:
        gate.set()
    OPEN_GATES.clear()
    for e in engines:
        await e.close()


# -- validation ---------------------------------------------------------------


async def test_runs_and_selects_outputs(engine_factory):
    e = engine_factory()
    await e.load("two", "1", two_output_model())
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = np.full((2, 4), 2, dtype=np.float32)
    r = await e.infer("two", {"x": x, "y": y})
    assert (r.model, r.version) == ("two", "1")
    np.testing.assert_array_equal(r.outputs["sum"], x + y)
    np.testing.assert_array_equal(r.outputs["prod"], x * y)
    r = await e.infer("two", {"x": x, "y": y}, outputs=["prod"])
    assert list(r.outputs) == ["prod"]
    assert r.outputs["prod"].dtype == np.float32


@pytest.mark.parametrize(
    "inputs, outputs, message",
    [
        ({"x": np.zeros((1, 783), np.float32)}, None, "input 'x' has shape [1, 783], expected [-1, 4]"),
        ({"x": np.zeros((1, 4), np.float64)}, None, "input 'x' has dtype float64, expected float32"),
        ({"x": np.zeros((4,), np.float32)}, None, "input 'x' has shape [4], expected [-1, 4]"),
        ({"x": [[1.0, 2.0, 3.0, 4.0]]}, None, "input 'x' must be a tensor"),
        ({}, None, "missing input 'x' (float32 [-1, 4]) of model 'two'"),
        ({"z": np.zeros((1, 4), np.float32)}, None, "model 'two' has no input 'z'; its inputs are 'x' (float32 [-1, 4])"),
        ([1, 2], None, "inputs must be a map"),
        ({"x": np.zeros((1, 4), np.float32)}, ["nope"], "model 'two' has no output 'nope'"),
        ({"x": np.zeros((1, 4), np.float32)}, [], "outputs is empty"),
        ({"x": np.zeros((1, 4), np.float32)}, "sum", "outputs must be a list of output names"),
        ({"x": np.zeros((0, 4), np.float32)}, None, "input 'x' has an empty batch (0 rows)"),
    ],
)
async def test_validation_errors(engine_factory, inputs, outputs, message):
    e = engine_factory()
    await e.load("two", "1", two_output_model())
    if isinstance(inputs, dict) and "x" in inputs and "y" not in inputs:
        x = inputs["x"]
        inputs = {**inputs, "y": np.zeros((x.shape[0] if isinstance(x, np.ndarray) and x.ndim else 1, 4), np.float32)}
    with pytest.raises(SwarmdError) as info:
        await e.infer("two", inputs, outputs=outputs)
    assert info.value.code == ERR_BAD_REQUEST
    assert message in info.value.message
    assert e.queued == 0 and e.in_flight == 0


async def test_batch_sizes_must_agree(engine_factory):
    e = engine_factory()
    await e.load("two", "1", two_output_model())
    with pytest.raises(SwarmdError) as info:
        await e.infer("two", {"x": np.zeros((2, 4), np.float32), "y": np.zeros((3, 4), np.float32)})
    assert info.value.code == ERR_BAD_REQUEST
    assert info.value.message == "inputs disagree on the batch size: 'x' has 2 rows, 'y' has 3"


async def test_fixed_shape_model_is_not_batched_and_checks_every_dim(engine_factory):
    e = engine_factory()
    m = await e.load("fixed", "1", fixed_shape_model())
    assert not m.policy.enabled
    out = await e.infer("fixed", {"x": np.array([[-1, 2, -3], [4, -5, 6]], np.float32)})
    np.testing.assert_array_equal(out.outputs["y"], [[0, 2, 0], [4, 0, 6]])
    with pytest.raises(SwarmdError) as info:
        await e.infer("fixed", {"x": np.zeros((1, 3), np.float32)})
    assert info.value.message == "input 'x' has shape [1, 3], expected [2, 3]"


async def test_unknown_model_and_version(engine_factory):
    e = engine_factory()
    await e.load("two", "1", two_output_model())
    for model, version in (("other", None), ("two", "7")):
        with pytest.raises(SwarmdError) as info:
            await e.infer(model, {}, version=version)
        assert info.value.code == ERR_NOT_FOUND


async def test_unparseable_model_is_refused(engine_factory, tmp_path):
    e = engine_factory()
    with pytest.raises(SwarmdError) as info:
        await e.load("junk", "1", b"this is not onnx")
    assert info.value.code == ERR_INVALID_MODEL
    assert e.get("junk") is None and e.describe_models() == []


async def test_failing_input_fails_alone_inside_a_batch(engine_factory):
    e = engine_factory(max_batch_size=8)
    await e.load("gather", "1", gather_model(rows=10))
    gate = Gate(e)
    good = [asyncio.create_task(e.infer("gather", {"idx": np.array([i], np.int64)})) for i in range(3)]
    bad = asyncio.create_task(e.infer("gather", {"idx": np.array([99], np.int64)}))
    await settle(lambda: e.queued + e.in_flight == 4)
    gate.open()
    for i, t in enumerate(good):
        np.testing.assert_array_equal((await t).outputs["out"], [[3 * i, 3 * i + 1, 3 * i + 2]])
    with pytest.raises(SwarmdError) as info:
        await bad
    assert info.value.code == ERR_BAD_REQUEST
    assert "model 'gather' failed on this input" in info.value.message


# -- batching -------------------------------------------------------------------


async def test_batched_results_equal_unbatched(engine_factory):
    blob = mlp_model(MLP, seed=3)
    direct = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    e = engine_factory(max_batch_size=16)
    await e.load("mlp", "1", blob)
    rng = np.random.default_rng(7)
    reqs = [rng.standard_normal((1 + i % 3, MLP[0])).astype(np.float32) for i in range(30)]
    gate = Gate(e)
    tasks = [asyncio.create_task(e.infer("mlp", {"input": x})) for x in reqs]
    await settle(lambda: e.queued + e.in_flight == len(reqs))
    gate.open()
    results = await asyncio.gather(*tasks)
    for x, r in zip(reqs, results, strict=True):
        np.testing.assert_array_equal(r.outputs["output"], direct.run(None, {"input": x})[0])
    snap = e.snapshot()
    assert snap.completed == 30
    assert snap.batches < 30  # requests really shared runs
    assert snap.mean_batch > 1


async def test_batching_off_runs_each_request_alone(engine_factory):
    e = engine_factory(batching=False)
    await e.load("mlp", "1", mlp_model(MLP))
    gate = Gate(e)
    tasks = [asyncio.create_task(e.infer("mlp", {"input": np.ones((1, MLP[0]), np.float32)})) for _ in range(5)]
    await settle(lambda: e.queued + e.in_flight == 5)
    gate.open()
    await asyncio.gather(*tasks)
    assert e.snapshot().batches == 5


async def test_queue_delay_gathers_a_batch(engine_factory):
    # One free slot and a long delay: the first request waits for the batch to fill.
    e = engine_factory(model_batching={"mlp": {"max_batch_size": 4, "max_queue_delay_us": 30_000_000}})
    await e.load("mlp", "1", mlp_model(MLP))
    tasks = [asyncio.create_task(e.infer("mlp", {"input": np.ones((1, MLP[0]), np.float32)})) for _ in range(4)]
    await asyncio.gather(*tasks)
    snap = e.snapshot()
    assert (snap.batches, snap.mean_batch) == (1, 4)


def _pending(rows: int, outputs=("o",), width: int = 4) -> Pending:
    feeds = {"x": np.zeros((rows, width), np.float32)}
    return Pending(feeds, outputs, rows, 0.0, 0.0, None)


def test_take_batch_respects_size_keys_and_order():
    policy = BatchingConfig(True, 4, 0)
    a, b, c, d, e = _pending(2), _pending(1, width=5), _pending(1, outputs=("p",)), _pending(2), _pending(1)
    q = deque([a, b, c, d, e])
    assert take_batch(q, policy) == [a, d]  # 2 + 2 rows fill the batch; b and c are incompatible
    assert list(q) == [b, c, e]
    assert take_batch(q, policy) == [b]
    assert take_batch(q, policy) == [c]
    assert take_batch(q, policy) == [e]
    assert take_batch(q, policy) == []
    big = _pending(9)
    assert take_batch(deque([big]), policy) == [big]  # too big for a batch still runs, alone
    assert take_batch(deque([a, d]), BatchingConfig(False, 4, 0)) == [a]


# -- overload, deadlines, drain -------------------------------------------------


async def test_overload_is_refused_at_once(engine_factory):
    e = engine_factory(max_queue=4, batching=False)
    await e.load("mlp", "1", mlp_model(MLP))
    x = {"input": np.ones((1, MLP[0]), np.float32)}
    gate = Gate(e)
    tasks = [asyncio.create_task(e.infer("mlp", x))]
    await settle(lambda: e.in_flight == 1)  # taken for a run, stuck behind the gate
    tasks += [asyncio.create_task(e.infer("mlp", x)) for _ in range(4)]
    await settle(lambda: e.queued == 4)
    assert not e.capacity()["accepting"]
    with pytest.raises(SwarmdError) as info:
        await e.infer("mlp", x)  # answered without waiting on the gate
    assert info.value.code == ERR_OVERLOADED
    gate.open()
    assert len(await asyncio.gather(*tasks)) == 5


async def test_expired_request_is_dropped_before_it_runs(engine_factory):
    e = engine_factory(batching=False)
    await e.load("mlp", "1", mlp_model(MLP))
    x = {"input": np.ones((1, MLP[0]), np.float32)}
    gate = Gate(e)
    first = asyncio.create_task(e.infer("mlp", x))
    await settle(lambda: e.in_flight == 1)
    with pytest.raises(SwarmdError) as info:
        await e.infer("mlp", x, budget=0.05)
    assert info.value.code == ERR_TIMEOUT
    assert "not run" in info.value.message
    assert e.queued == 0
    gate.open()
    await first
    snap = e.snapshot()
    assert (snap.batches, snap.completed, snap.failed) == (1, 1, 1)  # the expired one never ran
    with pytest.raises(SwarmdError) as info:
        await e.infer("mlp", x, budget=0)
    assert info.value.code == ERR_TIMEOUT


async def test_cancelled_caller_frees_its_place(engine_factory):
    e = engine_factory(batching=False, max_queue=1)
    await e.load("mlp", "1", mlp_model(MLP))
    x = {"input": np.ones((1, MLP[0]), np.float32)}
    gate = Gate(e)
    first = asyncio.create_task(e.infer("mlp", x))
    await settle(lambda: e.in_flight == 1)
    second = asyncio.create_task(e.infer("mlp", x))
    await settle(lambda: e.queued == 1)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert e.queued == 0
    third = asyncio.create_task(e.infer("mlp", x))  # room again
    gate.open()
    await first
    await third
    assert e.snapshot().batches == 2


async def test_drain_under_load_loses_nothing(engine_factory):
    e = engine_factory(max_queue=256, max_batch_size=8, max_concurrent_inferences=2)
    await e.load("mlp", "1", mlp_model(MLP))
    e.set_online()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, MLP[0])).astype(np.float32) for _ in range(200)]
    tasks = [asyncio.create_task(e.infer("mlp", {"input": x})) for x in xs]
    await asyncio.sleep(0)  # let every request be admitted
    assert e.queued + e.in_flight == 200
    drained = asyncio.create_task(e.drain(grace=60))
    await asyncio.sleep(0)
    assert e.state is WorkerState.DRAINING
    with pytest.raises(SwarmdError) as info:
        await e.infer("mlp", {"input": xs[0]})
    assert info.value.code == ERR_NOT_READY
    assert await drained
    results = await asyncio.gather(*tasks)
    direct = e.get("mlp").runtime
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(r.outputs["output"], direct.run(("output",), {"input": x})[0])
    assert e.snapshot().completed == 200


async def test_unload_finishes_accepted_requests(engine_factory):
    e = engine_factory(batching=False)
    await e.load("mlp", "1", mlp_model(MLP))
    gate = Gate(e)
    tasks = [asyncio.create_task(e.infer("mlp", {"input": np.ones((1, MLP[0]), np.float32)})) for _ in range(3)]
    await settle(lambda: e.queued + e.in_flight == 3)
    unloading = asyncio.create_task(e.unload("mlp"))
    await asyncio.sleep(0)
    with pytest.raises(SwarmdError) as info:
        await e.infer("mlp", {"input": np.ones((1, MLP[0]), np.float32)})
    assert info.value.code == ERR_NOT_FOUND
    gate.open()
    assert await unloading == ["1"]
    assert len(await asyncio.gather(*tasks)) == 3
    assert e.get("mlp") is None
    with pytest.raises(SwarmdError) as info:
        await e.unload("mlp")
    assert info.value.code == ERR_NOT_FOUND


async def test_versions_and_stats(engine_factory, tmp_path):
    e = engine_factory()
    path = tmp_path / "two.onnx"
    path.write_bytes(two_output_model())
    m1 = await e.load("two", "1", path)
    m2 = await e.load("two", "2", two_output_model())
    assert m1.digest == m2.digest and len(m1.digest) == 64
    assert e.get("two").version == "2" and e.get("two", "1") is m1
    x = np.ones((1, 4), np.float32)
    r = await e.infer("two", {"x": x, "y": x}, version="1")
    assert r.version == "1"
    cap = e.capacity()
    assert cap["state"] == "JOINING" and cap["models"] == 2 and cap["accepting"]
    e.set_online()
    assert e.capacity()["state"] == "ONLINE"
    assert {m["version"] for m in e.describe_models()} == {"1", "2"}
    assert e.snapshot().ewma_ms > 0


def test_config_checks():
    c = WorkerConfig(model_batching={"mlp": {"max_batch_size": 64}})
    assert c.batching_for("mlp") == BatchingConfig(True, 64, 0)
    assert c.batching_for("other") == BatchingConfig(True, 32, 0)
    for bad in ({"mlp": {"max_batch": 3}}, {"mlp": {"max_batch_size": 0}}, {"mlp": 3}, {"mlp": {"batching": "yes"}}):
        with pytest.raises(ConfigError):
            WorkerConfig(model_batching=bad).validate()
    with pytest.raises(ConfigError):
        WorkerConfig(max_queue=0).validate()
    assert parse_local_model("mlp=/m/a.onnx") == ("mlp", "1", "/m/a.onnx")
    assert parse_local_model("mlp:3=/m/a.onnx") == ("mlp", "3", "/m/a.onnx")
    with pytest.raises(ConfigError):
        parse_local_model("/m/a.onnx")


async def test_inline_runs_on_an_idle_worker_and_threads_under_load(engine_factory):
    blob = mlp_model(MLP, seed=4)
    direct = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    e = engine_factory(inline_run_us=10_000_000, max_batch_size=8)
    await e.load("mlp", "1", blob)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, MLP[0])).astype(np.float32) for _ in range(12)]
    first = await e.infer("mlp", {"input": xs[0]})  # run time unknown yet: a thread
    gate = Gate(e)  # the only executor thread is now blocked
    second = await e.infer("mlp", {"input": xs[1]})  # answered anyway: it ran on the loop
    for x, r in ((xs[0], first), (xs[1], second)):
        np.testing.assert_array_equal(r.outputs["output"], direct.run(None, {"input": x})[0])
    # A burst admitted in one loop turn is batched into a thread, not run one by one inline.
    tasks = [asyncio.create_task(e.infer("mlp", {"input": x})) for x in xs[2:]]
    await settle(lambda: e.in_flight > 0)
    assert e.in_flight == 8 and e.queued == 2
    gate.open()
    for x, r in zip(xs[2:], await asyncio.gather(*tasks), strict=True):
        np.testing.assert_array_equal(r.outputs["output"], direct.run(None, {"input": x})[0])


async def test_a_request_larger_than_any_measured_never_runs_inline(engine_factory):
    """Many quick batch-1 runs must not let a 150k-row request run on the loop thread (it froze it 6.5 s)."""
    blob = mlp_model(MLP, seed=4)
    direct = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    e = engine_factory(inline_run_us=10_000_000, max_batch_size=8)
    await e.load("mlp", "1", blob)
    rng = np.random.default_rng(3)
    one = rng.standard_normal((1, MLP[0])).astype(np.float32)
    for _ in range(30):
        await e.infer("mlp", {"input": one})  # quick lone runs: the per-model average says "inline"
    gate = Gate(e)  # the only executor thread is now blocked
    await e.infer("mlp", {"input": one})  # a measured size still runs on the loop
    big = rng.standard_normal((150_000, MLP[0])).astype(np.float32)
    task = asyncio.create_task(e.infer("mlp", {"input": big}))
    await settle(lambda: e.in_flight == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done(), "a request larger than any measured ran inline on the event loop"
    gate.open()
    r = await task
    np.testing.assert_allclose(r.outputs["output"], direct.run(None, {"input": big})[0], rtol=1e-5, atol=1e-5)


async def test_model_count_is_bounded(engine_factory):
    e = engine_factory(max_models=2)
    await e.load("a", "1", two_output_model())
    await e.load("b", "1", two_output_model())
    with pytest.raises(SwarmdError) as info:
        await e.load("c", "1", two_output_model())
    assert info.value.code == ERR_OVERLOADED and "max_models" in info.value.message
    await e.unload("a")
    await e.load("c", "1", two_output_model())


def test_batchable_needs_one_named_batch_dim():
    from swarmd.signature import ModelSignature, TensorSpec

    def sig(in0, out0, out_shape=(-1, 3)):
        return ModelSignature((TensorSpec("x", "float32", (-1, 3), in0),), (TensorSpec("y", "float32", out_shape, out0),))

    assert sig("batch", "batch").batchable
    assert sig(None, None).batchable  # unnamed dynamic dims (e.g. skl2onnx): assumed to be the batch
    assert sig("batch", None).batchable
    assert not sig("batch", "n_found").batchable  # another quantity that happens to be dynamic
    assert not sig("batch", "batch", (3,)).batchable


async def test_nonzero_style_output_is_not_batched(engine_factory):
    from onnx import TensorProto, helper

    # y = indices of the non-zero entries of x: its first dim is not the batch.
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Transpose", ["nz"], ["y"])],
        "nz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["found", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    e = engine_factory()
    m = await e.load("nz", "1", model.SerializeToString())
    assert not m.policy.enabled
    r = await e.infer("nz", {"x": np.array([[1, 0], [0, 1]], np.float32)})
    np.testing.assert_array_equal(r.outputs["y"], [[0, 0], [1, 1]])
