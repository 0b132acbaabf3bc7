"""Property tests for the OIP v2 codec: any bytes give a request or an OipError, never another exception."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.gateway.oip import (
    InferRequest,
    OipError,
    RequestedOutput,
    decode_infer_request,
    encode_infer_response,
)

DTYPES = ["float32", "float64", "int64", "int32", "uint8", "bool", "float16", "int8"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-5, 600)))
def test_random_bytes_never_crash(body, hlen):
    try:
        decode_infer_request(body, hlen)
    except OipError as e:  # the only error allowed, and it must say what was wrong
        assert len(str(e)) > 10


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(
    st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), json_values, max_size=5), max_size=3),
    st.binary(max_size=64))
def test_structured_garbage_never_crashes(inputs, tail):
    head = json.dumps({"inputs": inputs}).encode()
    for body, hl in ((head, None), (head + tail, len(head))):
        try:
            decode_infer_request(body, hl)
        except OipError as e:  # the only error allowed, and it must say what was wrong
            assert len(str(e)) > 10


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(DTYPES), st.lists(st.integers(0, 3), min_size=1, max_size=3), st.booleans(), st.booleans())
def test_round_trip_through_encode_and_decode(dtype, shape, binary_in, binary_out):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 10).astype(dtype)
    datatype = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
                "bool": "BOOL", "float16": "FP16", "int8": "INT8"}[dtype]
    if binary_in:
        head = json.dumps({"inputs": [{"name": "t", "shape": shape, "datatype": datatype,
                                       "parameters": {"binary_data_size": arr.nbytes}}]}).encode()
        req = decode_infer_request(head + arr.tobytes(), len(head))
    else:
        head = json.dumps({"inputs": [{"name": "t", "shape": shape, "datatype": datatype,
                                       "data": arr.ravel().tolist()}]}).encode()
        req = decode_infer_request(head)
    np.testing.assert_array_equal(req.inputs["t"], arr)
    assert req.inputs["t"].dtype == arr.dtype
    body, hl = encode_infer_response("m", "1", {"t": arr}, InferRequest({}, [RequestedOutput("t", binary_out)]))
    doc = json.loads(body[:hl] if hl else body)
    out = doc["outputs"][0]
    assert out["datatype"] == datatype and out["shape"] == shape
    if binary_out:
        back = np.frombuffer(body[hl:], dtype=dtype).reshape(shape)
    else:
        back = np.array(out["data"], dtype=dtype).reshape(shape)
    np.testing.assert_array_equal(back, arr)
