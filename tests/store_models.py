"""Tiny real ONNX models for the store tests, built with the onnx helper API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def onnx_bytes(seed: int = 0, features: int = 4, pad_floats: int = 0) -> bytes:
    """y = x @ W + b with a dynamic batch dim; `seed` changes the weights (so the digest),
    `pad_floats` adds an unused-looking big initializer to reach a size for benchmarks."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, 2)).astype(np.float32)
    b = rng.standard_normal((2,)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    if pad_floats:
        pad = rng.standard_normal((pad_floats,)).astype(np.float32)
        inits.append(numpy_helper.from_array(pad, "pad"))
        # Keep the padding used so the checker and runtimes accept it: y2 = ReduceSum(pad) (a scalar output).
        nodes.append(helper.make_node("ReduceSum", ["pad"], ["padsum"], keepdims=0))
        outs = [y, helper.make_tensor_value_info("padsum", TensorProto.FLOAT, [])]
    else:
        outs = [y]
    graph = helper.make_graph(nodes, f"tiny{seed}", [x], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_model(path: Path, seed: int = 0, **kw: int) -> Path:
    path.write_bytes(onnx_bytes(seed, **kw))
    return path
