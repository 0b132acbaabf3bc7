"""Framing and mux decoders: round trips, chunking, limits, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.errors import ERR_PROTOCOL, ERR_TOO_LARGE, SwarmdError
from swarmd.net import mux
from swarmd.net.framing import FrameDecoder, FrameTooLarge, encode_frame


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(min_value=0), max_size=10))
def test_frames_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder(300)
    got = []
    for chunk in split_at(wire, cuts):
        got.extend(dec.feed(chunk))
    assert got == payloads
    assert dec.buffered == 0


def test_oversized_frame_is_refused_before_buffering() -> None:
    dec = FrameDecoder(1000)
    with pytest.raises(FrameTooLarge) as ei:
        dec.feed((10**9).to_bytes(4, "big") + b"abc")
    assert ei.value.code == ERR_TOO_LARGE
    assert "1000000000" in ei.value.message
    assert dec.buffered == 0


def test_truncated_frame_waits_for_the_rest() -> None:
    dec = FrameDecoder(100)
    wire = encode_frame(b"hello world")
    assert dec.feed(wire[:7]) == []
    assert dec.buffered == 7
    assert dec.feed(wire[7:]) == [b"hello world"]


@given(st.binary(max_size=2000))
def test_frame_decoder_fuzz(data: bytes) -> None:
    dec = FrameDecoder(512)
    try:
        frames = dec.feed(data)
    except FrameTooLarge:
        return
    assert all(len(f) <= 512 for f in frames)
    assert dec.buffered <= 512 + 4


mux_frames = st.lists(
    st.tuples(
        st.sampled_from([mux.MSG, mux.CREDIT, mux.END, mux.RESET]),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=200),
    ),
    max_size=20,
)


@given(mux_frames, st.lists(st.integers(min_value=0), max_size=10))
def test_mux_frames_survive_any_chunking(frames: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    wire = b"".join(mux.encode(t, c, p) for t, c, p in frames)
    dec = mux.MuxDecoder(200)
    got = []
    for chunk in split_at(wire, cuts):
        got.extend(dec.feed(chunk))
    assert got == frames


@settings(max_examples=300)
@given(st.binary(max_size=1000))
def test_mux_decoder_fuzz(data: bytes) -> None:
    dec = mux.MuxDecoder(256)
    try:
        for ftype, channel, payload in dec.feed(data):
            assert ftype <= mux.GOAWAY and len(payload) <= 256
            if ftype != mux.MSG:
                try:
                    mux.check_control(ftype, channel, payload)
                except SwarmdError as e:
                    assert e.code == ERR_PROTOCOL
    except SwarmdError as e:
        assert e.code in (ERR_PROTOCOL, ERR_TOO_LARGE)


def test_mux_unknown_type_and_oversize() -> None:
    with pytest.raises(SwarmdError) as ei:
        mux.MuxDecoder(10).feed(mux.HEADER.pack(99, 0, 0))
    assert ei.value.code == ERR_PROTOCOL
    with pytest.raises(SwarmdError) as ei:
        mux.MuxDecoder(10).feed(mux.HEADER.pack(mux.MSG, 0, 11))
    assert ei.value.code == ERR_TOO_LARGE


def test_recv_window_rejects_overrun_and_batches_credit() -> None:
    w = mux.RecvWindow(1000)
    w.received(1000)
    with pytest.raises(SwarmdError):
        w.received(1)
    assert w.consume(100) == 0  # below a quarter of the window: batched
    assert w.consume(200) == 300
    w.received(300)
    c = mux.SendCredit(10)
    assert c.take(25) == 10 and c.take(1) == 0
    c.grant(5)
    assert c.take(25) == 5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([mux.MSG, mux.END]), st.integers(1, 9), st.integers(0, 300_000)), max_size=5),
    st.lists(st.integers(min_value=0, max_value=900_000), max_size=12),
    st.booleans(),
)
def test_mux_large_frames_spanning_chunks_arrive_whole(spec: list[tuple[int, int, int]], cuts: list[int],
                                                        views: bool) -> None:
    """Stream frames of up to ~300 KB spanning many chunks (as STREAM_FRAME frames span four
    Noise messages) come out whole and as bytes, from bytes or memoryview chunks alike."""
    frames = [(t, c, bytes([c]) * n if t == mux.MSG else b"") for t, c, n in spec]
    wire = b"".join(mux.encode(t, c, p) for t, c, p in frames)
    dec = mux.MuxDecoder(1 << 20)
    got = []
    for chunk in split_at(wire, cuts):
        got.extend(dec.feed(memoryview(chunk) if views else chunk))
        assert dec.buffered < 300_000 + mux.HEADER_SIZE
    assert [(t, c, bytes(p)) for t, c, p in got] == frames
    assert all(type(p) is bytes for t, c, p in got if views is False and len(p) > 0) or views
    assert dec.buffered == 0


def test_mux_frame_in_tiny_pieces_holds_few_objects() -> None:
    """A peer sending one large frame a byte at a time makes us hold one growing buffer, not an
    object per piece; pieces of PIECE_VIEW and more are kept without a copy."""
    dec = mux.MuxDecoder(1 << 20)
    payload = bytes(range(256)) * 1024
    wire = mux.encode(mux.MSG, 3, payload)
    for i in range(0, 5000):
        assert dec.feed(wire[i : i + 1]) == []
    assert len(dec._parts) == 1 and dec.buffered == 5000
    rest = wire[5000:]
    big = len(rest) // 2
    assert dec.feed(rest[:big]) == []
    assert len(dec._parts) == 2 and type(dec._parts[1]) is memoryview
    assert dec.feed(rest[big:]) == [(mux.MSG, 3, payload)]
    assert dec.buffered == 0 and dec._parts == []


@given(st.integers(min_value=0, max_value=(1 << 32) - 1))
def test_msg0_header_is_the_mux_header_of_a_channel0_msg(n: int) -> None:
    """writebatch packs RPC message headers from the length alone: the same 9 bytes as mux.encode's."""
    assert mux.MSG0_HEADER.pack(n) == mux.HEADER.pack(mux.MSG, 0, n)
    assert mux.MSG0_HEADER.size == mux.HEADER_SIZE
