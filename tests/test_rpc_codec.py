"""The msgpack codec, tensor ext and envelope validator against arbitrary peer bytes."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.errors import ERR_PROTOCOL
from swarmd.rpc import envelope as env
from swarmd.rpc.codec import EXT_NDARRAY, decode_ndarray, encode_ndarray, packb, unpackb

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@given(values)
def test_values_round_trip(v: object) -> None:
    assert unpackb(packb(v)) == v


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 5), dtype=np.int64),
        np.array(3.5, dtype=np.float64),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3)),
        np.array([b"ab", b"c"]),
        np.ones((2, 2), dtype=np.float16)[:, :1],
    ],
)
def test_ndarray_round_trip(arr: np.ndarray) -> None:
    out = unpackb(packb({"t": arr}))["t"]
    assert out.dtype == arr.dtype and out.shape == arr.shape and np.array_equal(out, arr)


def test_ndarray_decoding_is_zero_copy() -> None:
    data = encode_ndarray(np.arange(1000, dtype=np.float32))
    out = decode_ndarray(data)
    assert not out.flags.owndata and not out.flags.writeable


def test_object_arrays_are_refused() -> None:
    with pytest.raises(TypeError):
        packb(np.array([object()]))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_ndarray_decoder_fuzz(data: bytes) -> None:
    try:
        arr = decode_ndarray(data)
    except ValueError:
        return
    assert arr.nbytes <= len(data)


@given(st.text(max_size=6), st.lists(st.integers(0, 2**40), max_size=4), st.binary(max_size=64))
def test_ndarray_decoder_checks_sizes(dtype: str, shape: list[int], body: bytes) -> None:
    raw = bytes([len(dtype.encode()[:255])]) + dtype.encode()[:255] + bytes([len(shape)])
    raw += b"".join(d.to_bytes(8, "little") for d in shape) + body
    try:
        arr = decode_ndarray(raw)
    except ValueError:
        return
    assert arr.nbytes == len(body)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_envelope_decoder_fuzz(data: bytes) -> None:
    try:
        msg = env.decode(data)
    except env.EnvelopeError as e:
        assert e.code == ERR_PROTOCOL
        return
    assert msg[0] in (env.REQUEST, env.RESPONSE, env.ERROR, env.EVENT, env.CANCEL)


@settings(max_examples=300)
@given(st.lists(values, min_size=0, max_size=7))
def test_envelope_decoder_on_structured_garbage(items: list) -> None:
    data = msgpack.packb(items)
    try:
        msg = env.decode(data)
    except env.EnvelopeError:
        return
    if msg[0] == env.REQUEST:
        assert isinstance(msg[1], int) and isinstance(msg[2], str) and isinstance(msg[5], int)


def test_envelope_round_trip() -> None:
    assert env.decode(env.request(1, "m", {"a": 1}, 5000, 3)) == [0, 1, "m", {"a": 1}, 5000, 3]
    assert env.decode(env.cancel(9)) == [4, 9]
    assert env.decode(env.event("e", None)) == [3, "e", None]
    with pytest.raises(env.EnvelopeError) as ei:
        env.decode(msgpack.packb([0, 3, "m"]))
    assert ei.value.request_id == 3


def test_unknown_ext_type_is_an_error() -> None:
    with pytest.raises(ValueError):
        unpackb(msgpack.packb(msgpack.ExtType(9, b"x")))
    assert EXT_NDARRAY == 1


def test_relay_nodes_never_import_numpy() -> None:
    code = (
        "import sys; from swarmd.rpc import RpcServer, connect; from swarmd.rpc.codec import packb, unpackb;"
        "unpackb(packb({'a': [1, b'x']})); assert 'numpy' not in sys.modules, 'numpy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=".")


def test_dtype_aliases_and_names_from_a_peer_are_refused_without_warnings():
    """Only numpy's dtype.str form travels; an alias such as 'a' (deprecated in numpy)
    or a name such as 'float32' is a precise decode error, never a warning."""
    import warnings

    import pytest as _pytest

    from swarmd.rpc import codec as _codec

    for text in (b"a", b"float32", b"f4", b"<f4 ", b"O", b"<f4\x00"):
        body = bytes([len(text)]) + text + bytes([0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with _pytest.raises(ValueError, match="unknown dtype|not allowed"):
                _codec.decode_ndarray(body)


def test_envelope_kind_must_be_an_integer() -> None:
    """A peer's tensor (or bool, float) where the kind goes is a protocol error, not a crash of
    the read callback: an array compared with == has no truth value."""
    import numpy as np

    for kind in (np.arange(3), True, 1.0, "1"):
        with pytest.raises(env.EnvelopeError, match="unknown RPC message kind"):
            env.decode(packb([kind, 7, b"x"]))
