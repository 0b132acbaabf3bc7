"""Read a model's tensor signature from its ONNX file.

The signature (names, numpy dtype names, shapes with -1 for dynamic dims) is
what workers validate requests against and what the gateway reports as OIP v2
model metadata, so it is read once, at upload, and stored with the version.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_INVALID_MODEL, SwarmdError
from swarmd.signature import TensorSpec

SLIM_OVER = 1 << 20  # smaller models take the full parse: it is cheap there


def _sig(value_info: Any) -> TensorSpec:
    import onnx.helper

    t = value_info.type
    if t.WhichOneof("value") != "tensor_type":
        # sequences and maps (e.g. a ZipMap classifier output) have no single dtype
        return TensorSpec(value_info.name, "object", ())
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
    return TensorSpec(value_info.name, dtype, shape)


def warm_up() -> None:
    """Import onnx and its checker now (a few hundred ms), so the first push does not pay for it."""
    import onnx.checker  # noqa: F401


def read_signature(path: Path, *, slim_over: int = SLIM_OVER) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the ONNX model at path, or ERR_INVALID_MODEL saying why not.

    A model over `slim_over` bytes is parsed and checked without the bytes of its
    weights (see the slim view above); the verdict is the checker's either way.
    """
    if path.stat().st_size > slim_over:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    slim = slim_model_bytes(view)
                finally:
                    view.release()
        except (_Unfollowable, ValueError, OSError):
            slim = None
        if slim is not None:
            return _checked_signature(slim, path.parent)
    return _full_signature(path)


def _load(data: bytes | str) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        if isinstance(data, bytes):
            return onnx.load_model_from_string(data)
        return onnx.load(data, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise SwarmdError(ERR_INVALID_MODEL, f"not an ONNX model: protobuf does not parse ({e})") from None
    except Exception as e:  # the protobuf C++ backend raises its own types; all mean "does not parse"
        raise SwarmdError(ERR_INVALID_MODEL, f"not an ONNX model: {type(e).__name__}: {e}") from None


def _check(path: str) -> None:
    import onnx.checker

    try:
        onnx.checker.check_model(path)  # from a path: no re-serialization, external data resolved beside it
    except Exception as e:  # ValidationError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SwarmdError(ERR_INVALID_MODEL, f"ONNX model fails the checker: {first}") from None


def _signature(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_sig(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_sig(v) for v in model.graph.output]
    return inputs, outputs


def _shape_ok(model: Any) -> None:
    if not model.HasField("graph") or not model.graph.output or not model.opset_import:
        raise SwarmdError(ERR_INVALID_MODEL, "not an ONNX model: no graph, no graph outputs or no opset import")


def _full_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    model = _load(str(path))
    _shape_ok(model)
    _check(str(path))
    return _signature(model)


def _checked_signature(slim: bytes, where: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Parse and check the slim bytes; the checker reads them from a file beside the model so
    that it resolves anything relative exactly as it would for the model itself."""
    model = _load(slim)
    _shape_ok(model)
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".slim-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(slim)
        _check(tmp)
    finally:
        os.unlink(tmp)
    return _signature(model)


# -- the slim view ---------------------------------------------------------------
# Parsing a 50 MiB model with protobuf (and again in the checker) copies every
# weight twice and dominated a push. The signature and the checker only need the
# structure, so a model over SLIM_OVER bytes is read through a wire-format walk
# that copies everything except the raw_data of graph initializers (which is
# where weights live): each of those is checked here for its size against dims
# and data_type (what the checker checks of raw_data) and replaced by an empty
# tensor of the same name and type. Anything unusual (a repeated graph or
# raw_data field, external data, sub-byte or unknown types) keeps the tensor
# whole, and a file the walk cannot follow goes to the full parse, which then
# names the problem.

_SLIM_TENSOR = 4096  # raw_data shorter than this is kept as is
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
             17: 1, 18: 1, 19: 1, 20: 1}


class _Unfollowable(Exception):
    """The walk cannot vouch for these bytes: use the full parse."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    shift = 0
    value = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unfollowable
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field, wire type, start of the field, start of its value, end of the field) for each field."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise _Unfollowable
        if wt == 0:
            _, nxt = _varint(buf, pos, end)
        elif wt == 1:
            nxt = pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            nxt = pos + n
        elif wt == 5:
            nxt = pos + 4
        else:  # groups are not used by ONNX
            raise _Unfollowable
        if nxt > end:
            raise _Unfollowable
        yield field, wt, start, pos, nxt
        pos = nxt


def _len_field(field: int, body: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(body)) + body


def _slim_tensor(buf: memoryview, pos: int, end: int) -> bytes | None:
    """The initializer without its raw_data (checked for size), or None to keep it whole."""
    dims: list[int] = []
    dtype = None
    raw: tuple[int, int] | None = None
    name = b""
    kept: list[bytes] = []
    for field, wt, start, vpos, nxt in _fields(buf, pos, end):
        if field == 1 and wt == 0:
            dims.append(_varint(buf, vpos, nxt)[0])
        elif field == 1 and wt == 2:  # packed dims
            p = vpos
            while p < nxt:
                d, p = _varint(buf, p, nxt)
                dims.append(d)
        elif field == 2 and wt == 0 and dtype is None:
            dtype = _varint(buf, vpos, nxt)[0]
            kept.append(bytes(buf[start:nxt]))
        elif field == 9 and wt == 2 and raw is None:
            raw = (vpos, nxt)
        elif field in (1, 2, 9, 3, 13, 14):  # repeats, segments, external data: not ours to judge
            return None
        else:
            if field == 8 and wt == 2:
                name = bytes(buf[vpos:nxt])
            kept.append(bytes(buf[start:nxt]))
    if raw is None or raw[1] - raw[0] < _SLIM_TENSOR or dtype not in _ITEMSIZE:
        return None
    if any(d >= 1 << 62 for d in dims):  # a negative dim (two's complement): the checker's call
        return None
    need = _ITEMSIZE[dtype]
    for d in dims:
        need *= d
    if raw[1] - raw[0] < need:
        label = name.decode("utf-8", "replace")
        raise SwarmdError(
            ERR_INVALID_MODEL,
            f"ONNX model fails the checker: TensorProto (tensor name: {label}) raw_data size "
            f"({raw[1] - raw[0]} bytes) is too small for the declared shape and type ({need} bytes required).",
        )
    # an empty tensor of the same name and type: dims [0], empty raw_data
    return b"".join(kept) + b"\x08\x00" + b"\x4a\x00"


def _slim_graph(buf: memoryview, pos: int, end: int) -> bytes:
    parts: list[bytes] = []
    for field, wt, start, vpos, nxt in _fields(buf, pos, end):
        slim = _slim_tensor(buf, vpos, nxt) if field == 5 and wt == 2 else None
        parts.append(bytes(buf[start:nxt]) if slim is None else _len_field(5, slim))
    return b"".join(parts)


def slim_model_bytes(buf: memoryview) -> bytes:
    """The serialized model with graph initializers' raw_data left out (see above); _Unfollowable
    when the bytes are not a model the walk can follow."""
    parts: list[bytes] = []
    graphs = 0
    for field, wt, start, vpos, nxt in _fields(buf, 0, len(buf)):
        if field == 7:
            graphs += 1
            if wt != 2 or graphs > 1:
                raise _Unfollowable
            parts.append(_len_field(7, _slim_graph(buf, vpos, nxt)))
        else:
            parts.append(bytes(buf[start:nxt]))
    return b"".join(parts)
