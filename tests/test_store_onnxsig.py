"""The slim signature reader (big models parsed without their weights) must agree with the full one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from swarmd.errors import ERR_INVALID_MODEL, SwarmdError
from swarmd.store.onnxsig import _Unfollowable, read_signature, slim_model_bytes
from tests.store_models import onnx_bytes

BIG = onnx_bytes(3, pad_floats=3000)  # a 12 kB initializer: over the slim threshold of one tensor


def outcome(path: Path, slim_over: int) -> object:
    try:
        return read_signature(path, slim_over=slim_over)
    except SwarmdError as e:
        assert e.code == ERR_INVALID_MODEL
        return ERR_INVALID_MODEL


def test_slim_bytes_leave_out_the_weights_and_keep_the_signature(tmp_path: Path) -> None:
    slim = slim_model_bytes(memoryview(BIG))
    assert len(slim) < 1000 < len(BIG)
    p = tmp_path / "m.onnx"
    p.write_bytes(BIG)
    assert read_signature(p, slim_over=0) == read_signature(p, slim_over=1 << 40)
    assert [q.name for q in tmp_path.iterdir()] == ["m.onnx"]  # the checker's temp file is gone


def test_slim_reader_checks_raw_data_size(tmp_path: Path) -> None:
    pad = numpy_helper.from_array(np.zeros(3000, np.float32), "pad")
    pad.dims[0] = 3001  # one float more than raw_data holds
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["pad"], ["s"], keepdims=0)], "g", [],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], initializer=[pad],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = tmp_path / "m.onnx"
    p.write_bytes(model.SerializeToString())
    for slim_over in (0, 1 << 40):
        with pytest.raises(SwarmdError) as e:
            read_signature(p, slim_over=slim_over)
        assert e.value.code == ERR_INVALID_MODEL and "too small" in e.value.message


def test_slim_walk_refuses_what_it_cannot_follow() -> None:
    for junk in (b"\x00", b"\x0f", b"\x3a\xff", b"\x3a\x05ab", BIG[:-7]):
        with pytest.raises(_Unfollowable):
            slim_model_bytes(memoryview(junk))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=len(BIG) - 1), st.binary(min_size=1, max_size=4), st.booleans())
def test_slim_and_full_readers_agree_on_mangled_models(tmp_path: Path, at: int, junk: bytes, head: bool) -> None:
    # mangle the structure (the first and last few hundred bytes), not the middle of the weights
    at = at % 300 if head else len(BIG) - 1 - at % 300
    p = tmp_path / "g.onnx"
    p.write_bytes(BIG[:at] + junk + BIG[at + len(junk):])
    assert outcome(p, 0) == outcome(p, 1 << 40)
