"""msgpack with tensors: numpy arrays travel as raw bytes, never as lists.

An ndarray is packed as msgpack ext type 1 whose data is
``u8 len | dtype string (numpy dtype.str, e.g. "<f4") | u8 ndim | ndim x u64 LE dims | raw C-order bytes``.
Decoding is zero-copy: `np.frombuffer` over the ext bytes (the array is
read-only; copy it to write). numpy is imported only when an array is seen, so
relay and bootstrap nodes never load it.
"""

from __future__ import annotations

import re
import struct
import sys
import threading
from typing import Any

import msgpack

EXT_NDARRAY = 1
_DIM = struct.Struct("<Q")
_DTYPE_STR = re.compile(rb"[<>|][biufcmMSUV][0-9]{1,9}(\[[0-9]*[A-Za-z]{1,2}\])?")
_ALLOWED_KINDS = frozenset("biufcmMSUV")  # no object arrays: they cannot travel as raw bytes
MAX_NDIM = 32
_JOIN_FROM = 1 << 16  # bytes: from here one copy by join beats tobytes() + concatenation (two copies)
_DTYPES: dict[bytes, Any] = {}  # dtype.str -> validated numpy dtype, the usual few of them


def _default(obj: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(EXT_NDARRAY, encode_ndarray(obj))
        if isinstance(obj, np.generic):
            return obj.item()
    if isinstance(obj, (memoryview, bytearray)):
        return bytes(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def encode_ndarray(arr: Any) -> bytes:
    if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.hasobject:
        raise TypeError(f"arrays of dtype {arr.dtype} cannot be sent as raw bytes")
    dt = arr.dtype.str.encode()
    head = bytes([len(dt)]) + dt + bytes([arr.ndim]) + b"".join(_DIM.pack(d) for d in arr.shape)
    if arr.nbytes >= _JOIN_FROM and arr.flags.c_contiguous:
        return b"".join((head, arr.data))  # one copy, straight from the array's (or the HTTP body's) memory
    return head + arr.tobytes(order="C")  # C order whatever the strides; for small arrays the quicker


def decode_ndarray(data: bytes) -> Any:
    """Parse ext type 1 data; raises ValueError with a precise sentence on malformed input."""
    import numpy as np

    if len(data) < 2:
        raise ValueError("ndarray ext shorter than its header")
    n = data[0]
    if len(data) < 2 + n:
        raise ValueError("ndarray ext truncated inside its dtype")
    text = bytes(data[1 : 1 + n])
    dtype = _DTYPES.get(text)
    if dtype is None:
        if not _DTYPE_STR.fullmatch(text):  # only numpy's dtype.str form: no aliases, no deprecated names
            raise ValueError(f"ndarray ext has an unknown dtype {text!r:.40}")
        try:
            dtype = np.dtype(text.decode("ascii"))
        except Exception:
            raise ValueError(f"ndarray ext has an unknown dtype {data[1 : 1 + n]!r:.40}") from None
        if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.itemsize == 0:
            raise ValueError(f"ndarray dtype {dtype} is not allowed")
        if len(_DTYPES) < 64:  # bounded: a peer chooses these strings
            _DTYPES[text] = dtype
    ndim = data[1 + n]
    if ndim > MAX_NDIM:
        raise ValueError(f"ndarray has {ndim} dimensions, at most {MAX_NDIM} allowed")
    off = 2 + n
    if len(data) < off + 8 * ndim:
        raise ValueError("ndarray ext truncated inside its shape")
    shape = tuple(_DIM.unpack_from(data, off + 8 * i)[0] for i in range(ndim))
    off += 8 * ndim
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(data) - off:
        raise ValueError(
            f"ndarray of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, got {len(data) - off}"
        )
    return np.frombuffer(data, dtype=dtype, offset=off, count=count).reshape(shape)


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack's ext_hook for what we decode: ext 1 is an ndarray, any other ext is an error."""
    if code == EXT_NDARRAY:
        return decode_ndarray(data)
    raise ValueError(f"unknown msgpack ext type {code}")


_local = threading.local()


def new_packer() -> msgpack.Packer:
    """A Packer producing exactly packb's bytes, for an owner that stays on one thread (Packers are not thread-safe)."""
    return msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)


def packb(obj: Any) -> bytes:
    """msgpack bytes for obj (ndarrays as ext 1). One Packer per thread: Packers are not thread-safe."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = new_packer()
    return packer.pack(obj)


def unpackb(data: bytes) -> Any:
    """Decode peer bytes; raises ValueError (or msgpack's errors) on malformed input.

    unpackb bounds every container by the input size, and the input is bounded
    by the mux frame limit, so memory stays bounded.
    """
    return msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=False, use_list=True)
