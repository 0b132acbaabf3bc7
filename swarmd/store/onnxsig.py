"""Read a model's tensor signature from its ONNX file.

The signature (names, numpy dtype names, shapes with -1 for dynamic dims) is
what workers validate requests against and what the gateway reports as OIP v2
model metadata, so it is read once, at upload, and stored with the version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_INVALID_MODEL, SwarmdError


@dataclass(frozen=True)
class TensorSig:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _sig(value_info: Any) -> TensorSig:
    import onnx.helper

    t = value_info.type
    if t.WhichOneof("value") != "tensor_type":
        # sequences and maps (e.g. a ZipMap classifier output) have no single dtype
        return TensorSig(value_info.name, "object", ())
    tt = t.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, ValueError, TypeError):
        raise SwarmdError(
            ERR_INVALID_MODEL, f"tensor {value_info.name!r} has unknown element type {tt.elem_type}"
        ) from None
    shape: tuple[int, ...] = ()
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else -1 for d in tt.shape.dim)
    return TensorSig(value_info.name, dtype, shape)


def read_signature(path: Path) -> tuple[list[TensorSig], list[TensorSig]]:
    """(inputs, outputs) of the ONNX model at path, or ERR_INVALID_MODEL saying why not."""
    import onnx
    import onnx.checker
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise SwarmdError(ERR_INVALID_MODEL, f"not an ONNX model: protobuf does not parse ({e})") from None
    except Exception as e:  # the protobuf C++ backend raises its own types; all mean "does not parse"
        raise SwarmdError(ERR_INVALID_MODEL, f"not an ONNX model: {type(e).__name__}: {e}") from None
    if not model.HasField("graph") or not model.graph.output or not model.opset_import:
        raise SwarmdError(ERR_INVALID_MODEL, "not an ONNX model: no graph, no graph outputs or no opset import")
    try:
        onnx.checker.check_model(str(path))  # from the path: no re-serialization of a big model
    except Exception as e:  # ValidationError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SwarmdError(ERR_INVALID_MODEL, f"ONNX model fails the checker: {first}") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_sig(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_sig(v) for v in model.graph.output]
    return inputs, outputs
