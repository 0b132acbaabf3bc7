"""The one dtype table: each tensor element type under the names every layer uses.

A row names one type as numpy (the name swarmd's signatures and the wire use),
onnxruntime (NodeArg.type), the Open Inference Protocol (KServe/Triton REST and
gRPC `datatype`), Triton's model configuration (`TYPE_...`, the gRPC DataType
enum) and the gRPC InferTensorContents field its typed contents travel in.
Adding a type is one row; the lookups below are derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    numpy: str | None  # numpy dtype name; "str" for strings; None: no numpy dtype (BF16)
    ort: str  # onnxruntime NodeArg.type
    oip: str  # Open Inference Protocol datatype
    triton: str  # Triton model-config data type (and the gRPC DataType enum member)
    contents: str | None  # gRPC InferTensorContents field of typed contents; None: raw only


DTYPES: tuple[DType, ...] = (
    DType("bool", "tensor(bool)", "BOOL", "TYPE_BOOL", "bool_contents"),
    DType("uint8", "tensor(uint8)", "UINT8", "TYPE_UINT8", "uint_contents"),
    DType("uint16", "tensor(uint16)", "UINT16", "TYPE_UINT16", "uint_contents"),
    DType("uint32", "tensor(uint32)", "UINT32", "TYPE_UINT32", "uint_contents"),
    DType("uint64", "tensor(uint64)", "UINT64", "TYPE_UINT64", "uint64_contents"),
    DType("int8", "tensor(int8)", "INT8", "TYPE_INT8", "int_contents"),
    DType("int16", "tensor(int16)", "INT16", "TYPE_INT16", "int_contents"),
    DType("int32", "tensor(int32)", "INT32", "TYPE_INT32", "int_contents"),
    DType("int64", "tensor(int64)", "INT64", "TYPE_INT64", "int64_contents"),
    DType("float16", "tensor(float16)", "FP16", "TYPE_FP16", None),
    DType("float32", "tensor(float)", "FP32", "TYPE_FP32", "fp32_contents"),
    DType("float64", "tensor(double)", "FP64", "TYPE_FP64", "fp64_contents"),
    DType(None, "tensor(bfloat16)", "BF16", "TYPE_BF16", None),
    DType("str", "tensor(string)", "BYTES", "TYPE_STRING", "bytes_contents"),
)

# onnxruntime type name -> numpy dtype name (signatures of loaded models)
ORT_TO_NUMPY: dict[str, str] = {d.ort: d.numpy for d in DTYPES if d.numpy is not None}
# OIP datatype -> numpy dtype name, for fixed-size numeric types (BYTES is handled apart)
OIP_TO_NUMPY: dict[str, str] = {d.oip: d.numpy for d in DTYPES if d.numpy not in (None, "str")}
# numpy dtype name -> OIP datatype; numpy's object and str arrays are BYTES
NUMPY_TO_OIP: dict[str, str] = {**{d.numpy: d.oip for d in DTYPES if d.numpy is not None}, "object": "BYTES"}
# OIP datatype -> Triton model-config type name
TRITON_TYPES: dict[str, str] = {d.oip: d.triton for d in DTYPES}
# OIP datatype -> gRPC InferTensorContents field of its typed contents
CONTENTS_FIELD: dict[str, str] = {d.oip: d.contents for d in DTYPES if d.contents is not None}

__all__ = ["CONTENTS_FIELD", "DTYPES", "NUMPY_TO_OIP", "OIP_TO_NUMPY", "ORT_TO_NUMPY", "TRITON_TYPES", "DType"]
