"""The HTTP/2 that gRPC uses, server side, sans-IO: bytes in, events and bytes out.

Why not grpcio: its per-call machinery costs ~310 µs of gateway CPU before any work of
ours (the "grpc floor" row of bench/gateway_grpc.py), more than the whole HTTP JSON
route. A gRPC client speaks a small part of HTTP/2, and this class speaks just that
part (docs/grpc-wire.md lists it): the connection preface, SETTINGS and their ACK,
HEADERS + CONTINUATION (HPACK decoding in h2hpack.py, with the dynamic table, Huffman
and a cache of repeated blocks; answers use fixed header blocks that need neither), DATA with flow control
both ways, PING, RST_STREAM, GOAWAY, WINDOW_UPDATE; PRIORITY is read and ignored,
PUSH_PROMISE refused. On top: gRPC's length-prefixed messages (uncompressed only), the
`grpc-timeout` header, and grpc-status/grpc-message trailers.

This module is the state machine: streams, windows, the events it hands the glue. What
it speaks lives beside it, with no state: the frame vocabulary and codec in h2frames.py,
HPACK in h2hpack.py, what gRPC puts in HTTP/2 (request heads, statuses, grpc-timeout,
the answers' header blocks and the byte layout of a whole unary answer) in grpc_http2.py.

It owns no socket, task or timer (gateway/grpc_lane.py is the asyncio glue). What the
peer does wrong is answered the way RFC 9113 says: a connection error queues GOAWAY with
its code and a sentence (debug data) and `receive` returns a `Terminated` event, after
which the connection reads nothing more; a stream error resets that stream. Everything
it buffers is bounded: one frame (`max_frame_size`), one header block
(`max_header_block`), one message per stream (`max_message`), `max_streams` open streams.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from swarmd.gateway import grpc_http2, h2frames
from swarmd.gateway.grpc_http2 import (
    GRPC_STATUS,
    OK_TRAILERS,
    RESPONSE_HEADERS,
    parse_timeout,
    request_verdict,
    trailers_block,
)
from swarmd.gateway.h2frames import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ConnectionError_,
    frame,
)
from swarmd.gateway.h2hpack import HpackDecoder, HpackError, OversizedHeaderList, literal

# The structs the hot path packs and unpacks with, bound by assignment, not by `from ... import`:
# CPython 3.11 compiles a method call on an imported name (`FRAME_HEAD.unpack_from(...)`) to
# LOAD_ATTR, which builds a bound-method object per call, and on any other name to LOAD_METHOD,
# which does not (compile.c: is_import_originated). Imported, they cost the lane ~3% more
# instructions per unary call (callgrind, A/B against the unsplit module).
FRAME_HEAD = h2frames.FRAME_HEAD
UNARY_HEAD = grpc_http2.UNARY_HEAD
OK_TAIL = grpc_http2.OK_TAIL

# -- events -------------------------------------------------------------------------


@dataclass
class Request:
    """A new call: its method path, metadata (lower-case names; pseudo-headers left out) and
    the deadline its grpc-timeout gives (seconds from now, None: none sent)."""

    stream_id: int
    path: str
    metadata: dict[str, str]
    timeout: float | None


@dataclass
class Message:
    """One whole gRPC message of a call."""

    stream_id: int
    data: bytes


@dataclass
class HalfClosed:
    """The client sent its last message of the call (END_STREAM)."""

    stream_id: int


@dataclass
class Cancelled:
    """The call is over without an answer of the app's: the client reset it, or this core
    answered it already (a message over the limit, a compressed message, bad headers)."""

    stream_id: int
    reason: str


@dataclass
class Terminated:
    """The connection is over: GOAWAY is queued (sent by us) or was received; `code` is its
    error code. The glue writes what is queued and closes."""

    code: int
    message: str
    by_peer: bool = False


Event = Request | Message | HalfClosed | Cancelled | Terminated


@dataclass
class Limits:
    """What one connection may make this side hold, and the settings it advertises."""

    max_message: int = 30 * 1024 * 1024  # one gRPC message, prefix excluded (gateway.max_body_bytes)
    max_streams: int = 128  # SETTINGS_MAX_CONCURRENT_STREAMS
    max_frame_size: int = 1 << 16  # SETTINGS_MAX_FRAME_SIZE we accept (16384 ≤ x < 2^24)
    max_header_block: int = 16 * 1024  # encoded header block, CONTINUATIONs included
    max_header_list: int = 16 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE: decoded, RFC 9113 sizes
    stream_window: int = 1 << 20  # SETTINGS_INITIAL_WINDOW_SIZE we advertise
    connection_window: int = 16 << 20  # the connection-level receive window we open at start
    max_client_resets: int = 200  # streams the client may reset before we answer them, beyond 2x the answered


class _Stream:
    """One open stream's state: what is buffered of its messages and what waits on windows
    (a plain class with slots: one is made per call)."""

    __slots__ = ("buf", "done", "encoding", "headers_sent", "need", "pending", "pending_trailers", "recv_closed",
                 "stream_id", "unacked", "window")

    def __init__(self, stream_id: int, window: int = DEFAULT_WINDOW) -> None:
        self.stream_id = stream_id
        self.encoding = "identity"
        self.buf = bytearray()
        self.need = 0  # bytes of the message being read (prefix included); 0: awaiting a prefix
        self.recv_closed = False
        self.headers_sent = False
        self.done = False  # the answer's END_STREAM is queued (maybe waiting on a window)
        self.window = window  # what we may still send on it
        self.unacked = 0  # bytes received on it since its last WINDOW_UPDATE
        self.pending: list[bytes] = []  # DATA payload waiting on a window
        self.pending_trailers: bytes | None = None


class GrpcConnection:
    """The server side of one HTTP/2 connection carrying gRPC calls."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.out: list[bytes] = []
        self.buf = bytearray()
        self.preface_seen = False
        self.terminated = False
        self.going_away = False  # GOAWAY received: no new streams
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self.answered = 0
        self.buffered = 0  # bytes of messages not yet whole, over every stream (the glue bounds it)
        self.client_resets = 0
        self.peer_max_frame = 16384
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # connection-level, what we may send
        self.recv_window = DEFAULT_WINDOW  # connection-level, what the peer may still send
        self.recv_unacked = 0
        self.header_stream = 0  # a header block in progress (CONTINUATION expected) on this stream
        self.header_flags = 0
        self.header_parts: list[bytes] = []
        self.header_size = 0
        self.decoder = HpackDecoder(4096, self.limits.max_header_list)  # SETTINGS_HEADER_TABLE_SIZE: the default
        # header block -> (the decoder's field list, request_head of it): a warm client's repeated heads
        # are parsed once (the metadata dict is shared by those calls: read-only)
        self.parsed: dict[bytes, tuple[list[tuple[bytes, bytes]], tuple[str, dict[bytes, bytes], dict[str, str]]]] = {}
        self.blocked: dict[int, _Stream] = {}  # streams whose answer waits on a window, in order

    # -- the API of the glue -------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server preface: our SETTINGS and the connection window."""
        lim = self.limits
        settings = struct.pack(">HIHIHIHIHI", S_ENABLE_PUSH, 0, S_MAX_CONCURRENT_STREAMS, lim.max_streams,
                               S_INITIAL_WINDOW_SIZE, lim.stream_window, S_MAX_FRAME_SIZE, lim.max_frame_size,
                               S_MAX_HEADER_LIST_SIZE, lim.max_header_list)
        self.out.append(frame(SETTINGS, 0, 0, settings))
        grow = lim.connection_window - DEFAULT_WINDOW
        if grow > 0:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", grow)))
            self.recv_window += grow

    def data_to_send(self) -> bytes:
        if not self.out:
            return b""
        data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
        self.out = []
        return data

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; the events they complete, in order."""
        if self.terminated:
            return []
        events: list[Event] = []
        self.buf += data
        try:
            self._parse(events)
        except ConnectionError_ as e:
            events.append(self._terminate(e.code, e.message))
        return events

    def respond(self, stream_id: int, message: bytes | None, status: int = 0, details: str = "") -> None:
        """A unary answer: headers, the message (None: none, e.g. an error), trailers. A
        stream that is gone (reset) takes nothing."""
        s = self.streams.get(stream_id)
        if s is None or s.done:
            return
        n = len(message) + 5 if message is not None else 0
        if (n and not status and not details and not s.headers_sent and n <= s.window and n <= self.send_window
                and n <= self.peer_max_frame):  # the usual: headers, one DATA frame, trailers, in one piece
            s.window -= n
            self.send_window -= n
            s.headers_sent = s.done = True
            self.answered += 1
            self.out.append(UNARY_HEAD.pack(0, len(RESPONSE_HEADERS), HEADERS, END_HEADERS, stream_id, RESPONSE_HEADERS,
                                            n >> 16, n & 0xFFFF, DATA, 0, stream_id, 0, n - 5)
                            + message + OK_TAIL.pack(0, len(OK_TRAILERS), HEADERS, END_HEADERS | END_STREAM, stream_id,
                                                     OK_TRAILERS))
            self._closed_by_us(s)
            return
        if message is None:
            if not s.headers_sent:  # trailers-only answer: one HEADERS frame
                self._finish(s, RESPONSE_HEADERS + (OK_TRAILERS if status == 0 and not details
                                                    else trailers_block(status, details)), trailers_only=True)
                return
        else:
            self.send_message(stream_id, message)
        self.send_trailers(stream_id, status, details)

    def send_message(self, stream_id: int, message: bytes) -> None:
        """One message of the answer (headers first, if not sent yet)."""
        s = self.streams.get(stream_id)
        if s is None or s.done:
            return
        if not s.headers_sent:
            s.headers_sent = True
            self.out.append(frame(HEADERS, END_HEADERS, stream_id, RESPONSE_HEADERS))
        self._send_data(s, struct.pack(">BI", 0, len(message)) + message)

    def send_trailers(self, stream_id: int, status: int, details: str = "") -> None:
        s = self.streams.get(stream_id)
        if s is None or s.done:
            return
        if not s.headers_sent:
            self.respond(stream_id, None, status, details)
            return
        block = OK_TRAILERS if status == 0 and not details else trailers_block(status, details)
        self._finish(s, block, trailers_only=False)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        s = self.streams.pop(stream_id, None)
        if s is not None:
            self._drop(s)
            self.out.append(frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))

    def _drop(self, s: _Stream) -> None:
        """A stream leaves: what it had of a message is no longer held."""
        if s.buf:
            self.buffered -= len(s.buf)
            s.buf.clear()

    def goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        """Tell the client no new calls will be taken (graceful stop; open calls go on)."""
        self.going_away = True
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, code) + message.encode()[:256]))

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    # -- sending ------------------------------------------------------------------

    def _finish(self, s: _Stream, block: bytes, trailers_only: bool) -> None:
        s.done = True
        self.answered += 1
        if trailers_only:
            s.headers_sent = True
        if s.pending:  # DATA still waits on a window: the trailers go after it
            s.pending_trailers = block
            return
        self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, s.stream_id, block))
        self._closed_by_us(s)

    def _closed_by_us(self, s: _Stream) -> None:
        """Our END_STREAM is out; a client still sending is told to stop."""
        del self.streams[s.stream_id]
        self._drop(s)
        if not s.recv_closed:
            self.out.append(frame(RST_STREAM, 0, s.stream_id, struct.pack(">I", NO_ERROR)))

    def _send_data(self, s: _Stream, payload: bytes) -> None:
        if s.pending:
            s.pending.append(payload)
            return
        rest = self._write_data(s, payload)
        if rest:
            s.pending.append(rest)
            self.blocked[s.stream_id] = s

    def _write_data(self, s: _Stream, payload: bytes) -> bytes:
        """Write what the windows and the frame size allow; returns what is left."""
        n = min(len(payload), s.window, self.send_window, self.peer_max_frame)
        if n == len(payload):  # the usual small answer: one frame, no copy
            self.out.append(frame(DATA, 0, s.stream_id, payload))
            s.window -= n
            self.send_window -= n
            return b""
        view = memoryview(payload)
        while view:
            n = min(len(view), s.window, self.send_window, self.peer_max_frame)
            if n <= 0:
                return bytes(view)
            self.out.append(frame(DATA, 0, s.stream_id, bytes(view[:n])))
            s.window -= n
            self.send_window -= n
            view = view[n:]
        return b""

    def _flush_pending(self) -> None:
        """Windows grew: send what waited on them, stream by stream in order."""
        for s in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            if self.streams.get(s.stream_id) is not s:  # reset meanwhile
                del self.blocked[s.stream_id]
                continue
            while s.pending and s.window > 0 and self.send_window > 0:
                rest = self._write_data(s, s.pending[0])
                if rest:
                    s.pending[0] = rest
                    break
                s.pending.pop(0)
            if not s.pending:
                del self.blocked[s.stream_id]
            if not s.pending and s.pending_trailers is not None:
                self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, s.stream_id, s.pending_trailers))
                s.pending_trailers = None
                self._closed_by_us(s)

    def _terminate(self, code: int, message: str) -> Terminated:
        self.terminated = True
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, code) + message.encode()[:256]))
        return Terminated(code, message)

    def _refuse_call(self, s: _Stream, status: int, message: str, events: list[Event]) -> None:
        """Answer a call this core cannot take (status + message), and tell the app it is over."""
        self.respond(s.stream_id, None, status, message)
        events.append(Cancelled(s.stream_id, message))

    # -- receiving ----------------------------------------------------------------

    def _parse(self, events: list[Event]) -> None:
        buf = self.buf
        pos = 0
        if not self.preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface (gRPC needs HTTP/2 "
                                                           "with prior knowledge)")
                return
            if buf[:len(PREFACE)] != PREFACE:
                raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface (gRPC needs HTTP/2 "
                                                       "with prior knowledge)")
            self.preface_seen = True
            pos = len(PREFACE)
        limit = self.limits.max_frame_size
        end = len(buf)
        try:
            while end - pos >= 9:
                hi, lo, kind, flags, sid = FRAME_HEAD.unpack_from(buf, pos)
                length = (hi << 16) | lo
                if length > limit:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes over SETTINGS_MAX_FRAME_SIZE "
                                                             f"{limit}")
                if end - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, sid & MAX_WINDOW, payload, events)
                if self.terminated:
                    return
        finally:
            del buf[:pos]

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if self.header_stream and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, f"frame of type {kind} inside the header block of stream "
                                                   f"{self.header_stream} (CONTINUATION expected)")
        if kind == DATA:
            self._data(flags, sid, payload, events)
        elif kind == HEADERS:
            self._headers(flags, sid, payload, events)
        elif kind == CONTINUATION:
            if not self.header_stream or sid != self.header_stream:
                raise ConnectionError_(PROTOCOL_ERROR, f"CONTINUATION on stream {sid} with no header block open")
            self._header_part(payload, flags, events)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == PING:
            if sid != 0:
                raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream (must be stream 0)")
            if len(payload) != 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes (must be 8)")
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._rst_stream(sid, payload, events)
        elif kind == GOAWAY:
            if sid != 0 or len(payload) < 8:
                raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream or shorter than 8 bytes")
            self.going_away = True
            code = int.from_bytes(payload[4:8], "big")
            if code != NO_ERROR:
                self.terminated = True
                events.append(Terminated(code, payload[8:72].decode("utf-8", "replace"), by_peer=True))
        elif kind == PRIORITY:
            if sid == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self.out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", FRAME_SIZE_ERROR)))
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # any other type: ignored (RFC 9113 §4.1: unknown frame types are discarded)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream (must be stream 0)")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes (a multiple of 6 expected)")
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, i)
            if ident == S_ENABLE_PUSH and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value} (0 or 1 expected)")
            if ident == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} over 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.window += delta
                    if s.window > MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE overflows a window")
            elif ident == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} outside 16384..2^24-1")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE: our answers never use the dynamic table; the rest do not bind a server
        self.out.append(frame(SETTINGS, ACK, 0))
        if self.blocked:
            self._flush_pending()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes (must be 4)")
        inc = int.from_bytes(payload, "big") & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "WINDOW_UPDATE grows the connection window over 2^31-1")
        else:
            s = self.streams.get(sid)
            if s is None:
                if sid > self.last_stream_id:
                    raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
                return  # a stream that just closed: allowed
            if inc == 0:
                self.reset(sid, PROTOCOL_ERROR)
                return
            s.window += inc
            if s.window > MAX_WINDOW:
                self.reset(sid, FLOW_CONTROL_ERROR)
                return
        if self.blocked:
            self._flush_pending()

    def _rst_stream(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes (must be 4)")
        if sid > self.last_stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        s = self.streams.pop(sid, None)
        if s is None:
            return
        self._drop(s)
        if not s.done:
            self.client_resets += 1
            if self.client_resets > 2 * self.answered + self.limits.max_client_resets:
                raise ConnectionError_(ENHANCE_YOUR_CALM, f"{self.client_resets} streams reset before their answer "
                                                          f"(rapid reset); {self.answered} answered")
        events.append(Cancelled(sid, f"client reset the stream (error code {int.from_bytes(payload, 'big')})"))

    @staticmethod
    def _unpad(flags: int, payload: bytes, what: str) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, f"{what} padding as long as the frame")
            return payload[1:len(payload) - payload[0]]
        return payload

    def _headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload, "HEADERS")
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS with PRIORITY shorter than 5 bytes")
            block = block[5:]
        s = self.streams.get(sid)
        if s is None:
            if sid <= self.last_stream_id:
                raise ConnectionError_(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            if sid % 2 == 0:
                raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS on even stream {sid} (clients use odd ids)")
        elif s.recv_closed or not flags & END_STREAM:
            raise ConnectionError_(PROTOCOL_ERROR, f"second HEADERS on stream {sid} without END_STREAM")
        self.header_stream, self.header_flags = sid, flags
        if flags & END_HEADERS:  # the usual: the whole block in this frame, no CONTINUATION to collect
            if len(block) > self.limits.max_header_block:
                raise ConnectionError_(ENHANCE_YOUR_CALM, f"header block of stream {sid} over "
                                                          f"{self.limits.max_header_block} bytes")
            self.header_stream = 0
            self._header_block(sid, flags, block, events)
            return
        self.header_parts, self.header_size = [], 0
        self._header_part(block, flags, events)

    def _header_part(self, block: bytes, flags: int, events: list[Event]) -> None:
        self.header_size += len(block)
        if self.header_size > self.limits.max_header_block:
            raise ConnectionError_(ENHANCE_YOUR_CALM, f"header block of stream {self.header_stream} over "
                                                      f"{self.limits.max_header_block} bytes")
        self.header_parts.append(block)
        if flags & END_HEADERS:
            sid, self.header_stream = self.header_stream, 0
            block = b"".join(self.header_parts) if len(self.header_parts) > 1 else self.header_parts[0]
            self.header_parts = []
            self._header_block(sid, self.header_flags, block, events)

    def _header_block(self, sid: int, flags: int, block: bytes, events: list[Event]) -> None:
        try:
            fields = self.decoder.decode(block)
        except OversizedHeaderList:
            raise ConnectionError_(ENHANCE_YOUR_CALM, f"header list of stream {sid} over "
                                                      f"SETTINGS_MAX_HEADER_LIST_SIZE {self.limits.max_header_list}"
                                   ) from None
        except HpackError as e:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK block of stream {sid} does not decode: {e}") from None
        s = self.streams.get(sid)
        if s is not None:  # trailers from the client (END_STREAM): ends its half; their content is not used
            self._end_of_input(s, events)
            return
        self.last_stream_id = sid
        if self.going_away:
            self.out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
            return
        if len(self.streams) >= self.limits.max_streams:
            # RFC 9113 §5.1.2: REFUSED_STREAM; the client may retry it once other calls end
            self.out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
            return
        s = self.streams[sid] = _Stream(sid, self.peer_initial_window)
        seen = self.parsed.get(block)
        if seen is not None and seen[0] is fields:  # the decoder's cached list: the same request head as before
            head = seen[1]
        else:
            head = request_verdict(fields)
            if block in self.decoder.cache:  # bounded with it: at most a copy of what it holds
                if len(self.parsed) >= len(self.decoder.cache):
                    self.parsed.clear()
                self.parsed[block] = (fields, head)
        problem, http_status, path, metadata, timeout, encoding = head
        if problem:  # a malformed request: a stream error (RFC 9113 §8.1.1)
            del self.streams[sid]
            self.out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", PROTOCOL_ERROR)))
            return
        if http_status:
            # not gRPC: an HTTP answer, as gRPC servers give (405 / 415), then the stream ends
            s.done = True
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, b"\x08\x03" + http_status))
            self._closed_by_us(s)
            return
        if isinstance(timeout, str):  # a malformed grpc-timeout: the sentence saying so
            self._refuse_call(s, GRPC_STATUS["INVALID_ARGUMENT"], f"ERR_BAD_REQUEST: {timeout}", events)
            return
        s.encoding = encoding
        events.append(Request(sid, path, metadata, timeout))
        if flags & END_STREAM:
            self._end_of_input(s, events)

    def _end_of_input(self, s: _Stream, events: list[Event]) -> None:
        s.recv_closed = True
        if s.need or s.buf:
            self._refuse_call(s, GRPC_STATUS["INTERNAL"],
                              f"ERR_PROTOCOL: the call ended inside a message ({len(s.buf)} of its bytes sent)", events)
            return
        events.append(HalfClosed(s.stream_id))

    def _data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        if size > self.recv_window:
            raise ConnectionError_(FLOW_CONTROL_ERROR, f"DATA of {size} bytes beyond the connection window "
                                                       f"({self.recv_window})")
        self.recv_window -= size
        self.recv_unacked += size
        if self.recv_unacked >= self.limits.connection_window // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.recv_unacked)))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we ended or reset: its late data only counts against the window
        if s.recv_closed:
            raise ConnectionError_(STREAM_CLOSED, f"DATA on stream {sid} after its END_STREAM")
        data = self._unpad(flags, payload, "DATA")
        s.unacked += size
        if s.unacked > self.limits.stream_window:
            self.reset(sid, FLOW_CONTROL_ERROR)
            events.append(Cancelled(sid, f"DATA beyond the stream window ({self.limits.stream_window})"))
            return
        if not flags & END_STREAM and s.unacked >= self.limits.stream_window // 2:
            # the message is read as it comes: open the window again
            self.out.append(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", s.unacked)))
            s.unacked = 0
        if s.done:  # answered already (a refusal): what it still sends is dropped
            return
        if (not s.need and not s.buf and len(data) >= 5 and data[0] == 0
                and int.from_bytes(data[1:5], "big") == len(data) - 5 <= self.limits.max_message):
            events.append(Message(sid, data[5:]))  # the usual unary request: one frame, one message
        elif data:
            s.buf += data
            self.buffered += len(data)
            if not self._messages(s, events):
                return
        if flags & END_STREAM:
            self._end_of_input(s, events)

    def _messages(self, s: _Stream, events: list[Event]) -> bool:
        """Cut whole messages out of the stream's buffer; False when the call was refused."""
        buf = s.buf
        while True:
            if not s.need:
                if len(buf) < 5:
                    return True
                flag = buf[0]
                length = int.from_bytes(buf[1:5], "big")
                if flag > 1:
                    self._refuse_call(s, GRPC_STATUS["INTERNAL"],
                                      f"ERR_PROTOCOL: message prefix flag {flag} (0 or 1 expected)", events)
                    return False
                if flag == 1:
                    if s.encoding == "identity":
                        why = "ERR_PROTOCOL: a compressed message on a call without grpc-encoding"
                        self._refuse_call(s, GRPC_STATUS["INTERNAL"], why, events)
                    else:
                        why = f"ERR_NOT_IMPLEMENTED: grpc-encoding {s.encoding!r}; this server takes identity only"
                        self._refuse_call(s, GRPC_STATUS["UNIMPLEMENTED"], why, events)
                    return False
                if length > self.limits.max_message:
                    self._refuse_call(s, GRPC_STATUS["RESOURCE_EXHAUSTED"],
                                      f"ERR_TOO_LARGE: message of {length} bytes; the limit is {self.limits.max_message}",
                                      events)
                    return False
                s.need = 5 + length
            if len(buf) < s.need:
                return True
            events.append(Message(s.stream_id, bytes(buf[5:s.need])))
            del buf[:s.need]
            self.buffered -= s.need
            s.need = 0


__all__ = [
    "GRPC_STATUS", "Cancelled", "GrpcConnection", "HalfClosed", "Limits", "Message", "Request", "Terminated",
    "frame", "parse_timeout",
    # the vocabulary the core speaks (h2frames, h2hpack), also read through this module by its tests
    "literal",
]
