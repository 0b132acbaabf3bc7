"""A real daemon under hostile traffic keeps serving, keeps its log short and
does not keep the memory the traffic made it hold.

The daemon is started through the CLI; the traffic (tests/hostile_traffic.py)
is garbage UDP and a request flood on the DHT port, connections that never
finish the handshake, half-sent frames, garbage after a handshake, and RPC
peers that never read what the daemon answers. The RSS bound is a leak
detector, not a timing threshold.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import msgpack
import pytest

from swarmd.errors import ERR_OVERLOADED
from swarmd.net import mux
from swarmd.net.config import NetConfig
from swarmd.net.tcp import dial
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer, connect, envelope
from swarmd.rpc.config import RpcConfig
from tests.conftest import run_cli
from tests.hostile_traffic import Load, rss_mb, run_all

RSS_GROWTH_BOUND_MB = 40.0
MAX_WARNING_LINES = 80  # rate-limited: about one line per kind of rejection per second
MAX_LOG_LINES = 300

TEST_LOAD = Load(
    garbage_udp=2000,
    dht_flood=3000,
    idle_tcp=150,
    idle_hold=1.0,
    half_frames=20,
    garbage_after_handshake=20,
    nonreaders=1,
    nonreader_requests=1500,
    nonreader_pings=50_000,
    time_budget=10.0,
)


@pytest.mark.slow
async def test_daemon_survives_hostile_traffic(daemons, tmp_path):
    config = tmp_path / "swarmd.toml"
    config.write_text("[rpc.net]\nhandshake_timeout = 1.0\n")
    d = daemons("--role", "bootstrap", "--data-dir", str(tmp_path / "node"), "--config", str(config))
    ready = await asyncio.to_thread(d.wait_event, "ready")
    # read the daemon's log continuously: a flood of lines must never block it on a full pipe
    reader = asyncio.ensure_future(asyncio.to_thread(d.proc.stdout.read))
    pid, key = ready["pid"], bytes.fromhex(ready["public_key"])
    rpc_port, dht_port = ready["ports"]["rpc"], ready["ports"]["dht"]
    before = rss_mb(pid)

    # half-open handshakes: the daemon hangs up on its own after handshake_timeout
    silent = [await asyncio.open_connection("127.0.0.1", rpc_port) for _ in range(20)]
    try:
        for r, _w in silent:
            assert await asyncio.wait_for(r.read(), 30) == b""
    finally:
        for _r, w in silent:
            w.transport.abort()

    did = await asyncio.wait_for(run_all(rpc_port, dht_port, key, TEST_LOAD), 120)
    assert did["garbage_datagrams"] > 0 and did["flood_requests"] > 0 and did["idle_connections"] > 0
    assert did["half_frame_connections"] > 0 and did["garbage_connections"] > 0

    # still serving: an RPC connect, and the operator's CLI through the DHT
    peer = await connect(None, "127.0.0.1", rpc_port, remote_public_key=key, timeout=30)
    try:
        assert await peer.call("ping", timeout=30) == "pong"
    finally:
        await peer.close()
    cli = await asyncio.to_thread(
        run_cli, "call", key.hex(), "ping", "--bootstrap", f"127.0.0.1:{dht_port}", "--timeout", "20"
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == "pong"

    after = rss_mb(pid)
    assert after - before <= RSS_GROWTH_BOUND_MB, (before, after, did)

    d.proc.terminate()
    assert await asyncio.to_thread(d.proc.wait, 30) == 0
    log = "".join(d.lines) + await asyncio.wait_for(reader, 30)
    lines = log.splitlines()
    assert not any("Traceback" in line for line in lines), log[-5000:]
    warnings = [line for line in lines if '"level": "WARNING"' in line or '"level": "ERROR"' in line]
    assert len(warnings) <= MAX_WARNING_LINES, "\n".join(warnings[-50:])
    assert len(lines) <= MAX_LOG_LINES, "\n".join(lines[-50:])


async def _nonreading_server(max_write_buffer: int) -> RpcServer:
    cfg = RpcConfig(net=NetConfig(max_write_buffer=max_write_buffer))
    server = RpcServer(Identity.generate(), Methods(), config=cfg)
    await server.start()
    return server


async def test_peer_that_does_not_read_errors_is_cut_off():
    """Error replies a peer provokes at will (stream calls of an unknown method) are
    not held back by the request backlog; the write cap closes the connection."""
    server = await _nonreading_server(256 << 10)
    try:
        c = await dial(Identity.generate(), "127.0.0.1", server.port,
                       remote_public_key=server.identity.public_key, timeout=30)  # fmt: skip
        c._pipe.pause_reading()
        closed = None
        for i in range(200):  # at most 200 * 200 calls * ~330 bytes of errors owed: far past the cap
            for j in range(200):
                n = i * 200 + j
                c.send_message(envelope.request(n + 1, "x" * 256, None, 60_000, 2 * n + 1))
            await asyncio.sleep(0)
            if not server.peers:
                break
            if c._write_paused:
                await asyncio.wait_for(c.drain(), 30)
        peers = list(server.peers)
        for p in peers:  # the server must have closed its side for the overloading peer
            closed = await asyncio.wait_for(asyncio.shield(p.conn.closed), 30)
        assert not peers or closed.code == ERR_OVERLOADED
        assert not server.peers
        c._pipe.abort()
    finally:
        await server.stop()


async def test_pings_from_a_peer_that_does_not_read_are_not_answered():
    server = RpcServer(Identity.generate(), Methods())
    await server.start()
    try:
        c = await dial(Identity.generate(), "127.0.0.1", server.port,
                       remote_public_key=server.identity.public_key, timeout=30)  # fmt: skip
        c._pipe.pause_reading()
        (peer,) = server.peers
        sconn = peer.conn
        batch = mux.encode(mux.PING, 0, b"p" * mux.MAX_PING_PAYLOAD) * 1000
        sent = 0
        # until the server's pipe is paused, then as much again: no PONG may be queued meanwhile
        while sent < 200_000 and not sconn.write_paused:
            c._queue_bulk(batch, b"")
            sent += 1000
            await asyncio.wait_for(c.drain(), 30)
            await asyncio.sleep(0)
        assert sconn.write_paused, "the server's pipe never filled"
        held = sconn._pipe.get_write_buffer_size()
        for _ in range(100):
            c._queue_bulk(batch, b"")
            await asyncio.wait_for(c.drain(), 30)
            await asyncio.sleep(0)
        assert sconn._pipe.get_write_buffer_size() <= held + len(batch), "PONGs piled up"
        c._pipe.abort()
    finally:
        await server.stop()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="glibc/Linux only")
def test_release_freed_memory_runs_and_is_rate_limited(monkeypatch):
    from swarmd.node import memory

    monkeypatch.setattr(memory, "_last", -1e18)
    assert memory.release_freed_memory(min_interval=3600) is True
    assert memory.release_freed_memory(min_interval=3600) is False


async def test_release_requests_coalesce_into_one_trim(monkeypatch):
    from swarmd.node import memory

    loop = asyncio.get_running_loop()
    runs: list[float] = []
    ran = loop.create_future()

    def fake_release(min_interval: float) -> None:
        runs.append(min_interval)
        if not ran.done():
            ran.set_result(None)

    monkeypatch.setattr(memory, "_last", -1e18)
    monkeypatch.setattr(memory, "release_freed_memory", fake_release)
    for _ in range(50):  # all made before the timer can fire: one trim serves them all
        memory.release_freed_memory_soon(loop, delay=0.01)
    await asyncio.wait_for(ran, 30)
    assert len(runs) == 1 and memory._pending is None


HEAVY_PACKAGES = ("numpy", "onnxruntime", "onnx", "aiohttp", "aiortc", "aioice", "aioquic", "fastapi", "uvicorn", "sklearn")


def test_bootstrap_node_loads_no_heavy_package(daemons, tmp_path):
    """A DHT-only node must not pay for numpy, onnxruntime, aiohttp or aioquic (DESIGN: lazy imports)."""
    d = daemons("--role", "bootstrap", "--data-dir", str(tmp_path / "node"))
    ready = d.wait_event("ready")
    maps = Path(f"/proc/{ready['pid']}/maps").read_text()
    loaded = [name for name in HEAVY_PACKAGES if f"/site-packages/{name}/" in maps]
    assert loaded == [], f"a bootstrap node mapped {loaded}: some module imports them at start"


async def test_goaway_reasons_neither_flood_nor_bloat_the_log():
    """A peer picks a GOAWAY's code and reason and can reconnect at will: one line per period, bounded."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message} {extra}")
    server = RpcServer(Identity.generate(), Methods())
    await server.start()
    try:
        for i in range(30):
            c = await dial(Identity.generate(), "127.0.0.1", server.port,
                           remote_public_key=server.identity.public_key, timeout=30)  # fmt: skip
            (peer,) = [p for p in server.peers if not p.conn.is_closed]
            reason = {"code": f"ERR_{i}", "message": "y" * 100_000}
            c._pipe.write(c.session.encrypt(mux.encode(mux.GOAWAY, 0, msgpack.packb(reason))))
            err = await asyncio.wait_for(asyncio.shield(peer.conn.closed), 30)
            assert len(err.message) < 200
            c._pipe.abort()
    finally:
        await server.stop()
        logger.remove(sink)
    goaway = [line for line in lines if "peer closed the connection" in line]
    assert len(goaway) <= 1, len(goaway)
    assert all(len(line) < 2000 for line in lines), max(len(line) for line in lines)


async def _until(cond, timeout: float = 30.0) -> None:
    """Poll a condition of the in-process server (no event exists for 'bytes arrived')."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_half_received_frames_are_capped_across_connections():
    """Each peer may hold one large frame half-sent; together they stay under max_partial_total."""
    from swarmd.net import peerlimits

    base = peerlimits.partial.total
    cfg = RpcConfig(net=NetConfig(max_partial_total=base + (4 << 20)))
    server = RpcServer(Identity.generate(), Methods(), config=cfg)
    await server.start()
    clients, closed = [], []
    part = mux.HEADER.pack(mux.MSG, 0, 4 << 20) + b"z" * (1536 << 10)  # 1.5 MiB of a 4 MiB frame
    try:
        for _ in range(6):
            known = set(server.peers)
            c = await dial(Identity.generate(), "127.0.0.1", server.port,
                           remote_public_key=server.identity.public_key, timeout=30)  # fmt: skip
            clients.append(c)
            (speer,) = set(server.peers) - known  # accepted before our handshake completed
            c._pipe.write(c.session.encrypt(part))
            await _until(lambda p=speer: p.conn.is_closed or p.conn._partial_held == len(part))
            closed.append(speer.conn.error.code if speer.conn.is_closed else None)
        assert closed == [None, None] + [ERR_OVERLOADED] * 4, closed
        assert peerlimits.partial.total == base + 2 * len(part)
    finally:
        for c in clients:
            if c._pipe is not None:
                c._pipe.abort()
        await _until(lambda: not server.peers)
        await server.stop()
    assert peerlimits.partial.total == base, "accounting drifted"
