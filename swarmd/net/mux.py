"""Multiplexing frames carried inside the secure byte stream (sans-IO).

Inside the encrypted stream every frame is ``u8 type | u32 channel | u32 length |
payload`` (big-endian). Channel 0 carries whole RPC messages; channels ≥ 1 are
byte streams with credit-based flow control: a sender may have at most the
credit the receiver granted in flight (INITIAL_WINDOW at open, plus every
CREDIT frame since). Noise message boundaries mean nothing to this layer: a mux
frame may span several transport messages and one transport message usually
carries many small frames (one AEAD operation per batch).
"""

from __future__ import annotations

import struct

from swarmd.errors import ERR_PROTOCOL, ERR_TOO_LARGE, SwarmdError

MSG = 0  # channel 0: one RPC message; channel >= 1: stream bytes (consumes credit)
CREDIT = 1  # payload u32: bytes the receiver adds to the sender's credit
END = 2  # sender will send no more data on the channel (half close)
RESET = 3  # abort the channel both ways; payload: RPC error object (msgpack), may be empty
PING = 4  # channel 0, payload <= 64 bytes echoed in PONG
PONG = 5
GOAWAY = 6  # channel 0, payload: RPC error object (msgpack); the sender closes next

TYPE_NAMES = {
    MSG: "MSG",
    CREDIT: "CREDIT",
    END: "END",
    RESET: "RESET",
    PING: "PING",
    PONG: "PONG",
    GOAWAY: "GOAWAY",
}

HEADER = struct.Struct(">BII")
HEADER_SIZE = HEADER.size  # 9
# HEADER of a MSG frame on channel 0 (an RPC message), packed from its length alone
MSG0_HEADER = struct.Struct(">5xI")
INITIAL_WINDOW = 1 << 20  # protocol constant: credit of each direction of a new channel
MAX_PING_PAYLOAD = 64
STREAM_CHUNK = 65519 - HEADER_SIZE  # header + this much fill one Noise message exactly
PIECE_VIEW = 16 * 1024  # a partial frame keeps pieces from this size up as views, no copy


def encode(ftype: int, channel: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, channel, len(payload)) + payload


def encode_credit(channel: int, amount: int) -> bytes:
    return HEADER.pack(CREDIT, channel, 4) + amount.to_bytes(4, "big")


class MuxDecoder:
    """Parses mux frames out of decrypted plaintext chunks.

    The announced length is checked against max_frame before the payload is
    buffered; unknown frame types and malformed control frames are protocol
    errors (the connection is closed), frames for unknown channels are the
    connection's business (they can race with a close and are dropped there).

    A frame spanning several chunks (an RPC message over 64 KiB, a tensor, spans
    several Noise messages) is kept as the list of its pieces and joined once when
    complete: one copy per byte, as for a frame lying inside one chunk (it was three:
    appending to a buffer, slicing it, converting the slice). Pieces of
    at least PIECE_VIEW bytes are kept as views of their (immutable) chunk; smaller
    ones are copied together, so a peer sending a frame in tiny messages cannot
    make us hold a piece object per byte.
    """

    __slots__ = ("max_frame", "_buf", "_parts", "_held", "_need")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()  # the header of the frame being received (and, briefly, its start)
        self._parts: list[bytes | bytearray | memoryview] = []  # its payload so far
        self._held = 0  # bytes in _parts
        self._need = 0  # payload bytes still to come

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Frames completed by data; only a frame straddling two chunks is buffered."""
        out: list[tuple[int, int, bytes]] = []
        buf = self._buf
        if buf:
            if len(buf) < HEADER_SIZE:
                take = HEADER_SIZE - len(buf)
                buf += data[:take]
                data = data[take:]
                if len(buf) < HEADER_SIZE:
                    return out
                ftype, channel, n = self._check(*HEADER.unpack_from(buf, 0))
                self._need = n
            else:
                ftype, channel, _ = HEADER.unpack_from(buf, 0)
            need = self._need
            if len(data) < need:
                if data:
                    self._keep(data)
                    self._need = need - len(data)
                return out
            parts = self._parts
            if parts:
                parts.append(memoryview(data)[:need] if type(data) is bytes else data[:need])
                payload = b"".join(parts)
                self._parts = []
                self._held = 0
            else:
                payload = bytes(data[:need])
            buf.clear()
            self._need = 0
            out.append((ftype, channel, payload))
            data = data[need:]
        pos = 0
        end = len(data)
        unpack = HEADER.unpack_from
        max_frame = self.max_frame
        while end - pos >= HEADER_SIZE:
            ftype, channel, n = unpack(data, pos)
            if n > max_frame or ftype > GOAWAY:
                self._check(ftype, channel, n)
            stop = pos + HEADER_SIZE + n
            if stop > end:
                break
            out.append((ftype, channel, data[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            rest = end - pos
            if rest < HEADER_SIZE:
                buf += data[pos:]
            else:  # a whole header and the start of its payload
                buf += data[pos : pos + HEADER_SIZE]
                self._need = n
                if rest > HEADER_SIZE:
                    start = pos + HEADER_SIZE
                    self._keep(memoryview(data)[start:] if type(data) is bytes else data[start:])
                    self._need = n - (rest - HEADER_SIZE)
        return out

    def _keep(self, piece: bytes | memoryview) -> None:
        """Hold a piece of the payload being received (a view of a large immutable one)."""
        parts = self._parts
        self._held += len(piece)
        if len(piece) >= PIECE_VIEW and type(piece) is bytes:
            parts.append(memoryview(piece))
        elif len(piece) >= PIECE_VIEW and type(piece) is memoryview and piece.readonly:
            parts.append(piece)
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += piece  # type: ignore[operator]
        else:
            parts.append(bytearray(piece))

    def _check(self, ftype: int, channel: int, n: int) -> tuple[int, int, int]:
        if n > self.max_frame:
            self._reset()
            raise SwarmdError(
                ERR_TOO_LARGE, f"mux frame of {n} bytes announced, the maximum is {self.max_frame}"
            )
        if ftype > GOAWAY:
            self._reset()
            raise SwarmdError(ERR_PROTOCOL, f"unknown mux frame type {ftype}")
        return ftype, channel, n

    def _reset(self) -> None:
        self._buf = bytearray()
        self._parts = []
        self._held = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not complete yet."""
        return len(self._buf) + self._held


def check_control(ftype: int, channel: int, payload: bytes) -> None:
    """Validate the shape of a non-MSG frame; raises ERR_PROTOCOL on a malformed one."""
    if ftype == CREDIT:
        if channel == 0 or len(payload) != 4:
            raise SwarmdError(ERR_PROTOCOL, "CREDIT frame must name a stream channel and carry 4 bytes")
    elif ftype == END:
        if channel == 0 or payload:
            raise SwarmdError(ERR_PROTOCOL, "END frame must name a stream channel and carry no payload")
    elif ftype == RESET:
        if channel == 0:
            raise SwarmdError(ERR_PROTOCOL, "RESET frame must name a stream channel")
    elif ftype in (PING, PONG, GOAWAY):
        if channel != 0:
            raise SwarmdError(ERR_PROTOCOL, f"{TYPE_NAMES[ftype]} frame must be on channel 0")
        if ftype != GOAWAY and len(payload) > MAX_PING_PAYLOAD:
            raise SwarmdError(ERR_PROTOCOL, f"{TYPE_NAMES[ftype]} payload over {MAX_PING_PAYLOAD} bytes")


class SendCredit:
    """What a sender may still put in flight on one channel."""

    __slots__ = ("available",)

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.available = initial

    def take(self, wanted: int) -> int:
        n = min(wanted, self.available)
        self.available -= n
        return n

    def grant(self, amount: int) -> None:
        if self.available + amount > 1 << 40:
            raise SwarmdError(ERR_PROTOCOL, "peer granted an absurd amount of credit")
        self.available += amount


class RecvWindow:
    """Receiver side of flow control: rejects overruns, decides when to grant credit,
    and when a bulk stream's window should grow (the peer may only have a window in
    flight per round trip of credit, so a fixed 1 MiB caps a stream at 1 MiB per
    round trip, which a busy or distant peer makes long)."""

    __slots__ = ("window", "allowed", "consumed", "read")

    def __init__(self, window: int = INITIAL_WINDOW) -> None:
        self.window = window
        self.allowed = window  # bytes the peer may still send
        self.consumed = 0  # bytes the application read and we have not re-granted yet
        self.read = 0  # bytes the application read since the window last changed

    def received(self, n: int) -> None:
        if n > self.allowed:
            raise SwarmdError(ERR_PROTOCOL, f"peer sent {n} bytes with only {self.allowed} bytes of credit")
        self.allowed -= n

    def consume(self, n: int) -> int:
        """The app read n bytes; returns credit to grant now (0 = not yet, batch it)."""
        self.consumed += n
        self.read += n
        if self.consumed >= self.window >> 2:
            grant, self.consumed = self.consumed, 0
            self.allowed += grant
            return grant
        return 0

    def growth(self, limit: int) -> int:
        """Bytes to add to the window now (0: keep it): a stream whose reader went through
        two windows since the last change is a bulk transfer, and its window doubles, up to `limit`."""
        if self.window >= limit or self.read < 2 * self.window:
            return 0
        return min(self.window, limit - self.window)

    def grow(self, extra: int) -> int:
        """Enlarge the window by `extra`; returns the credit to grant for it."""
        self.window += extra
        self.allowed += extra
        self.read = 0
        return extra
