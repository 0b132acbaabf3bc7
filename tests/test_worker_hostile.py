"""Whatever a peer sends as runInference params or a store as metadata, the answer is a coded error, never a crash."""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmd.errors import ALL_CODES, ERR_BAD_REQUEST, SwarmdError
from swarmd.signature import ModelSignature, TensorSpec
from swarmd.worker.fetch import check_metadata

SIG = ModelSignature(
    inputs=(TensorSpec("x", "float32", (-1, 4)), TensorSpec("ids", "int64", (-1,))),
    outputs=(TensorSpec("y", "float32", (-1, 2)),),
)

dtypes = st.sampled_from(["float32", "float64", "int64", "int32", "uint8", "bool", ">f4", "<i8", "U3", "float16"])
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
arrays = st.builds(lambda d, s: np.zeros(s, dtype=d), dtypes, shapes)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8))
values = st.one_of(arrays, scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=3))
inputs = st.one_of(
    st.dictionaries(st.sampled_from(["x", "ids", "z", ""]), values, max_size=3),
    values,
)
outputs = st.one_of(st.none(), values, st.lists(st.sampled_from(["y", "q", ""]), max_size=3))


@given(inputs=inputs, outputs=outputs, batch=st.booleans())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_validate_answers_or_raises_bad_request(inputs, outputs, batch):
    try:
        feeds, names, rows = SIG.validate("m", inputs, outputs, batch=batch)
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST and e.message
        return
    assert set(feeds) == {"x", "ids"}
    assert feeds["x"].dtype == np.float32 and feeds["x"].dtype.isnative and feeds["x"].shape[1:] == (4,)
    assert set(names) <= {"y"} and names
    if batch:
        assert rows == feeds["x"].shape[0] == feeds["ids"].shape[0] >= 1


@given(meta=st.one_of(values, st.fixed_dictionaries(
    {"digest": st.one_of(st.just("a" * 64), st.text(max_size=70), st.integers()),
     "size": st.one_of(st.integers(-5, 10**12), st.booleans(), st.text(max_size=3)),
     "version": st.one_of(st.text(max_size=5), st.integers())},
    optional={"format": st.sampled_from(["onnx", "tflite", 3])},
)))
@settings(max_examples=200, deadline=None)
def test_store_metadata_is_checked(meta):
    try:
        out = check_metadata(meta, "m")
    except SwarmdError as e:
        assert e.code in ALL_CODES
        return
    assert out.digest == "a" * 64 and out.size >= 0 and isinstance(out.version, str)


def test_run_inference_params_from_anyone(tmp_path):
    from swarmd.roles.worker import WorkerRole
    from tests.models import two_output_model
    from tests.test_worker_role import make_ctx

    path = tmp_path / "two.onnx"
    path.write_bytes(two_output_model())
    params = st.one_of(
        values,
        st.fixed_dictionaries(
            {"model": st.one_of(st.just("two"), scalars)},
            optional={"inputs": inputs, "outputs": outputs, "version": st.one_of(st.just("1"), scalars),
                      "request_id": scalars},
        ),
    )

    async def main() -> None:
        ctx = make_ctx(tmp_path, models=[f"two={path}"])
        role = WorkerRole(ctx)
        await role.start()
        seen: set[str] = set()

        @given(p=params)
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        def check(p):
            try:
                fut = asyncio.run_coroutine_threadsafe(role.run_inference(None, p), loop)
                fut.result(30)
            except SwarmdError as e:
                seen.add(e.code)

        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(check)
        finally:
            await role.stop()
            await ctx.tasks.close()
        assert seen <= {ERR_BAD_REQUEST, "ERR_NOT_FOUND", "ERR_NOT_READY"}, seen

    asyncio.run(main())
