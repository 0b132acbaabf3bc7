"""Blind relay protocol (sans-IO): pair two byte streams by a token, then splice.

The relay is the path that always works, even between two symmetric NATs: both
peers open an outbound TCP connection to a relay, each sends the same 32-byte
token (chosen at random by the caller and handed to the callee through
signalling), and the relay joins the two streams. Everything after that is
ciphertext of a Noise session that runs end to end between the peers: the
relay never holds a key, so it can neither read nor forge what it carries.

Wire format (docs/nat.md):

    hello  (client -> relay, once, 38 bytes)
        "SWRL" | u8 version (1) | u8 kind (1 = circuit, 2 = ping) | token (32 bytes)
    status (relay -> client, one or more)
        u8 code | u8 reason length | reason (UTF-8)

A circuit client receives WAITING when its token is registered, then PAIRED
when the other side arrives; the byte after PAIRED's reason is the first byte
from the peer. A ping gets PONG and the connection closes (clients pick the
relay with the lowest round trip); PONG's reason ends with `observed=IP:PORT` (`[IPV6]:PORT`),
the client's address as the relay saw it (its TCP mapping: what a TCP
simultaneous open through the client's NAT needs, swarmd/net/tcppunch.py). Refusals carry a code >= 16 and close.

`RelayCore` is the relay's bookkeeping with no sockets and no clock of its own:
admission (circuit and per-source caps), pairing by token, byte accounting.
The asyncio glue (swarmd/net/relayserver.py, swarmd/net/relayio.py) feeds it events and performs the
actions it returns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from swarmd.errors import (
    ERR_CLOSED,
    ERR_CONFLICT,
    ERR_OVERLOADED,
    ERR_PROTOCOL,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ConfigError,
    SwarmdError,
)

MAGIC = b"SWRL"
VERSION = 1
KIND_CIRCUIT = 1
KIND_PING = 2
TOKEN_SIZE = 32
HELLO = struct.Struct("!4sBB32s")
HELLO_SIZE = HELLO.size  # 38

ST_WAITING = 0
ST_PAIRED = 1
ST_PONG = 2
REFUSAL_MIN = 16
ST_TIMEOUT = 16  # nobody else presented the token in time
ST_OVERLOADED = 17  # the relay is at its circuit limit
ST_BAD_HELLO = 18
ST_TOKEN_IN_USE = 19  # the token already pairs two streams
ST_RATE_LIMITED = 20  # this source holds too many unpaired streams
ST_CLOSING = 21  # the relay is shutting down
ST_TOO_LARGE = 22  # the circuit carried its byte allowance

STATUS_NAMES = {
    ST_WAITING: "waiting",
    ST_PAIRED: "paired",
    ST_PONG: "pong",
    ST_TIMEOUT: "timeout",
    ST_OVERLOADED: "overloaded",
    ST_BAD_HELLO: "bad_hello",
    ST_TOKEN_IN_USE: "token_in_use",
    ST_RATE_LIMITED: "rate_limited",
    ST_CLOSING: "closing",
    ST_TOO_LARGE: "too_large",
}
_STATUS_CODES = {
    ST_TIMEOUT: ERR_TIMEOUT,
    ST_OVERLOADED: ERR_OVERLOADED,
    ST_BAD_HELLO: ERR_PROTOCOL,
    ST_TOKEN_IN_USE: ERR_CONFLICT,
    ST_RATE_LIMITED: ERR_RATE_LIMITED,
    ST_CLOSING: ERR_CLOSED,
    ST_TOO_LARGE: ERR_TOO_LARGE,
}
MAX_REASON = 255


@dataclass
class RelayConfig:
    """[relay]: limits of a relay node; the defaults suit a small public box."""

    host: str = ""  # listen address; "" = the node's RPC host
    port: int = 0  # TCP port of the relay listener; 0 picks a free one
    max_circuits: int = 64  # paired + unpaired streams' circuits at once
    max_pending_per_source: int = 8  # unpaired streams one source address may hold
    # streams, unpaired or spliced, one source address may hold: both ends of a circuit from one
    # address count twice, so one address cannot take every circuit by pairing with itself
    max_streams_per_source: int = 16
    max_connections_per_source: int = 32  # open sockets from one address, hello phase included
    pair_timeout: float = 10.0  # an unpaired stream is refused after this long
    hello_timeout: float = 5.0  # the hello must arrive within this after connect
    idle_timeout: float = 60.0  # a circuit with no byte either way for this long is closed
    max_bytes: int = 4 << 30  # bytes one circuit may carry (both directions together)
    max_connections: int = 512  # open sockets at once, hello phase included; more are refused on accept
    announce: bool = True  # announce on the RELAYS topic so clients find us unconfigured

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"relay.port must be between 0 and 65535, got {self.port}")
        if self.max_connections < 2:
            raise ConfigError(f"relay.max_connections must be >= 2, got {self.max_connections}")
        if self.max_circuits < 1 or self.max_pending_per_source < 1 or self.max_bytes < 1:
            raise ConfigError("relay.max_circuits, relay.max_pending_per_source and relay.max_bytes must be >= 1")
        if self.max_streams_per_source < 1 or self.max_connections_per_source < 1:
            raise ConfigError("relay.max_streams_per_source and relay.max_connections_per_source must be >= 1")
        for name in ("pair_timeout", "hello_timeout", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"relay.{name} must be a positive number of seconds, got {getattr(self, name)}")


class RelayProtocolError(SwarmdError):
    """The other side broke the relay wire format."""

    def __init__(self, message: str) -> None:
        super().__init__(ERR_PROTOCOL, message)


@dataclass(frozen=True)
class Hello:
    kind: int
    token: bytes


def encode_hello(kind: int, token: bytes = b"\x00" * TOKEN_SIZE) -> bytes:
    if kind not in (KIND_CIRCUIT, KIND_PING):
        raise ValueError(f"relay hello kind must be {KIND_CIRCUIT} or {KIND_PING}, got {kind}")
    if len(token) != TOKEN_SIZE:
        raise ValueError(f"relay token must be {TOKEN_SIZE} bytes, got {len(token)}")
    return HELLO.pack(MAGIC, VERSION, kind, token)


def decode_hello(data: bytes) -> Hello:
    """Parse the client's 38-byte hello; RelayProtocolError says what was wrong."""
    if len(data) != HELLO_SIZE:
        raise RelayProtocolError(f"relay hello must be {HELLO_SIZE} bytes, got {len(data)}")
    magic, version, kind, token = HELLO.unpack(data)
    if magic != MAGIC:
        raise RelayProtocolError(f"relay hello must start with {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise RelayProtocolError(f"relay protocol version {version} is not supported (expected {VERSION})")
    if kind not in (KIND_CIRCUIT, KIND_PING):
        raise RelayProtocolError(f"relay hello kind {kind} is unknown (1 = circuit, 2 = ping)")
    if kind == KIND_CIRCUIT and token == b"\x00" * TOKEN_SIZE:
        raise RelayProtocolError("relay circuit token must not be all zeros")
    return Hello(kind, token)


@dataclass(frozen=True)
class Status:
    code: int
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.code >= REFUSAL_MIN

    def error(self) -> SwarmdError:
        """The refusal as an error with a stable code."""
        name = STATUS_NAMES.get(self.code, f"status {self.code}")
        return SwarmdError(
            _STATUS_CODES.get(self.code, ERR_PROTOCOL),
            f"relay refused the circuit ({name}): {self.reason or 'no reason given'}",
            {"relay_status": name},
        )


def encode_status(code: int, reason: str = "") -> bytes:
    raw = reason.encode()[:MAX_REASON]
    return struct.pack("!BB", code, len(raw)) + raw


class StatusDecoder:
    """Client side: turns relay bytes into Status events until PAIRED or a refusal.

    Bytes after PAIRED belong to the spliced stream and are handed back in `rest`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> tuple[list[Status], bytes]:
        if self.done:
            return [], data
        self._buf += data
        out: list[Status] = []
        while len(self._buf) >= 2:
            code, n = self._buf[0], self._buf[1]
            if len(self._buf) < 2 + n:
                break
            reason = bytes(self._buf[2 : 2 + n]).decode(errors="replace")
            del self._buf[: 2 + n]
            if code not in STATUS_NAMES:
                raise RelayProtocolError(f"relay sent unknown status code {code}")
            st = Status(code, reason)
            out.append(st)
            if st.code in (ST_PAIRED, ST_PONG) or st.refused:
                self.done = True
                rest = bytes(self._buf)
                self._buf.clear()
                return out, rest
        return out, b""


# -- the relay's bookkeeping ------------------------------------------------------


@dataclass
class Send:
    """Write `data` to connection `conn`."""

    conn: int
    data: bytes


@dataclass
class Refuse:
    """Write a refusal status to `conn` and close it."""

    conn: int
    code: int
    reason: str


@dataclass
class Splice:
    """Join `a` (who waited) and `b` (who arrived second) as circuit `circuit`."""

    circuit: int
    a: int
    b: int


@dataclass
class CloseCircuit:
    circuit: int
    code: int
    reason: str


Action = Send | Refuse | Splice | CloseCircuit


@dataclass
class Circuit:
    id: int
    a: int
    b: int
    bytes: int = 0


@dataclass
class _Pending:
    conn: int
    source: str
    token: bytes


@dataclass
class RelayCore:
    """Pairing and limits. Connection ids are chosen by the caller (glue)."""

    config: RelayConfig
    closing: bool = False
    _pending: dict[bytes, _Pending] = field(default_factory=dict)  # token -> waiting stream
    _pending_by_conn: dict[int, bytes] = field(default_factory=dict)
    _per_source: dict[str, int] = field(default_factory=dict)  # source -> unpaired streams
    _streams: dict[str, int] = field(default_factory=dict)  # source -> unpaired + spliced streams
    _conn_source: dict[int, str] = field(default_factory=dict)  # conn -> source, for every stream counted
    _circuits: dict[int, Circuit] = field(default_factory=dict)
    _conn_circuit: dict[int, int] = field(default_factory=dict)
    _next_circuit: int = 1
    refused: dict[str, int] = field(default_factory=dict)  # status name -> count
    paired_total: int = 0

    @property
    def circuits(self) -> int:
        return len(self._circuits)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _refuse(self, conn: int, code: int, reason: str) -> list[Action]:
        name = STATUS_NAMES[code]
        self.refused[name] = self.refused.get(name, 0) + 1
        return [Refuse(conn, code, reason)]

    def hello(self, conn: int, source: str, data: bytes, observed: str = "") -> list[Action]:
        """A connection sent its hello bytes; `observed` ("ip:port") is echoed in a PONG."""
        if self.closing:
            return self._refuse(conn, ST_CLOSING, "relay is shutting down")
        try:
            h = decode_hello(data)
        except RelayProtocolError as e:
            return self._refuse(conn, ST_BAD_HELLO, e.message)
        if h.kind == KIND_PING:
            seen = f" observed={observed}" if observed else ""
            return [Send(conn, encode_status(ST_PONG, f"circuits={self.circuits} pending={self.pending}{seen}"))]
        waiting = self._pending.get(h.token)
        if waiting is not None and waiting.conn == conn:
            return self._refuse(conn, ST_BAD_HELLO, "hello sent twice")
        if self._streams.get(source, 0) >= self.config.max_streams_per_source:
            return self._refuse(
                conn,
                ST_RATE_LIMITED,
                f"source holds {self.config.max_streams_per_source} relay streams already (max_streams_per_source)",
            )
        if waiting is not None:
            self._drop_pending(waiting.conn)
            self._count_stream(conn, source)
            cid = self._next_circuit
            self._next_circuit += 1
            self._circuits[cid] = Circuit(cid, waiting.conn, conn)
            self._conn_circuit[waiting.conn] = cid
            self._conn_circuit[conn] = cid
            self.paired_total += 1
            return [Splice(cid, waiting.conn, conn)]
        if any(c.a == conn or c.b == conn for c in self._circuits.values()):
            return self._refuse(conn, ST_BAD_HELLO, "hello sent on a spliced stream")
        if self.circuits + self.pending >= self.config.max_circuits:
            return self._refuse(
                conn, ST_OVERLOADED, f"relay is at its limit of {self.config.max_circuits} circuits"
            )
        if self._per_source.get(source, 0) >= self.config.max_pending_per_source:
            return self._refuse(
                conn,
                ST_RATE_LIMITED,
                f"source holds {self.config.max_pending_per_source} unpaired streams already",
            )
        self._pending[h.token] = _Pending(conn, source, h.token)
        self._pending_by_conn[conn] = h.token
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._count_stream(conn, source)
        return [Send(conn, encode_status(ST_WAITING, f"pair within {self.config.pair_timeout:g}s"))]

    def pair_timeout(self, conn: int) -> list[Action]:
        """The glue's timer for an unpaired stream fired."""
        if conn not in self._pending_by_conn:
            return []
        self._drop_pending(conn)
        return self._refuse(
            conn, ST_TIMEOUT, f"no peer presented the token within {self.config.pair_timeout:g}s"
        )

    def carried(self, circuit: int, n: int) -> list[Action]:
        """`n` bytes crossed circuit; closes it once it is over its allowance."""
        c = self._circuits.get(circuit)
        if c is None:
            return []
        c.bytes += n
        if c.bytes > self.config.max_bytes:
            self.refused["too_large"] = self.refused.get("too_large", 0) + 1
            return [
                CloseCircuit(
                    circuit, ST_TOO_LARGE, f"circuit carried more than {self.config.max_bytes} bytes"
                )
            ]
        return []

    def _count_stream(self, conn: int, source: str) -> None:
        self._conn_source[conn] = source
        self._streams[source] = self._streams.get(source, 0) + 1

    def _uncount_stream(self, conn: int) -> None:
        source = self._conn_source.pop(conn, None)
        if source is None:
            return
        left = self._streams.get(source, 1) - 1
        if left > 0:
            self._streams[source] = left
        else:
            self._streams.pop(source, None)

    def closed(self, conn: int) -> list[Action]:
        """A connection ended (EOF, error, idle, refusal): forget it; end its circuit."""
        self._uncount_stream(conn)
        if conn in self._pending_by_conn:
            self._drop_pending(conn)
            return []
        cid = self._conn_circuit.pop(conn, None)
        if cid is None:
            return []
        c = self._circuits.pop(cid, None)
        if c is None:
            return []
        other = c.b if c.a == conn else c.a
        self._conn_circuit.pop(other, None)
        self._uncount_stream(other)
        return [CloseCircuit(cid, ST_CLOSING, "the other side closed")]

    def _drop_pending(self, conn: int) -> None:
        token = self._pending_by_conn.pop(conn)
        p = self._pending.pop(token)
        left = self._per_source.get(p.source, 1) - 1
        if left > 0:
            self._per_source[p.source] = left
        else:
            self._per_source.pop(p.source, None)

    def circuit(self, cid: int) -> Circuit | None:
        return self._circuits.get(cid)
