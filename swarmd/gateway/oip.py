"""Open Inference Protocol v2 (KServe/Triton REST) tensor codec, sans-IO.

Takes the bytes of an infer request body (JSON, or JSON header + raw tensor
bytes for the binary tensor extension) and returns numpy arrays; takes numpy
outputs and returns the response bytes. No HTTP here: the server glue passes
in the body and the `Inference-Header-Content-Length` value, so this module is
fuzzable on its own. Every malformed request raises OipError with a sentence
naming the field that was wrong and what was expected.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from swarmd.dtypes import NUMPY_TO_OIP, OIP_TO_NUMPY

MAX_DIMS = 16
MAX_NAME = 256


class OipError(ValueError):
    """The client sent a request the protocol does not allow (HTTP 400)."""


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request-level binary_data_output


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    binary_output: bool = False  # request-level parameters.binary_data_output
    parameters: dict[str, Any] = field(default_factory=dict)


_DATATYPE_CACHE: dict[object, str] = {}


def oip_datatype(dtype: np.dtype | str) -> str:
    """The OIP datatype name for a numpy dtype (BYTES for strings); cached, it runs per output per request."""
    hit = _DATATYPE_CACHE.get(dtype)
    if hit is not None:
        return hit
    name = _oip_datatype(dtype)
    if len(_DATATYPE_CACHE) < 256:
        _DATATYPE_CACHE[dtype] = name
    return name


def _oip_datatype(dtype: np.dtype | str) -> str:
    dt = np.dtype(dtype)
    if dt.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dt.name]
    except KeyError:
        raise OipError(f"numpy dtype {dt.name} has no Open Inference Protocol datatype") from None


LITTLE_ENDIAN = sys.byteorder == "little"
_RAW_DTYPES: dict[str, np.dtype[Any]] = {}  # OIP datatype -> its little-endian numpy dtype (valid ones only)


def numpy_dtype(datatype: str) -> str:
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        raise OipError(
            f"datatype {datatype!r} is not supported; expected one of {', '.join(OIP_TO_NUMPY)}"
        ) from None


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise OipError(f"{where}.shape must be a list of non-negative integers, got {type(value).__name__}")
    if len(value) > MAX_DIMS:
        raise OipError(f"{where}.shape has {len(value)} dimensions; at most {MAX_DIMS} are allowed")
    for d in value:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise OipError(f"{where}.shape must hold non-negative integers, got {d!r:.40}")
    return tuple(value)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise OipError(f"{where}.name must be a non-empty string of at most {MAX_NAME} characters")
    return value


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OipError(f"{where}.parameters must be an object, got {type(value).__name__}")
    return value


def _bytes_from_binary(raw: memoryview, count: int, where: str) -> np.ndarray:
    """BYTES elements in the binary extension: each is a 4-byte little-endian length then the bytes."""
    if count * 4 > len(raw):  # checked before allocating: the shape is the client's word, the bytes are real
        raise OipError(f"{where}: shape needs {count} BYTES elements but only {len(raw)} binary bytes were sent")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise OipError(f"{where}: binary BYTES data ends inside element {i} of {count}")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        if pos + n > len(raw):
            raise OipError(f"{where}: BYTES element {i} claims {n} bytes but only {len(raw) - pos} remain")
        out[i] = bytes(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise OipError(f"{where}: {len(raw) - pos} bytes left over after {count} BYTES elements")
    return out


def _bytes_from_json(data: Any, count: int, where: str) -> np.ndarray:
    flat: list[Any] = []
    # iterative, and no deeper than a tensor may have dimensions: nesting from a client
    # must never reach Python's recursion limit (a RecursionError is an HTTP 500)
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, list):
            if depth >= MAX_DIMS:
                raise OipError(f"{where}.data is nested deeper than {MAX_DIMS} levels")
            stack.extend((y, depth + 1) for y in reversed(x))
        elif isinstance(x, str):
            flat.append(x.encode())
        else:
            raise OipError(f"{where}.data for BYTES must hold strings, got {type(x).__name__}")
    if len(flat) != count:
        raise OipError(f"{where}.data has {len(flat)} elements but shape needs {count}")
    out = np.empty(count, dtype=object)
    out[:] = flat
    return out


def decode_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an infer request body; header_length is Inference-Header-Content-Length if sent."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not 0 < header_length <= len(body):
            raise OipError(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise OipError(f"request JSON is malformed: {e}") from None
    if not isinstance(doc, dict):
        raise OipError(f"request body must be a JSON object, got {type(doc).__name__}")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise OipError("id must be a string")
    params = _params(doc.get("parameters"), "request")
    bin_out = params.get("binary_data_output", False)
    if not isinstance(bin_out, bool):
        raise OipError("parameters.binary_data_output must be a boolean")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError("inputs must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise OipError(f"{where} must be an object with name, shape, datatype and data")
        name = _name(t.get("name"), where)
        where = f"input {name!r}"
        if name in inputs:
            raise OipError(f"{where} appears twice")
        shape = _shape(t.get("shape"), where)
        datatype = t.get("datatype")
        if not isinstance(datatype, str):
            raise OipError(f"{where}.datatype must be a string such as \"FP32\"")
        count = math.prod(shape)
        tparams = _params(t.get("parameters"), where)
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise OipError(f"{where}.parameters.binary_data_size must be a non-negative integer")
            if "data" in t:
                raise OipError(f"{where} has both data and binary_data_size; send one")
            if offset + size > len(binary):
                raise OipError(
                    f"{where}.binary_data_size is {size} but only {len(binary) - offset} binary bytes remain"
                )
            arr = decode_raw_tensor(binary[offset:offset + size], datatype, shape, where)
            offset += size
        else:
            if "data" not in t:
                raise OipError(f"{where} has no data and no parameters.binary_data_size")
            data = t["data"]
            if datatype == "BYTES":
                arr = _bytes_from_json(data, count, where)
            else:
                dt = numpy_dtype(datatype)
                if not isinstance(data, list):
                    raise OipError(f"{where}.data must be a list, got {type(data).__name__}")
                try:
                    arr = np.array(data, dtype=dt)
                except (ValueError, TypeError, OverflowError) as e:
                    raise OipError(f"{where}.data is not a list of {datatype} values: {e}") from None
                if arr.size != count:
                    raise OipError(f"{where}.data has {arr.size} elements but shape {list(shape)} needs {count}")
        inputs[name] = arr.reshape(shape)
    if offset != len(binary):
        raise OipError(
            f"the body has {len(binary) - offset} binary bytes that no input's binary_data_size accounts for"
        )
    outputs: list[RequestedOutput] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise OipError("outputs must be a list of {\"name\": ...} objects")
        outputs = []
        seen: set[str] = set()
        for i, o in enumerate(raw_outputs):
            where = f"outputs[{i}]"
            if not isinstance(o, dict):
                raise OipError(f"{where} must be an object with a name")
            name = _name(o.get("name"), where)
            if name in seen:
                raise OipError(f"output {name!r} is requested twice")
            seen.add(name)
            op = _params(o.get("parameters"), f"output {name!r}")
            if "classification" in op:
                raise OipError(f"output {name!r}: the classification extension is not supported")
            b = op.get("binary_data")
            if b is not None and not isinstance(b, bool):
                raise OipError(f"output {name!r}.parameters.binary_data must be a boolean")
            outputs.append(RequestedOutput(name, b))
    return InferRequest(inputs=inputs, outputs=outputs, id=rid, binary_output=bin_out, parameters=params)


def _bytes_to_binary(arr: np.ndarray) -> bytes:
    parts = []
    for x in arr.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode()
        parts.append(len(b).to_bytes(4, "little"))
        parts.append(b)
    return b"".join(parts)


def decode_raw_tensor(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """One tensor from its raw little-endian bytes (BYTES: 4-byte length-prefixed elements), as the
    binary extension and gRPC's raw_input_contents carry it. Raises OipError naming `where`."""
    if len(shape) > MAX_DIMS:
        raise OipError(f"{where}.shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(raw, count, where).reshape(shape)
    dt = _RAW_DTYPES.get(datatype)
    if dt is None:  # built once per datatype: np.dtype() and newbyteorder() cost a µs each, per request
        dt = _RAW_DTYPES[datatype] = np.dtype(numpy_dtype(datatype)).newbyteorder("<")
    if len(raw) != count * dt.itemsize:
        raise OipError(f"{where}: {len(raw)} raw bytes do not hold shape {list(shape)} of {datatype} "
                       f"({count * dt.itemsize} bytes expected)")
    arr = np.frombuffer(raw, dtype=dt)  # no copy: a view of the request's bytes
    if not LITTLE_ENDIAN:
        arr = arr.astype(dt.newbyteorder("="))
    return arr.reshape(shape)


def encode_raw_tensor(arr: np.ndarray) -> tuple[str, bytes]:
    """(OIP datatype, raw little-endian bytes) of one output tensor."""
    datatype = oip_datatype(arr.dtype)
    if datatype == "BYTES":
        return datatype, _bytes_to_binary(arr)
    order = arr.dtype.byteorder
    if order == "<" or (LITTLE_ENDIAN and order in "=|"):
        return datatype, arr.tobytes()  # C order whatever the layout: one copy, straight from the buffer
    return datatype, np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model: str,
    version: str,
    outputs: dict[str, np.ndarray],
    request: InferRequest,
) -> tuple[bytes, int | None]:
    """Response body and, when any output is binary, the JSON header length."""
    if request.outputs is None:
        chosen = [(name, request.binary_output) for name in outputs]
    else:
        chosen = [(o.name, request.binary_output if o.binary is None else o.binary) for o in request.outputs]
    docs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in chosen:
        arr = np.asarray(outputs[name])
        datatype = oip_datatype(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = encode_raw_tensor(arr)[1]
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
        docs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": docs}
    if request.id is not None:
        doc["id"] = request.id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
