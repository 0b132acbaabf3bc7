"""The lean gRPC lane's HTTP/2 core (gateway/grpc_wire.py) and HPACK decoder (gateway/h2hpack.py),
sans-IO: well-formed calls, flow control, and hostile input answered with the RFC's codes."""

from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.gateway import grpc_wire as w
from swarmd.gateway.h2hpack import HpackDecoder, HpackError, OversizedHeaderList

PATH = b"/inference.GRPCInferenceService/ModelInfer"
HEAD = struct.Struct(">BHBBL")


def request_headers(path: bytes = PATH, **extra: str) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"x"),
              (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    return fields + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]


class Client:
    """The client side, built from the hpack package's encoder (an independent implementation)."""

    def __init__(self, limits: w.Limits | None = None) -> None:
        self.enc = hpack.Encoder()
        self.conn = w.GrpcConnection(limits)
        self.conn.initiate()
        self.server_out = self.conn.data_to_send()

    def send(self, data: bytes) -> list[w.Event]:
        events = self.conn.receive(data)
        self.server_out += self.conn.data_to_send()
        return events

    def start(self) -> list[w.Event]:
        return self.send(w.PREFACE + w.frame(w.SETTINGS, 0, 0))

    def headers(self, sid: int, fields: list[tuple[bytes, bytes]], flags: int = w.END_HEADERS) -> bytes:
        return w.frame(w.HEADERS, flags, sid, self.enc.encode(fields))

    @staticmethod
    def message(sid: int, payload: bytes, end: bool = True, flag: int = 0) -> bytes:
        return w.frame(w.DATA, w.END_STREAM if end else 0, sid, struct.pack(">BI", flag, len(payload)) + payload)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """Every frame the server wrote so far (and forget them)."""
        out, buf, pos = [], self.server_out, 0
        while pos < len(buf):
            hi, lo, kind, flags, sid = HEAD.unpack_from(buf, pos)
            n = (hi << 16) | lo
            out.append((kind, flags, sid, buf[pos + 9:pos + 9 + n]))
            pos += 9 + n
        self.server_out = b""
        return out


def trailers(c: Client, frames: list[tuple[int, int, int, bytes]], sid: int) -> dict[bytes, bytes]:
    dec = hpack.Decoder()
    fields: dict[bytes, bytes] = {}
    for kind, _, s, payload in frames:
        if kind == w.HEADERS and s == sid:
            fields.update(dict(dec.decode(payload, raw=True)))
    return fields


def goaway(frames: list[tuple[int, int, int, bytes]]) -> tuple[int, str]:
    [payload] = [p for kind, _, _, p in frames if kind == w.GOAWAY]
    return int.from_bytes(payload[4:8], "big"), payload[8:].decode()


def test_a_unary_call_round_trip() -> None:
    c = Client()
    assert c.start() == []
    kinds = [f[0] for f in c.frames()]
    assert kinds[:2] == [w.SETTINGS, w.WINDOW_UPDATE] and w.SETTINGS in kinds[2:]  # ours, then the ACK of theirs
    events = c.send(c.headers(1, request_headers(x_api_key="k", grpc_timeout="250m")) + c.message(1, b"hello"))
    assert [type(e) for e in events] == [w.Request, w.Message, w.HalfClosed]
    req = events[0]
    assert req.path == PATH.decode() and req.metadata["x-api-key"] == "k" and req.timeout == pytest.approx(0.25)
    assert events[1].data == b"hello"
    c.conn.respond(1, b"world")
    c.server_out += c.conn.data_to_send()
    frames = c.frames()
    assert [f[0] for f in frames] == [w.HEADERS, w.DATA, w.HEADERS]
    assert frames[1][3] == b"\0\0\0\0\x05world" and frames[2][1] & w.END_STREAM
    got = trailers(c, frames, 1)
    assert got[b":status"] == b"200" and got[b"content-type"] == b"application/grpc" and got[b"grpc-status"] == b"0"
    assert c.conn.open_streams == 0


def test_error_answers_are_trailers_only_with_a_percent_encoded_message() -> None:
    c = Client()
    c.start()
    c.send(c.headers(1, request_headers()) + c.message(1, b""))
    c.frames()
    c.conn.respond(1, None, w.GRPC_STATUS["NOT_FOUND"], "ERR_NOT_FOUND: model 'é' 100%")
    c.server_out += c.conn.data_to_send()
    frames = c.frames()
    assert len(frames) == 1 and frames[0][1] & w.END_STREAM
    got = trailers(c, frames, 1)
    assert got[b"grpc-status"] == b"5" and got[b"grpc-message"] == b"ERR_NOT_FOUND: model '%C3%A9' 100%25"


def test_large_answers_wait_for_the_clients_window() -> None:
    c = Client()
    c.send(w.PREFACE + w.frame(w.SETTINGS, 0, 0, struct.pack(">HI", w.S_INITIAL_WINDOW_SIZE, 1000)))
    c.send(c.headers(1, request_headers()) + c.message(1, b"x"))
    c.frames()
    c.conn.respond(1, b"y" * 5000)
    c.server_out += c.conn.data_to_send()
    sent = c.frames()
    assert sum(len(p) for k, _, _, p in sent if k == w.DATA) == 1000  # the stream window
    assert not any(k == w.HEADERS and f & w.END_STREAM for k, f, _, _ in sent)  # trailers wait too
    c.send(w.frame(w.WINDOW_UPDATE, 0, 1, struct.pack(">I", 10000)))
    rest = c.frames()
    assert sum(len(p) for k, _, _, p in rest if k == w.DATA) == 4005 and rest[-1][1] & w.END_STREAM


def test_large_requests_reopen_the_windows_as_they_arrive() -> None:
    lim = w.Limits(stream_window=1 << 16, connection_window=1 << 17, max_frame_size=1 << 14)
    c = Client(lim)
    c.start()
    c.frames()
    body = bytes(200_000)
    data = struct.pack(">BI", 0, len(body)) + body
    out = c.headers(1, request_headers())
    for i in range(0, len(data), 1 << 14):
        chunk = data[i:i + (1 << 14)]
        out += w.frame(w.DATA, w.END_STREAM if i + (1 << 14) >= len(data) else 0, 1, chunk)
    events = c.send(out)  # more than either window: legal only because the server reopens them as it reads
    assert [type(e) for e in events] == [w.Request, w.Message, w.HalfClosed] and events[1].data == body
    assert any(k == w.WINDOW_UPDATE and s == 0 for k, _, s, _ in c.frames())


@pytest.mark.parametrize("data, code, words", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", w.PROTOCOL_ERROR, "not an HTTP/2 connection preface"),
    (w.frame(w.SETTINGS, 0, 0, b"\0" * 5), w.FRAME_SIZE_ERROR, "a multiple of 6"),
    (w.frame(w.SETTINGS, 0, 1), w.PROTOCOL_ERROR, "SETTINGS on a stream"),
    (w.frame(w.SETTINGS, 0, 0, struct.pack(">HI", w.S_MAX_FRAME_SIZE, 100)), w.PROTOCOL_ERROR, "outside 16384"),
    (w.frame(w.SETTINGS, 0, 0, struct.pack(">HI", w.S_INITIAL_WINDOW_SIZE, 1 << 31)), w.FLOW_CONTROL_ERROR,
     "over 2^31-1"),
    (w.frame(w.PING, 0, 0, b"1234"), w.FRAME_SIZE_ERROR, "PING of 4 bytes"),
    (w.frame(w.CONTINUATION, w.END_HEADERS, 1, b""), w.PROTOCOL_ERROR, "no header block open"),
    (w.frame(w.DATA, 0, 1, b"x"), w.PROTOCOL_ERROR, "DATA on idle stream 1"),
    (w.frame(w.DATA, 0, 0, b"x"), w.PROTOCOL_ERROR, "DATA on stream 0"),
    (w.frame(w.RST_STREAM, 0, 3, b"\0\0\0\x08"), w.PROTOCOL_ERROR, "idle stream 3"),
    (w.frame(w.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), w.PROTOCOL_ERROR, "WINDOW_UPDATE of 0"),
    (w.frame(w.WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1)), w.FLOW_CONTROL_ERROR, "over 2^31-1"),
    (w.frame(w.PUSH_PROMISE, 0, 1, b"\0" * 4), w.PROTOCOL_ERROR, "PUSH_PROMISE"),
    (w.frame(w.HEADERS, w.END_HEADERS, 2, b"\x82"), w.PROTOCOL_ERROR, "even stream 2"),
    (w.frame(w.HEADERS, w.END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff\x7f"), w.COMPRESSION_ERROR, "does not decode"),
    (w.frame(w.HEADERS, w.END_HEADERS, 1, b"\xbf"), w.COMPRESSION_ERROR, "in neither table"),
    (w.frame(w.HEADERS, w.END_HEADERS | w.PADDED, 1, b"\x05ab"), w.PROTOCOL_ERROR, "padding"),
    (w.frame(w.HEADERS, 0, 1, b"\x82") + w.frame(w.PING, 0, 0, b"12345678"), w.PROTOCOL_ERROR,
     "CONTINUATION expected"),
    (b"\x01\x00\x01" + bytes([w.DATA, 0]) + b"\0\0\0\x01", w.FRAME_SIZE_ERROR, "over SETTINGS_MAX_FRAME_SIZE"),
])
def test_hostile_frames_end_the_connection_with_goaway_and_a_reason(data: bytes, code: int, words: str) -> None:
    c = Client()
    if not data.startswith(b"GET"):
        c.start()
    c.frames()
    events = c.send(data)
    assert isinstance(events[-1], w.Terminated) and events[-1].code == code and words in events[-1].message
    got_code, reason = goaway(c.frames())
    assert got_code == code and words in reason
    assert c.send(c.headers(1, request_headers())) == []  # nothing more is read


def test_oversized_header_blocks_are_refused() -> None:
    c = Client(w.Limits(max_header_block=1024))
    c.start()
    big = c.headers(1, request_headers(x_pad="a" * 2000))
    events = c.send(big)
    assert events[-1].code == w.ENHANCE_YOUR_CALM and "over 1024 bytes" in events[-1].message
    c = Client(w.Limits(max_header_list=600))
    c.start()
    events = c.send(c.headers(1, request_headers(x_pad="a" * 500)))
    assert events[-1].code == w.ENHANCE_YOUR_CALM and "SETTINGS_MAX_HEADER_LIST_SIZE" in events[-1].message


def test_streams_over_the_limit_are_refused_and_the_rest_served() -> None:
    c = Client(w.Limits(max_streams=2))
    c.start()
    c.frames()
    events = c.send(b"".join(c.headers(sid, request_headers()) for sid in (1, 3, 5)))
    assert [e.stream_id for e in events if isinstance(e, w.Request)] == [1, 3]
    assert [(k, s, p) for k, _, s, p in c.frames()] == [(w.RST_STREAM, 5, struct.pack(">I", w.REFUSED_STREAM))]


def test_messages_over_the_limit_compressed_or_cut_short_get_a_status() -> None:
    c = Client(w.Limits(max_message=10))
    c.start()
    c.frames()
    out = c.headers(1, request_headers()) + c.message(1, b"x" * 11)
    out += c.headers(3, request_headers()) + c.message(3, b"x", flag=1)
    out += c.headers(5, request_headers(grpc_encoding="gzip")) + c.message(5, b"x", flag=1)
    out += c.headers(7, request_headers()) + w.frame(w.DATA, w.END_STREAM, 7, b"\0\0\0\0\x09abc")
    out += c.headers(9, request_headers(grpc_timeout="soon"))
    events = c.send(out)
    cancelled = {e.stream_id for e in events if isinstance(e, w.Cancelled)}
    assert cancelled == {1, 3, 5, 7, 9}
    frames = c.frames()
    want = {1: (b"8", b"ERR_TOO_LARGE: message of 11 bytes; the limit is 10"),
            3: (b"13", b"without grpc-encoding"), 5: (b"12", b"grpc-encoding 'gzip'"),
            7: (b"13", b"ended inside a message"), 9: (b"3", b"grpc-timeout 'soon' is not")}
    for sid, (status, words) in want.items():
        got = trailers(c, frames, sid)
        assert got[b"grpc-status"] == status and words in got[b"grpc-message"], (sid, got)


def test_not_grpc_requests_get_http_statuses() -> None:
    c = Client()
    c.start()
    c.frames()
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"content-type", b"application/grpc")]
    c.send(c.headers(1, fields, w.END_HEADERS | w.END_STREAM))
    c.send(c.headers(3, request_headers()[:4] + [(b"content-type", b"text/plain")], w.END_HEADERS | w.END_STREAM))
    frames = c.frames()
    assert trailers(c, frames, 1)[b":status"] == b"405" and trailers(c, frames, 3)[b":status"] == b"415"
    c.send(c.headers(5, [(b":path", b"/x")], w.END_HEADERS))  # no :method: malformed, a stream error
    assert c.frames() == [(w.RST_STREAM, 0, 5, struct.pack(">I", w.PROTOCOL_ERROR))]
    c.send(c.headers(7, request_headers() + [(b"connection", b"close")], w.END_HEADERS))
    assert c.frames() == [(w.RST_STREAM, 0, 7, struct.pack(">I", w.PROTOCOL_ERROR))]


def test_rapid_reset_floods_end_the_connection() -> None:
    c = Client(w.Limits(max_client_resets=10))
    c.start()
    events: list[w.Event] = []
    for sid in range(1, 200, 2):
        events += c.send(c.headers(sid, request_headers()) + w.frame(w.RST_STREAM, 0, sid, b"\0\0\0\x08"))
        if c.conn.terminated:
            break
    assert isinstance(events[-1], w.Terminated) and events[-1].code == w.ENHANCE_YOUR_CALM
    assert "rapid reset" in events[-1].message


def test_ping_and_settings_are_acknowledged_and_goaway_stops_new_streams() -> None:
    c = Client()
    c.start()
    c.frames()
    c.send(w.frame(w.PING, 0, 0, b"abcdefgh"))
    assert c.frames() == [(w.PING, w.ACK, 0, b"abcdefgh")]
    c.conn.goaway()
    c.send(c.headers(1, request_headers()))
    frames = c.frames()
    assert frames[0][0] == w.GOAWAY and frames[1] == (w.RST_STREAM, 0, 1, struct.pack(">I", w.REFUSED_STREAM))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_after_the_preface_give_events_or_a_goaway(blob: bytes) -> None:
    c = Client()
    c.start()
    events = c.send(blob)
    assert all(isinstance(e, (w.Request, w.Message, w.HalfClosed, w.Cancelled, w.Terminated)) for e in events)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6), st.binary(max_size=60))
def test_any_frame_sequence_gives_events_or_a_goaway(kinds_payloads: list[bytes], tail: bytes) -> None:
    c = Client()
    c.start()
    c.send(c.headers(1, request_headers()))
    for raw in kinds_payloads:  # first byte: frame type and flags; the rest its payload
        c.send(w.frame(raw[0] % 10, raw[0] >> 4, 1 + (raw[0] & 1) * 2, raw[1:]))
    c.send(tail)
    assert c.conn.terminated or c.conn.open_streams <= 2
    assert c.conn.buffered == sum(len(s.buf) for s in c.conn.streams.values())  # what the lane bounds


def test_buffered_counts_partial_messages_until_they_complete_or_their_stream_goes() -> None:
    c = Client()
    c.start()
    c.send(c.headers(1, request_headers()) + c.headers(3, request_headers()))
    c.send(w.frame(w.DATA, 0, 1, b"\0\0\0\0\x0aabc") + w.frame(w.DATA, 0, 3, b"\0\0\0\0\x0aabcd"))
    assert c.conn.buffered == 8 + 9
    events = c.send(w.frame(w.DATA, w.END_STREAM, 1, b"defghij"))
    assert [type(e) for e in events] == [w.Message, w.HalfClosed] and c.conn.buffered == 9
    c.send(w.frame(w.RST_STREAM, 0, 3, b"\0\0\0\x08"))
    assert c.conn.buffered == 0


# -- HPACK ----------------------------------------------------------------------------

header_lists = st.lists(st.tuples(st.sampled_from([b"x-api-key", b"grpc-timeout", b"user-agent", b":path",
                                                   b"content-type", b"x-other"]),
                                  st.binary(max_size=40)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=6), st.booleans())
def test_hpack_decodes_what_an_independent_encoder_wrote(blocks: list[list[tuple[bytes, bytes]]], huffman: bool
                                                          ) -> None:
    enc = hpack.Encoder()
    enc.header_table_size = 256  # small: evictions happen
    dec = HpackDecoder(4096, 1 << 20)
    for fields in blocks * 2:  # the second pass replays the same blocks: cache hits and table changes mixed
        data = enc.encode(fields, huffman=huffman)
        assert dec.decode(data) == fields


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_hpack_any_bytes_decode_or_raise_hpack_error(blob: bytes) -> None:
    try:
        fields = HpackDecoder(4096, 16384).decode(blob)
    except HpackError as e:
        assert str(e)
        return
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in fields)


def test_hpack_refuses_table_growth_and_oversized_lists() -> None:
    with pytest.raises(HpackError, match="over SETTINGS_HEADER_TABLE_SIZE 4096"):
        HpackDecoder(4096).decode(b"\x3f\xe1\x3f")  # size update to 8192
    with pytest.raises(HpackError, match="after a header field"):
        HpackDecoder(4096).decode(b"\x82\x20")
    with pytest.raises(OversizedHeaderList):
        HpackDecoder(4096, 100).decode(hpack.Encoder().encode([(b"a", b"b" * 100)]))
    with pytest.raises(HpackError, match="more than 5 bytes"):
        HpackDecoder(4096).decode(b"\xff\xff\xff\xff\xff\xff\xff\x01")


def test_hpack_block_cache_stays_bounded_against_many_distinct_blocks() -> None:
    from swarmd.gateway import h2hpack

    dec = HpackDecoder(4096, 1 << 20)
    for i in range(3000):  # distinct literal-without-indexing blocks: each cacheable, none changes the table
        block = w.literal(b"x-pad", b"%06d" % i + b"a" * 900)
        assert dec.decode(block) == [(b"x-pad", b"%06d" % i + b"a" * 900)]
        assert dec.cache_bytes <= h2hpack.CACHE_BYTES
    big = w.literal(b"x-pad", b"b" * 5000)
    dec.decode(big)
    assert big not in dec.cache  # long blocks are never cached
