"""Hostile traffic thrown at a real daemon on loopback: shared by
tests/test_hostile_daemon.py and bench/memory.py.

Every loop is bounded in count and in time; everything goes to 127.0.0.1.
Each function returns a small dict of what it did, for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from swarmd.net import mux
from swarmd.net.tcp import dial
from swarmd.node.identity import Identity
from swarmd.rpc import envelope


@dataclass
class Load:
    """How much of each kind; the defaults keep one full round under ~10 s on a busy 2-core box."""

    garbage_udp: int = 3000
    dht_flood: int = 4000
    idle_tcp: int = 300  # connections that never finish the Noise handshake
    idle_hold: float = 2.0  # seconds they stay open before we drop them
    half_frames: int = 40  # authenticated connections that stop in the middle of a frame
    garbage_after_handshake: int = 40
    nonreaders: int = 2  # RPC peers that send requests and never read the answers
    nonreader_requests: int = 1500  # each: a ping carrying 16 KiB that the daemon echoes
    nonreader_pings: int = 100_000  # mux PING frames (the daemon answers each with a PONG)
    nonreader_errors: int = 0  # stream calls of an unknown 256-character method: an error reply each
    time_budget: float = 20.0  # a hard bound on one kind of load


async def garbage_udp(port: int, n: int) -> dict[str, Any]:
    """Random datagrams (empty, tiny, rpc-looking, STUN-looking, oversized) to the DHT port."""
    rng = random.Random(1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    sent = 0
    try:
        for i in range(n):
            kind = i % 6
            if kind == 0:
                data = b""
            elif kind == 1:
                data = rng.randbytes(rng.randrange(1, 64))
            elif kind == 2:  # rpc header, garbage body
                data = bytes([rng.randrange(2)]) + rng.randbytes(20) + rng.randbytes(rng.randrange(0, 400))
            elif kind == 3:  # STUN magic cookie, garbage attributes
                data = b"\x00\x01\x00\x20\x21\x12\xa4\x42" + rng.randbytes(12 + 32)
            elif kind == 4:  # rpc header, valid msgpack of the wrong shape
                data = b"\x00" + rng.randbytes(20) + msgpack.packb({"x": [1, 2, {"y": b"z" * 50}]})
            else:
                data = rng.randbytes(rng.choice((1200, 9000, 61_000)))
            with contextlib.suppress(BlockingIOError, OSError):
                s.sendto(data, ("127.0.0.1", port))
                sent += 1
            if i % 200 == 199:
                await asyncio.sleep(0.005)  # let the daemon's socket buffer drain instead of dropping
    finally:
        s.close()
    return {"garbage_datagrams": sent}


async def dht_flood(port: int, n: int, budget: float) -> dict[str, Any]:
    """Valid-looking DHT requests (ping, find_node, topic_get) from one source, as fast as we can."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    my_id = os.urandom(20)
    sent = answered = 0
    deadline = time.monotonic() + budget
    try:
        for i in range(n):
            if time.monotonic() > deadline:
                break
            kind = i % 3
            if kind == 0:
                body = ["ping", [my_id]]
            elif kind == 1:
                body = ["find_node", [os.urandom(20), os.urandom(20)]]  # a new node id each time
            else:
                body = ["topic_get", [my_id, os.urandom(32)]]
            with contextlib.suppress(BlockingIOError, OSError):
                s.sendto(b"\x00" + os.urandom(20) + msgpack.packb(body, use_bin_type=True), ("127.0.0.1", port))
                sent += 1
            while True:
                try:
                    s.recv(65536)
                    answered += 1
                except (BlockingIOError, OSError):
                    break
            if i % 100 == 99:
                await asyncio.sleep(0.002)
        await asyncio.sleep(0.2)
        while True:
            try:
                s.recv(65536)
                answered += 1
            except (BlockingIOError, OSError):
                break
    finally:
        s.close()
    return {"flood_requests": sent, "flood_answered": answered}


async def idle_tcp(port: int, n: int, hold: float) -> dict[str, Any]:
    """Connections that never finish the handshake: silent ones, and ones that stop mid-frame."""
    writers: list[asyncio.StreamWriter] = []
    opened = 0
    try:
        for i in range(n):
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            except (OSError, TimeoutError):
                continue
            opened += 1
            writers.append(w)
            if i % 3 == 1:
                w.write(b"\x00")  # one byte of a frame length
            elif i % 3 == 2:
                w.write(b"\x00\x00\x00\x30\x08swarmd/1\x02")  # a first frame's header, no key
        await asyncio.sleep(hold)
    finally:
        for w in writers:
            w.transport.abort()
    return {"idle_connections": opened}


async def _authenticated(port: int, key: bytes) -> Any:
    return await dial(Identity.generate(), "127.0.0.1", port, remote_public_key=key, timeout=10)


async def half_frames(port: int, key: bytes, n: int, hold: float) -> dict[str, Any]:
    """After a real handshake, announce a large frame and send only part of it (mux and Noise level)."""
    conns = []
    try:
        for i in range(n):
            try:
                c = await _authenticated(port, key)
            except Exception:
                continue
            conns.append(c)
            pipe = c._pipe
            if i % 2 == 0:  # a mux frame of 1 MB announced, 40 KB of it sent
                pipe.write(c.session.encrypt(mux.HEADER.pack(mux.MSG, 0, 1 << 20) + b"x" * 40_000))
            else:  # a Noise message of 65535 bytes announced, 1000 bytes of it sent
                pipe.write(b"\x00\x00\xff\xff" + os.urandom(1000))
        await asyncio.sleep(hold)
    finally:
        for c in conns:
            if c._pipe is not None:
                c._pipe.abort()
            c.close(tell_peer=False)
    return {"half_frame_connections": len(conns)}


async def garbage_after_handshake(port: int, key: bytes, n: int) -> dict[str, Any]:
    """Complete the handshake, then write bytes that are not Noise transport messages."""
    done = 0
    for i in range(n):
        try:
            c = await _authenticated(port, key)
        except Exception:
            continue
        if i % 2:
            c._pipe.write(os.urandom(2000))
        else:  # a well-formed length prefix, then a message that fails authentication
            c._pipe.write(b"\x00\x00\x01\x00" + os.urandom(256))
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(c.closed), 5)  # the daemon hangs up
        done += 1
        c.close(tell_peer=False)
    return {"garbage_connections": done}


async def nonreader(
    port: int, key: bytes, requests: int, pings: int, budget: float, errors: int = 0
) -> dict[str, Any]:
    """An RPC peer that stops reading, then sends requests whose answers are large, PING frames,
    and stream calls the daemon can only answer with an error (no backlog holds those)."""
    c = await _authenticated(port, key)
    c._pipe.pause_reading()
    payload = os.urandom(16 << 10)
    deadline = time.monotonic() + budget
    sent_req = sent_ping = 0
    try:
        for rid in range(1, requests + 1):
            if c.is_closed or time.monotonic() > deadline:
                break
            c.send_message(envelope.request(rid, "ping", payload, 60_000, 0))
            sent_req += 1
            if rid % 64 == 0:
                await asyncio.sleep(0)
                if c.write_paused:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(c.drain(), 2)
        ping = mux.encode(mux.PING, 0, b"p" * mux.MAX_PING_PAYLOAD)
        batch = ping * 500
        while sent_ping < pings and not c.is_closed and time.monotonic() < deadline:
            c._queue_bulk(batch, b"")
            sent_ping += 500
            await asyncio.sleep(0)
            if c.write_paused:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.drain(), 2)
        sent_err = 0
        bad = "x" * 256
        while sent_err < errors and not c.is_closed and time.monotonic() < deadline:
            for _ in range(500):
                sent_err += 1
                c.send_message(envelope.request(1 << 40 | sent_err, bad, None, 60_000, 2 * sent_err + 1))
            await asyncio.sleep(0)
            if c.write_paused:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.drain(), 2)
        await asyncio.sleep(0.5)
        closed_by_daemon = c.is_closed
    finally:
        if c._pipe is not None:
            c._pipe.abort()
        c.close(tell_peer=False)
    return {
        "nonreader_requests": sent_req,
        "nonreader_pings": sent_ping,
        "nonreader_error_calls": sent_err,
        "nonreader_cut_off": closed_by_daemon,
    }


async def run_all(rpc_port: int, dht_port: int, key: bytes, load: Load) -> dict[str, Any]:
    """Every kind of hostile load, one after another (each bounded), loopback only."""
    out: dict[str, Any] = {}
    out.update(await garbage_udp(dht_port, load.garbage_udp))
    out.update(await dht_flood(dht_port, load.dht_flood, load.time_budget))
    out.update(await idle_tcp(rpc_port, load.idle_tcp, load.idle_hold))
    out.update(await half_frames(rpc_port, key, load.half_frames, load.idle_hold))
    out.update(await garbage_after_handshake(rpc_port, key, load.garbage_after_handshake))
    for _ in range(load.nonreaders):
        r = await nonreader(
            rpc_port, key, load.nonreader_requests, load.nonreader_pings, load.time_budget, load.nonreader_errors
        )
        for k, v in r.items():
            out[k] = out.get(k, 0) + v if not isinstance(v, bool) else (out.get(k, True) and v)
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
