"""An independent minimal swarmd peer, written from docs/ alone.

Why: the project promises that docs/protocol.md, docs/dht.md, docs/swarm.md and
docs/nat.md are enough to write a compatible peer. This module is the proof: it
imports nothing from swarmd/ or swarmd_rpc/, only the standard library,
noiseprotocol, pynacl, msgpack and numpy, and talks to a real daemon over TCP
(Noise IK/XX, mux, RPC, tensors, calls in both directions), UDP (DHT RPCs,
signed topic records, write tokens) and STUN.

Section references (§) are to docs/protocol.md unless stated otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.signing
import numpy as np
from noise.connection import Keypair, NoiseConnection

PROTOCOL_ID = b"swarmd/1"
PATTERN_IK = 1
PATTERN_XX = 2
NOISE_NAMES = {
    PATTERN_IK: b"Noise_IK_25519_ChaChaPoly_BLAKE2s",
    PATTERN_XX: b"Noise_XX_25519_ChaChaPoly_BLAKE2s",
}
IDENTITY_CONTEXT = b"swarmd/1 noise static key\x00"
MAX_HANDSHAKE_FRAME = 1024
MAX_TRANSPORT_FRAME = 65535
MAX_PLAINTEXT = 65519
MAX_MUX_FRAME = 32 * 1024 * 1024
INITIAL_CREDIT = 1_048_576
STREAM_CHUNK = 65510

MSG, CREDIT, END, RESET, PING, PONG, GOAWAY = range(7)
REQUEST, RESPONSE, ERROR, EVENT, CANCEL = range(5)
TENSOR_EXT = 1


class PeerError(Exception):
    """A coded error answered by the remote peer (§5 error envelope)."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


# ---------------------------------------------------------------- identity


@dataclass
class Identity:
    """Ed25519 identity and its X25519 Noise static key (§2 Keys)."""

    signing_key: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def noise_private(self) -> bytes:
        sk64 = bytes(self.signing_key) + self.public_key
        return sodium.crypto_sign_ed25519_sk_to_curve25519(sk64)

    @property
    def noise_public(self) -> bytes:
        return sodium.crypto_sign_ed25519_pk_to_curve25519(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def identity_payload(self) -> bytes:
        """96 bytes: Ed25519 key | signature over context || X25519 static key."""
        return self.public_key + self.sign(IDENTITY_CONTEXT + self.noise_public)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except Exception:
        return False
    return True


def check_identity_payload(payload: bytes, remote_static: bytes) -> bytes:
    """Return the peer's Ed25519 key after the two checks of §2."""
    if len(payload) != 96:
        raise PeerError("ERR_HANDSHAKE", f"identity payload of {len(payload)} bytes")
    pk, sig = payload[:32], payload[32:]
    if sodium.crypto_sign_ed25519_pk_to_curve25519(pk) != remote_static:
        raise PeerError("ERR_HANDSHAKE", "Ed25519 key does not match the Noise static key")
    if not verify(pk, IDENTITY_CONTEXT + remote_static, sig):
        raise PeerError("ERR_HANDSHAKE", "identity signature does not verify")
    return pk


# ---------------------------------------------------------------- tensors (§5)


def _ext_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays are not allowed")
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")  # keeps 0-d arrays 0-d
        dt = arr.dtype.str.encode("ascii")
        head = bytes([len(dt)]) + dt + bytes([arr.ndim])
        head += b"".join(struct.pack("<Q", d) for d in arr.shape)
        return msgpack.ExtType(TENSOR_EXT, head + arr.tobytes())
    raise TypeError(f"cannot encode {type(obj)}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != TENSOR_EXT:
        raise ValueError(f"ext type {code}")
    n = data[0]
    dtype = np.dtype(data[1 : 1 + n].decode("ascii"))
    if dtype.hasobject:
        raise ValueError("object dtype")
    ndim = data[1 + n]
    off = 2 + n
    dims = [struct.unpack_from("<Q", data, off + 8 * i)[0] for i in range(ndim)]
    off += 8 * ndim
    body = data[off:]
    if len(body) != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
        raise ValueError("tensor byte count")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_ext_default)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


# ---------------------------------------------------------------- TCP peer


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    if n > limit:
        raise PeerError("ERR_TOO_LARGE", f"frame of {n} bytes over {limit}")
    return await reader.readexactly(n)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


Handler = Callable[[Any], Awaitable[Any]]


class Connection:
    """One Noise-encrypted, multiplexed RPC connection (§2–§5).

    Why asyncio: the peer must read while it waits for answers, and answer
    calls the remote side makes on the same connection.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        noise: NoiseConnection,
        remote_key: bytes,
        handlers: dict[str, Handler],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.noise = noise
        self.remote_key = remote_key
        self.handlers = handlers
        self._buf = bytearray()
        self._next_id = 1
        self._next_channel = 1  # we dialled: odd channel ids (§4)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._send_credit: dict[int, int] = {}
        self._credit_event: dict[int, asyncio.Event] = {}
        self._stream_rx: dict[int, asyncio.Queue[bytes | None]] = {}
        self.pongs: asyncio.Queue[bytes] = asyncio.Queue()
        self.goaway: dict[str, Any] | None = None
        self.resets: dict[int, Any] = {}  # channel -> error object of a RESET received
        self.credit_frames = 0  # CREDIT frames received (flow control seen working)
        self.calls_received: list[str] = []  # methods the remote side called on us
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader_task = asyncio.create_task(self._read_loop())

    # -- transport (§3)
    def _send_plain(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_PLAINTEXT):
            self.writer.write(_frame(self.noise.encrypt(data[i : i + MAX_PLAINTEXT])))

    def send_mux(self, ftype: int, channel: int, payload: bytes | bytearray = b"") -> None:
        self._send_plain(struct.pack(">BII", ftype, channel, len(payload)) + payload)

    async def _read_loop(self) -> None:
        try:
            while True:
                body = await _read_frame(self.reader, MAX_TRANSPORT_FRAME)
                self._buf += self.noise.decrypt(body)
                while len(self._buf) >= 9:
                    ftype, channel, length = struct.unpack_from(">BII", self._buf)
                    if length > MAX_MUX_FRAME:
                        raise PeerError("ERR_TOO_LARGE", "mux frame")
                    if len(self._buf) < 9 + length:
                        break
                    payload = bytes(self._buf[9 : 9 + length])
                    del self._buf[: 9 + length]
                    self._on_frame(ftype, channel, payload)
        except (asyncio.IncompleteReadError, ConnectionError, PeerError):
            pass
        finally:
            self.closed.set()
            for fut in self._calls.values():
                if not fut.done():
                    fut.set_exception(PeerError("ERR_CLOSED", "connection closed"))
            for q in self._stream_rx.values():
                q.put_nowait(None)

    def _on_frame(self, ftype: int, channel: int, payload: bytes) -> None:
        if ftype == MSG and channel == 0:
            self._on_envelope(unpack(payload))
        elif ftype == MSG:
            q = self._stream_rx.get(channel)
            if q is not None:
                q.put_nowait(payload)
                # grant the credit straight back: we consume at once
                self.send_mux(CREDIT, channel, struct.pack(">I", len(payload)))
        elif ftype == CREDIT:
            self.credit_frames += 1
            if channel in self._send_credit:
                self._send_credit[channel] += struct.unpack(">I", payload)[0]
                self._credit_event[channel].set()
        elif ftype in (END, RESET):
            if ftype == RESET:
                self.resets[channel] = unpack(payload) if payload else None
            q = self._stream_rx.get(channel)
            if q is not None:
                q.put_nowait(None)
        elif ftype == PING:
            self.send_mux(PONG, 0, payload)
        elif ftype == PONG:
            self.pongs.put_nowait(payload)
        elif ftype == GOAWAY:
            self.goaway = unpack(payload) if payload else {}

    def _on_envelope(self, env: list[Any]) -> None:
        kind = env[0]
        if kind == RESPONSE:
            fut = self._calls.pop(env[1], None)
            if fut is not None and not fut.done():
                fut.set_result(env[2])
        elif kind == ERROR:
            fut = self._calls.pop(env[1], None)
            if fut is not None and not fut.done():
                err = env[2]
                fut.set_exception(PeerError(err["code"], err.get("message", ""), err.get("data")))
        elif kind == REQUEST:
            _, rid, method, params, _timeout_ms, _channel = env
            self.calls_received.append(method)
            task = asyncio.create_task(self._serve(rid, method, params))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, rid: int, method: str, params: Any) -> None:
        handler = self.handlers.get(method)
        if handler is None:
            env = [ERROR, rid, {"code": "ERR_UNKNOWN_METHOD", "message": f"no method {method}"}]
        else:
            try:
                env = [RESPONSE, rid, await handler(params)]
            except PeerError as e:
                env = [ERROR, rid, {"code": e.code, "message": e.message}]
            except Exception as e:  # a non-coded failure is ERR_INTERNAL (§5)
                env = [ERROR, rid, {"code": "ERR_INTERNAL", "message": str(e)}]
        if not self.closed.is_set():
            self.send_mux(MSG, 0, pack(env))
            await self.writer.drain()

    # -- RPC (§5)
    async def call(self, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[rid] = fut
        self.send_mux(MSG, 0, pack([REQUEST, rid, method, params, int(timeout * 1000), 0]))
        await self.writer.drain()
        return await asyncio.wait_for(fut, timeout)

    async def call_raw(self, envelope: list[Any], answer_id: int | None, timeout: float = 10.0) -> Any:
        """Send any envelope (events, malformed requests); await the answer to ``answer_id``."""
        fut: asyncio.Future[Any] | None = None
        if answer_id is not None:
            fut = asyncio.get_running_loop().create_future()
            self._calls[answer_id] = fut
        self.send_mux(MSG, 0, pack(envelope))
        await self.writer.drain()
        return None if fut is None else await asyncio.wait_for(fut, timeout)

    async def open_stream(self, method: str, params: Any, timeout_ms: int | None) -> tuple[int, int]:
        """Start a stream call and return (request id, channel) without sending data."""
        channel = self._next_channel
        self._next_channel += 2
        self._send_credit[channel] = INITIAL_CREDIT
        self._credit_event[channel] = asyncio.Event()
        self._stream_rx[channel] = asyncio.Queue()
        rid = self._next_id
        self._next_id += 1
        self._calls[rid] = asyncio.get_running_loop().create_future()
        self.send_mux(MSG, 0, pack([REQUEST, rid, method, params, timeout_ms, channel]))
        await self.writer.drain()
        return rid, channel

    async def cancel(self, rid: int) -> None:
        """Give up on a call (§5 cancel): no answer will come for it."""
        self._calls.pop(rid, None)
        self.send_mux(MSG, 0, pack([CANCEL, rid]))
        await self.writer.drain()

    async def answer(self, rid: int, timeout: float = 10.0) -> Any:
        return await asyncio.wait_for(self._calls[rid], timeout)

    async def stream_ended(self, channel: int, timeout: float = 10.0) -> None:
        """Wait for END or RESET from the remote side on ``channel``."""
        q = self._stream_rx[channel]
        async with asyncio.timeout(timeout):
            while await q.get() is not None:
                pass

    async def call_stream(
        self, method: str, params: Any, data: bytes, timeout: float = 20.0
    ) -> tuple[Any, bytes]:
        """A stream call: send ``data`` on a fresh odd channel honouring credit."""
        channel = self._next_channel
        self._next_channel += 2
        self._send_credit[channel] = INITIAL_CREDIT
        self._credit_event[channel] = asyncio.Event()
        rx: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._stream_rx[channel] = rx
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[rid] = fut
        self.send_mux(MSG, 0, pack([REQUEST, rid, method, params, int(timeout * 1000), channel]))
        off = 0
        async with asyncio.timeout(timeout):
            while off < len(data):
                while self._send_credit[channel] <= 0:
                    self._credit_event[channel].clear()
                    await self._credit_event[channel].wait()
                n = min(STREAM_CHUNK, self._send_credit[channel], len(data) - off)
                self.send_mux(MSG, channel, data[off : off + n])
                self._send_credit[channel] -= n
                off += n
                await self.writer.drain()
            self.send_mux(END, channel)
            await self.writer.drain()
            result = await fut
        received = bytearray()
        while not rx.empty():
            chunk = rx.get_nowait()
            if chunk is None:
                break
            received += chunk
        return result, bytes(received)

    async def ping_frame(self, payload: bytes) -> bytes:
        self.send_mux(PING, 0, payload)
        await self.writer.drain()
        return await asyncio.wait_for(self.pongs.get(), 10)

    async def close(self) -> None:
        self._reader_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(self._reader_task, *self._tasks, return_exceptions=True)
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def connect(
    host: str,
    port: int,
    identity: Identity,
    remote_key: bytes | None = None,
    handlers: dict[str, Handler] | None = None,
    header: bytes | None = None,
) -> Connection:
    """Dial and handshake: IK when ``remote_key`` is known, else XX (§2).

    ``header`` overrides the opening header (to test rejects); the prologue is
    always the header actually sent.
    """
    pattern = PATTERN_IK if remote_key is not None else PATTERN_XX
    if header is None:
        header = bytes([len(PROTOCOL_ID)]) + PROTOCOL_ID + bytes([pattern])
    noise = NoiseConnection.from_name(NOISE_NAMES[pattern])
    noise.set_as_initiator()
    noise.set_prologue(header)
    noise.set_keypair_from_private_bytes(Keypair.STATIC, identity.noise_private)
    if remote_key is not None:
        remote_static = sodium.crypto_sign_ed25519_pk_to_curve25519(remote_key)
        noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_static)
    noise.start_handshake()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    try:
        async with asyncio.timeout(10):
            if pattern == PATTERN_IK:
                writer.write(_frame(header + noise.write_message(identity.identity_payload())))
                payload = _handshake_body(await _read_frame(reader, MAX_HANDSHAKE_FRAME))
                # rs is the key we dialled; read_message finishes the handshake
                remote_static = sodium.crypto_sign_ed25519_pk_to_curve25519(remote_key)  # type: ignore[arg-type]
                got = check_identity_payload(bytes(noise.read_message(payload)), remote_static)
                if got != remote_key:
                    raise PeerError("ERR_HANDSHAKE", "responder is not the key we dialled")
            else:
                writer.write(_frame(header + noise.write_message(b"")))
                payload = _handshake_body(await _read_frame(reader, MAX_HANDSHAKE_FRAME))
                ident = bytes(noise.read_message(payload))
                rs = noise.noise_protocol.handshake_state.rs.public_bytes
                got = check_identity_payload(ident, rs)
                writer.write(_frame(b"\x00" + noise.write_message(identity.identity_payload())))
            await writer.drain()
    except BaseException:
        writer.close()
        raise
    return Connection(reader, writer, noise, got, handlers or {})


def _handshake_body(body: bytes) -> bytes:
    if not body:
        raise PeerError("ERR_HANDSHAKE", "empty handshake frame")
    if body[0] == 0x01:
        raise PeerError("ERR_HANDSHAKE", "reject: " + body[1:].decode("utf-8", "replace"))
    if body[0] != 0x00:
        raise PeerError("ERR_PROTOCOL", f"handshake frame kind {body[0]}")
    return body[1:]


# ---------------------------------------------------------------- DHT (dht.md)


def node_id(public_key: bytes) -> bytes:
    return hashlib.blake2b(public_key, digest_size=20, person=b"swarmd-dht-id").digest()


def topic_from_name(name: str) -> bytes:
    return hashlib.sha256(b"swarmd/topic/v1\x00" + name.encode()).digest()


def peer_topic_name(public_key: bytes) -> str:
    """The topic every node announces itself on (nat.md, swarm.md)."""
    return "swarmd/peer/" + public_key.hex()


def record_signing_bytes(rec: dict[str, Any]) -> bytes:
    out = bytearray(b"swarmd/record/v1\x00")
    out += rec["t"] + rec["k"] + struct.pack(">QQ", rec["s"], rec["e"])
    out.append(len(rec["a"]))
    for ip, port in rec["a"]:
        ipb = ip.encode("utf-8")
        out += bytes([len(ipb)]) + ipb + struct.pack(">H", port)
    out += struct.pack(">I", len(rec["p"])) + rec["p"]
    return bytes(out)


def unannounce_signing_bytes(un: dict[str, Any]) -> bytes:
    return b"swarmd/unannounce/v1\x00" + un["t"] + un["k"] + struct.pack(">Q", un["s"])


def make_record(
    identity: Identity,
    topic: bytes,
    addresses: list[tuple[str, int]],
    payload: dict[str, Any],
    seq: int | None = None,
    ttl_s: float = 1200,
) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    rec: dict[str, Any] = {
        "t": topic,
        "k": identity.public_key,
        "a": [[ip, port] for ip, port in addresses],
        "p": msgpack.packb(payload, use_bin_type=True),
        "s": now_ms if seq is None else seq,
        "e": now_ms + int(ttl_s * 1000),
    }
    rec["g"] = identity.sign(record_signing_bytes(rec))
    return rec


def verify_record(rec: dict[str, Any]) -> bool:
    return verify(rec["k"], record_signing_bytes(rec), rec["g"])


class _DhtProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[bytes, tuple[tuple[str, int], asyncio.Future[bytes]]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if _is_stun(data):
            key = data[8:20]
        elif data[:1] == b"\x01" and len(data) >= 21:
            key = data[1:21]
        else:
            return  # requests to us (we are a client) are ignored
        entry = self.waiting.get(key)
        if entry is None or entry[0] != addr[:2] or entry[1].done():
            return
        entry[1].set_result(data)


def _is_stun(data: bytes) -> bool:
    return (
        len(data) >= 20
        and data[0] & 0xC0 == 0
        and data[4:8] == b"\x21\x12\xa4\x42"
        and 20 + struct.unpack(">H", data[2:4])[0] == len(data)
    )


class DhtClient:
    """rpcudp-style requests from one UDP socket (dht.md RPC framing)."""

    def __init__(self, identity: Identity, client_mode: bool = False) -> None:
        self.identity = identity
        self.id = b"" if client_mode else node_id(identity.public_key)
        self._proto = _DhtProtocol()
        self.local_port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self._proto, local_addr=("127.0.0.1", 0))
        self.local_port = self._proto.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]

    def close(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.close()

    async def _exchange(self, key: bytes, datagram: bytes, addr: tuple[str, int], timeout: float) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._proto.waiting[key] = (addr, fut)
        try:
            self._proto.transport.sendto(datagram, addr)  # type: ignore[union-attr]
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._proto.waiting.pop(key, None)

    async def request(self, addr: tuple[str, int], method: str, *args: Any, timeout: float = 5.0) -> Any:
        msg_id = os.urandom(20)
        body = msgpack.packb([method, [self.id, *args]], use_bin_type=True)
        reply = await self._exchange(msg_id, b"\x00" + msg_id + body, addr, timeout)
        return msgpack.unpackb(reply[21:], raw=False)

    async def stun(self, addr: tuple[str, int], timeout: float = 5.0) -> tuple[str, int]:
        """RFC 5389 Binding request; returns XOR-MAPPED-ADDRESS."""
        txn = os.urandom(12)
        req = struct.pack(">HH", 0x0001, 0) + b"\x21\x12\xa4\x42" + txn
        resp = await self._exchange(txn, req, addr, timeout)
        mtype, _length = struct.unpack(">HH", resp[:4])
        if mtype != 0x0101:
            raise PeerError("ERR_PROTOCOL", f"STUN response type {mtype:#x}")
        off = 20
        while off + 4 <= len(resp):
            atype, alen = struct.unpack(">HH", resp[off : off + 4])
            value = resp[off + 4 : off + 4 + alen]
            if atype == 0x0020:
                family = value[1]
                port = struct.unpack(">H", value[2:4])[0] ^ 0x2112
                if family == 0x01:
                    raw = bytes(a ^ b for a, b in zip(value[4:8], b"\x21\x12\xa4\x42", strict=True))
                    return socket.inet_ntop(socket.AF_INET, raw), port
                mask = b"\x21\x12\xa4\x42" + txn
                raw = bytes(a ^ b for a, b in zip(value[4:20], mask, strict=True))
                return socket.inet_ntop(socket.AF_INET6, raw), port
            off += 4 + alen + (-alen % 4)
        raise PeerError("ERR_PROTOCOL", "no XOR-MAPPED-ADDRESS")

    # -- methods
    async def ping(self, addr: tuple[str, int]) -> bytes:
        return await self.request(addr, "ping")

    async def topic_get(self, addr: tuple[str, int], topic: bytes, token: bytes | None = None) -> dict[str, Any]:
        args: list[Any] = [topic] if token is None else [topic, token]
        return await self.request(addr, "topic_get", *args)

    async def topic_put(self, addr: tuple[str, int], token: bytes, record: dict[str, Any]) -> dict[str, Any]:
        return await self.request(addr, "topic_put", token, record)


def valid_contact(c: Any) -> bool:
    if not (isinstance(c, list) and len(c) == 3 and isinstance(c[0], bytes) and len(c[0]) == 20):
        return False
    try:
        ipaddress.ip_address(c[1])
    except (ValueError, TypeError):
        return False
    return isinstance(c[2], int) and 1 <= c[2] <= 65535
