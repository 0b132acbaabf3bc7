"""Hostile and broken peers over real TCP: the server answers precisely or cuts that peer off,
and keeps serving everyone else."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_FORBIDDEN,
    ERR_HANDSHAKE,
    ERR_OVERLOADED,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.net import mux
from swarmd.net.framing import encode_frame
from swarmd.net.noise import NoiseSession
from swarmd.node.identity import Identity
from swarmd.rpc import Firewall, RpcConfig, RpcServer, connect
from swarmd.rpc import envelope as env
from tests.rpc_helpers import Log, make_methods

T = 20.0


def small_config() -> RpcConfig:
    cfg = RpcConfig()
    cfg.net.handshake_timeout = 0.5
    cfg.net.max_message_size = 1 << 20
    return cfg


@pytest.fixture
async def server():
    srv = RpcServer(Identity.generate(), make_methods(), config=small_config())
    await srv.start()
    yield srv
    await srv.stop()


async def still_serving(srv: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", srv.port, remote_public_key=srv.identity.public_key, timeout=T)
    try:
        assert await peer.call("echo", "ok", timeout=T) == "ok"
    finally:
        await peer.close()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), T)  # until the server closes


class RawPeer:
    """A hand-driven client: real Noise, but every byte it sends is chosen by the test."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: NoiseSession
    ) -> None:
        self.reader, self.writer, self.session = reader, writer, session
        self.decoder = mux.MuxDecoder(1 << 30)

    @classmethod
    async def open(cls, srv: RpcServer) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        s = NoiseSession(Identity.generate(), initiator=True, remote_public_key=srv.identity.public_key)
        writer.write(s.start())
        while not s.established:
            data = await asyncio.wait_for(reader.read(65536), T)
            assert data, "server closed during handshake"
            out, _ = s.receive(data)
            if out:  # our first transport message (the cipher upgrade offer) goes out like any
                writer.write(out)
        return cls(reader, writer, s)

    def send_plain(self, plaintext: bytes) -> None:
        self.writer.write(self.session.encrypt(plaintext))

    def send_msg(self, payload: bytes) -> None:
        self.send_plain(mux.encode(mux.MSG, 0, payload))

    async def frames(self) -> list[tuple[int, int, bytes]]:
        """Read until at least one mux frame arrived (or EOF)."""
        out: list[tuple[int, int, bytes]] = []
        while not out:
            data = await asyncio.wait_for(self.reader.read(65536), T)
            if not data:
                return out
            _, plain = self.session.receive(data)
            for p in plain:
                out.extend(self.decoder.feed(p))
        return out

    async def until_closed(self) -> list[tuple[int, int, bytes]]:
        got: list[tuple[int, int, bytes]] = []
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), T)
            if not data:
                return got
            try:
                _, plain = self.session.receive(data)
            except SwarmdError:
                return got
            for p in plain:
                got.extend(self.decoder.feed(p))

    def close(self) -> None:
        self.writer.close()


def goaway_code(frames: list[tuple[int, int, bytes]]) -> str | None:
    for t, _c, p in frames:
        if t == mux.GOAWAY:
            return msgpack.unpackb(p)["code"]
    return None


async def test_garbage_before_handshake(server: RpcServer) -> None:
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(3000), b"\x00\x00\x00\x05hello"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(junk)
        await read_all(reader)  # closed, possibly after a readable reject frame
        writer.close()
    await still_serving(server)


async def test_version_mismatch_gets_a_readable_reason(server: RpcServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    s = NoiseSession(Identity.generate(), initiator=True, protocol_id=b"swarmd/9")
    writer.write(s.start())
    reply = await read_all(reader)
    with pytest.raises(SwarmdError) as ei:
        s.receive(reply)
    assert ei.value.code == ERR_HANDSHAKE and "swarmd/9" in ei.value.message
    writer.close()
    await still_serving(server)


async def test_truncated_handshake_times_out(server: RpcServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    s = NoiseSession(Identity.generate(), initiator=True)
    writer.write(s.start()[:10])
    assert await read_all(reader) == b""  # closed by the handshake timeout
    writer.close()
    await still_serving(server)


async def test_garbage_after_handshake(server: RpcServer) -> None:
    raw = await RawPeer.open(server)
    raw.writer.write(encode_frame(os.urandom(100)))  # not authentic
    await raw.until_closed()
    raw.close()
    await still_serving(server)


async def test_oversized_frames(server: RpcServer) -> None:
    raw = await RawPeer.open(server)
    raw.writer.write((70000).to_bytes(4, "big"))  # over the Noise message limit
    await raw.until_closed()
    raw.close()
    raw = await RawPeer.open(server)
    raw.send_plain(mux.HEADER.pack(mux.MSG, 0, 5 << 20))  # mux frame over max_message_size
    assert goaway_code(await raw.until_closed()) == ERR_TOO_LARGE
    raw.close()
    await still_serving(server)


async def test_unknown_frame_type_and_malformed_control(server: RpcServer) -> None:
    for plain in (
        mux.HEADER.pack(42, 0, 0),
        mux.encode(mux.CREDIT, 0, b"\x00\x00\x00\x01"),
        mux.encode(mux.PING, 3),
    ):
        raw = await RawPeer.open(server)
        raw.send_plain(plain)
        assert goaway_code(await raw.until_closed()) == ERR_PROTOCOL
        raw.close()
    await still_serving(server)


async def test_unknown_channel_is_ignored(server: RpcServer) -> None:
    raw = await RawPeer.open(server)
    raw.send_plain(
        mux.encode(mux.MSG, 77, b"who?") + mux.encode(mux.END, 77) + mux.encode(mux.CREDIT, 79, b"\0\0\0\1")
    )
    raw.send_msg(env.request(1, "echo", "alive", 5000, 0))
    frames = await raw.frames()
    assert msgpack.unpackb(frames[0][2]) == [env.RESPONSE, 1, "alive"]
    raw.close()


async def test_bad_envelopes(server: RpcServer) -> None:
    raw = await RawPeer.open(server)
    raw.send_msg(msgpack.packb([0, 5, 123, None, 1000, 0]))  # method not a string, id readable
    frames = await raw.frames()
    kind, rid, err = msgpack.unpackb(frames[0][2])
    assert (kind, rid, err["code"]) == (env.ERROR, 5, ERR_BAD_REQUEST)
    raw.send_msg(env.request(6, "nope", None, 1000, 0))
    kind, rid, err = msgpack.unpackb((await raw.frames())[0][2])
    assert (rid, err["code"]) == (6, ERR_UNKNOWN_METHOD)
    raw.send_msg(env.request(7, "echo", None, 0, 0))  # already past its deadline: not run
    kind, rid, err = msgpack.unpackb((await raw.frames())[0][2])
    assert (rid, err["code"]) == (7, ERR_TIMEOUT)
    raw.send_msg(env.request(8, "upload", None, 1000, 8))  # channel id with our own parity
    assert goaway_code(await raw.until_closed()) == ERR_PROTOCOL
    raw.close()
    raw = await RawPeer.open(server)
    raw.send_msg(b"\xc1 not msgpack")  # no id to answer: the connection goes
    assert goaway_code(await raw.until_closed()) == ERR_PROTOCOL
    raw.close()
    await still_serving(server)


@pytest.mark.parametrize("limit", ["count", "bytes"])
async def test_peer_that_never_reads_is_cut_off(limit: str) -> None:
    cfg = small_config()
    if limit == "count":
        cfg.max_in_flight = 16
    else:
        cfg.max_backlog_bytes = 300_000  # five of the 60 kB requests below
    cfg.net.write_high_water = 64 << 10
    cfg.net.write_low_water = 16 << 10
    srv = RpcServer(Identity.generate(), make_methods(), config=cfg)
    await srv.start()
    try:
        raw = await RawPeer.open(srv)
        (server_side,) = srv.peers  # registered when the server accepted the pipe
        blob = b"z" * 60_000
        for i in range(2000):  # ~120 MB of answers nobody reads
            if raw.writer.is_closing():
                break
            raw.send_msg(env.request(i, "echo", blob, 60_000, 0))
            if server_side.is_closed:
                break
            if i % 50 == 0:
                await asyncio.sleep(0)
                try:
                    await asyncio.wait_for(raw.writer.drain(), 2)
                except TimeoutError:
                    break  # the server stopped reading us: backpressure reached the socket
                except ConnectionError:
                    break  # the server cut us off (it aborts: we do not read its goodbye)
        err = await asyncio.wait_for(server_side.wait_closed(), T)
        assert err.code == ERR_OVERLOADED
        # what the server buffered for us stayed bounded by the backlog, not 120 MB
        raw.close()
        await still_serving(srv)
    finally:
        await srv.stop()


async def test_client_vanishing_mid_call_cancels_handler() -> None:
    log = Log()
    srv = RpcServer(Identity.generate(), make_methods(log), config=small_config())
    await srv.start()
    try:
        raw = await RawPeer.open(srv)
        raw.send_msg(env.request(1, "sleep", 30, 60_000, 0))
        await log.wait_for("sleeping")
        raw.writer.transport.abort()
        await log.wait_for("cancelled")
        await still_serving(srv)
    finally:
        await srv.stop()


async def test_firewall_by_public_key() -> None:
    full, ro, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    fw = Firewall.from_keys(allow=[full.public_key], allow_read_only=[ro.public_key.hex()])
    srv = RpcServer(Identity.generate(), make_methods(), firewall=fw)
    await srv.start()
    try:
        for ident, read_ok, write_ok in ((full, True, True), (ro, True, False), (stranger, False, False)):
            peer = await connect(ident, "127.0.0.1", srv.port, timeout=T)
            try:
                assert await peer.call("ping", timeout=T) == "pong"  # built-ins answer everyone
                for method, ok in (("echo", read_ok), ("write", write_ok)):
                    if ok:
                        assert await peer.call(method, 1, timeout=T) == 1
                    else:
                        with pytest.raises(SwarmdError) as ei:
                            await peer.call(method, 1, timeout=T)
                        assert ei.value.code == ERR_FORBIDDEN
                if not write_ok:
                    s = await peer.open_stream("upload", timeout=T)
                    with pytest.raises(SwarmdError) as ei:
                        await s.result()
                    assert ei.value.code == ERR_FORBIDDEN
            finally:
                await peer.close()
    finally:
        await srv.stop()


async def test_idle_peer_is_closed_and_live_peer_is_kept() -> None:
    cfg = small_config()
    cfg.net.keepalive_interval = 0.05
    # 1 s, not 0.4: client and server share one event loop here, and a loop stalled past the
    # idle timeout (a loaded machine) runs the idle check before the PING queued meanwhile arrives
    cfg.net.idle_timeout = 1.0
    srv = RpcServer(Identity.generate(), make_methods(), config=cfg)
    await srv.start()
    try:
        raw = await RawPeer.open(srv)  # completes the handshake, then never answers PINGs
        frames = await raw.until_closed()
        assert any(t == mux.PING for t, _, _ in frames)
        assert goaway_code(frames) == ERR_TIMEOUT
        raw.close()
        client_cfg = small_config()
        client_cfg.net.keepalive_interval = 0.05
        client_cfg.net.idle_timeout = 1.0
        peer = await connect(None, "127.0.0.1", srv.port, timeout=T, config=client_cfg)
        await asyncio.sleep(2.5)  # several idle timeouts pass; PING/PONG keep it alive
        assert not peer.is_closed
        assert await peer.call("ping", timeout=T) == "pong"
        await peer.close()
    finally:
        await srv.stop()


async def test_connection_limit_refuses_with_a_reason() -> None:
    cfg = small_config()
    cfg.max_connections = 2
    srv = RpcServer(Identity.generate(), make_methods(), config=cfg)
    await srv.start()
    try:
        a = await connect(None, "127.0.0.1", srv.port, timeout=T)
        b = await connect(None, "127.0.0.1", srv.port, timeout=T)
        with pytest.raises(SwarmdError) as ei:
            await connect(None, "127.0.0.1", srv.port, timeout=T)
        assert ei.value.code == ERR_HANDSHAKE and "server full" in ei.value.message
        a_key = a.conn.identity.public_key
        (a_server_side,) = [p for p in srv.peers if p.conn.remote_public_key == a_key]
        await a.close()
        await asyncio.wait_for(a_server_side.wait_closed(), T)
        c = await connect(None, "127.0.0.1", srv.port, timeout=T)
        assert await c.call("ping", timeout=T) == "pong"
        await b.close()
        await c.close()
    finally:
        await srv.stop()



async def test_handler_past_its_deadline_is_stopped_without_a_cancel() -> None:
    """The callee enforces the deadline itself: a caller that never sends CANCEL still frees it."""
    log = Log()
    srv = RpcServer(Identity.generate(), make_methods(log), config=small_config())
    await srv.start()
    try:
        raw = await RawPeer.open(srv)
        raw.send_msg(env.request(1, "sleep", 30, 200, 0))  # 200 ms left, then silence
        kind, rid, err = msgpack.unpackb((await raw.frames())[0][2])
        assert (kind, rid, err["code"]) == (env.ERROR, 1, ERR_TIMEOUT)
        await log.wait_for("cancelled")
        raw.close()
    finally:
        await srv.stop()


# -- per-request limits: one oversized or malformed message fails its request, never the connection --


def _bad_tensor() -> msgpack.ExtType:
    """A tensor ext whose byte count does not match its shape (an f4 of 1000 elements with 3 bytes)."""
    return msgpack.ExtType(1, bytes([3]) + b"<f4" + bytes([1]) + (1000).to_bytes(8, "little") + b"abc")


async def test_oversized_request_and_result_fail_that_call_only(server: RpcServer) -> None:
    import numpy as np

    limit = server.config.net.max_message_size
    peer = await connect(None, "127.0.0.1", server.port, remote_public_key=server.identity.public_key, timeout=T,
                         config=small_config())  # both ends share the limit, as nodes of one swarm do
    try:
        slow = asyncio.ensure_future(peer.call("sleep", 0.5, timeout=T))  # another call in flight all along
        big = np.zeros(limit // 4 + 16, dtype=np.float32)
        with pytest.raises(SwarmdError) as e:
            await peer.call("echo", big, timeout=T)  # refused before it is sent
        assert e.value.code == ERR_TOO_LARGE and "net.max_message_size" in e.value.message
        with pytest.raises(SwarmdError) as e:
            peer.event("note", big)
        assert e.value.code == ERR_TOO_LARGE
        # a result over the callee's limit: the callee answers ERR_TOO_LARGE instead of sending it
        with pytest.raises(SwarmdError) as e:
            await peer.call("blob", {"size": limit + 1}, timeout=T)
        assert e.value.code == ERR_TOO_LARGE, e.value
        assert await slow == "slept"
        assert await peer.call("echo", "still here", timeout=T) == "still here"
        assert not peer.is_closed
    finally:
        await peer.close()
    await still_serving(server)


async def test_malformed_tensor_in_a_request_fails_that_request(server: RpcServer) -> None:
    raw = await RawPeer.open(server)
    raw.send_msg(msgpack.packb([env.REQUEST, 11, "echo", {"x": _bad_tensor()}, 5000, 0]))
    kind, rid, err = msgpack.unpackb((await raw.frames())[0][2])
    assert (kind, rid, err["code"]) == (env.ERROR, 11, ERR_BAD_REQUEST)
    assert "ndarray" in err["message"]
    raw.send_msg(msgpack.packb([env.EVENT, "note", _bad_tensor()]))  # an event: dropped, nothing closes
    raw.send_msg(msgpack.packb([env.REQUEST, 12, "echo", "fine", 5000, 0]))
    kind, rid, result = msgpack.unpackb((await raw.frames())[0][2])
    assert (kind, rid, result) == (env.RESPONSE, 12, "fine")
    raw.close()
    await still_serving(server)


async def test_malformed_tensor_in_an_answer_fails_that_call(server: RpcServer) -> None:
    """The callee is the hostile side: its answer to one call holds a broken tensor."""
    ident = Identity.generate()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = NoiseSession(ident, initiator=False)
        dec = mux.MuxDecoder(1 << 30)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            out, plain = s.receive(data)
            if out:
                writer.write(out)
            for p in plain:
                for t, c, payload in dec.feed(p):
                    if t != mux.MSG or c != 0:
                        continue
                    msg = msgpack.unpackb(payload)
                    if msg[0] == env.REQUEST:
                        answer = _bad_tensor() if msg[3] == "bad" else msg[3]
                        writer.write(s.encrypt(mux.encode(mux.MSG, 0, msgpack.packb([env.RESPONSE, msg[1], answer]))))

    hostile = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = hostile.sockets[0].getsockname()[1]
    try:
        peer = await connect(None, "127.0.0.1", port, remote_public_key=ident.public_key, timeout=T)
        try:
            with pytest.raises(SwarmdError) as e:
                await peer.call("anything", "bad", timeout=T)
            assert e.value.code == ERR_BAD_REQUEST and "answer" in e.value.message
            assert await peer.call("anything", "good", timeout=T) == "good"
        finally:
            await peer.close()
    finally:
        hostile.close()
