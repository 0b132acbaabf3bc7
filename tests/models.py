"""Tiny ONNX models built in the tests with the onnx helper API."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.models import mlp_model

__all__ = ["mlp_model", "two_output_model", "fixed_shape_model", "gather_model", "save"]


def _finish(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def two_output_model() -> bytes:
    """x, y float32 [N, 4] -> sum = x + y, prod = x * y (two inputs, two outputs)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["sum"]), helper.make_node("Mul", ["x", "y"], ["prod"])],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    return _finish(graph)


def fixed_shape_model() -> bytes:
    """x float32 [2, 3] -> Relu: no batch dim, so never batched."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return _finish(graph)


def gather_model(rows: int = 10) -> bytes:
    """idx int64 [N] -> table[idx] float32 [N, 3]; an index >= rows makes onnxruntime fail."""
    table = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(table, "table")],
    )
    return _finish(graph)


def save(tmp_path, name: str, blob: bytes):  # noqa: ANN001, ANN201 - test helper
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(blob)
    return path
