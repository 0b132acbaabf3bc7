"""An independent peer written from docs/ alone talks to a real `swarmd` daemon.

Why: docs/protocol.md promises a compatible peer can be written from the docs.
tests/compat/minipeer.py was written from docs/protocol.md, dht.md, swarm.md and
nat.md only (it imports nothing from swarmd/); these tests run it against a
daemon started with the real CLI, so a doc or wire change that breaks third-party
peers fails here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest

from tests.compat import minipeer as mp
from tests.conftest import ROOT, run_cli, swarmd_env


@dataclass
class Node:
    public_key: bytes
    rpc: int
    dht: int
    log: Path

    @property
    def dht_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.dht)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One daemon for the module, logging to a file so nothing blocks on a pipe."""
    tmp = tmp_path_factory.mktemp("compat")
    log = tmp / "swarmd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmd", "--log-format", "json", "--data-dir", str(tmp / "d"),
             "--host", "127.0.0.1", "--port", "0", "--dht-port", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=swarmd_env(), cwd=str(ROOT),
        )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while ready is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            for line in log.read_text().splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "ready":
                    ready = doc
                    break
            else:
                time.sleep(0.05)
        yield Node(bytes.fromhex(ready["public_key"]), ready["ports"]["rpc"], ready["ports"]["dht"], log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ TCP


@pytest.mark.parametrize("pattern", ["IK", "XX"])
async def test_handshake_ping_and_instance_id(node: Node, pattern: str) -> None:
    remote = node.public_key if pattern == "IK" else None
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), remote)
    try:
        assert conn.remote_key == node.public_key  # identity payload checked both ways
        assert await conn.call("ping") == "pong"
        iid = await conn.call("getInstanceId")
        assert isinstance(iid, str) and iid
        assert await conn.ping_frame(b"compat") == b"compat"  # mux PING/PONG
    finally:
        await conn.close()


async def test_tensor_params_echoed(node: Node) -> None:
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), node.public_key)
    try:
        small = np.arange(12, dtype="<f4").reshape(3, 4)
        # 400 KB: the mux frame spans several Noise messages in both directions
        big = np.random.default_rng(1).integers(0, 1 << 30, size=(100, 1000), dtype="<i4")
        flags = np.array([True, False, True])
        params = {"small": small, "big": big, "flags": flags, "b": b"\x00\xff", "s": "text"}
        got = await conn.call("ping", params)
        for key in ("small", "big", "flags"):
            assert isinstance(got[key], np.ndarray)
            assert got[key].dtype == params[key].dtype and np.array_equal(got[key], params[key])
        assert got["b"] == b"\x00\xff" and got["s"] == "text"
    finally:
        await conn.close()


async def test_documented_errors(node: Node) -> None:
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), node.public_key)
    try:
        with pytest.raises(mp.PeerError) as err:
            await conn.call("compat.no_such_method")
        assert err.value.code == "ERR_UNKNOWN_METHOD"
        # timeout_ms <= 0 is answered ERR_TIMEOUT without running (§5)
        with pytest.raises(mp.PeerError) as err:
            await conn.call_raw([mp.REQUEST, 900, "ping", None, 0, 0], 900)
        assert err.value.code == "ERR_TIMEOUT"
        # malformed request whose id is readable: ERR_BAD_REQUEST, connection stays
        with pytest.raises(mp.PeerError) as err:
            await conn.call_raw([mp.REQUEST, 901, 12345, None, 1000, 0], 901)
        assert err.value.code == "ERR_BAD_REQUEST"
        # an event gets no answer; the connection keeps serving
        await conn.call_raw([mp.EVENT, "ping", None], None)
        assert await conn.call("ping", [1]) == [1]
        assert not conn.closed.is_set()
    finally:
        await conn.close()


async def test_handshake_rejects(node: Node) -> None:
    me = mp.Identity()
    with pytest.raises(mp.PeerError, match="reject: .*swarmd/1"):
        await mp.connect("127.0.0.1", node.rpc, me, node.public_key, header=b"\x08swarmd/9\x01")
    with pytest.raises(mp.PeerError, match="reject: .*wrong public key"):
        await mp.connect("127.0.0.1", node.rpc, me, mp.Identity().public_key)
    # identity binding: a payload for another key, or a broken signature
    for liar in (_Liar("other key"), _Liar("bad signature")):
        with pytest.raises(mp.PeerError, match="reject: "):
            await mp.connect("127.0.0.1", node.rpc, liar, node.public_key)
        # XX message 3 is the last one: refused by a close, not a reject
        conn = await mp.connect("127.0.0.1", node.rpc, liar, None)
        try:
            await asyncio.wait_for(conn.closed.wait(), 30)
        finally:
            await conn.close()


class _Liar(mp.Identity):
    """An identity whose handshake payload does not bind its Noise key."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def identity_payload(self) -> bytes:
        if self.how == "other key":
            return mp.Identity().identity_payload()
        good = super().identity_payload()
        return good[:40] + bytes([good[40] ^ 1]) + good[41:]


async def test_stream_call_with_credit_flow_control(node: Node) -> None:
    """3 MB through `nat.sink` (a stream method every node serves): more than the
    1 MiB window, so it only completes if the daemon grants CREDIT."""
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), node.public_key)
    try:
        data = os.urandom(3_000_000)
        result, back = await conn.call_stream("nat.sink", None, data)
        assert result == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert back == b""
        assert conn.credit_frames > 0
        assert await conn.call("ping") == "pong"
    finally:
        await conn.close()


async def test_daemon_calls_our_method(node: Node) -> None:
    """Calls go both ways: A asks the daemon to signal B (`nat.signal`), the daemon
    calls `nat.connect` served by B and returns B's answer to A."""
    a, b = mp.Identity(), mp.Identity()
    seen: list[dict] = []

    async def nat_connect(params: dict) -> dict:
        seen.append(params)
        return {"ok": True}

    ca = await mp.connect("127.0.0.1", node.rpc, a, node.public_key)
    cb = await mp.connect("127.0.0.1", node.rpc, b, None, handlers={"nat.connect": nat_connect})
    try:
        # B dialled with XX: only an answer proves the daemon accepted message 3
        # and admitted B (docs/protocol.md §2); until then B is "not connected"
        assert await cb.call("ping") == "pong"
        token = os.urandom(32)
        params = {"target": b.public_key, "kind": "relay", "relay": ["127.0.0.1", 9], "token": token}
        # the daemon admits B into its table in a task after the handshake while
        # already serving B's calls (reported race): retry ERR_NOT_FOUND a bounded time
        for _ in range(100):
            try:
                answer = await ca.call("nat.signal", params)
                break
            except mp.PeerError as e:
                if e.code != "ERR_NOT_FOUND":
                    raise
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the daemon never admitted our second connection")
        assert answer == {"ok": True}
        assert cb.calls_received == ["nat.connect"]
        assert seen[0]["source"] == a.public_key and seen[0]["target"] == b.public_key
        assert seen[0]["token"] == token and seen[0]["kind"] == "relay"
    finally:
        await ca.close()
        await cb.close()


# ------------------------------------------------------------------ DHT + STUN


async def test_dht_ping_and_signed_peer_record(node: Node) -> None:
    dht = mp.DhtClient(mp.Identity())
    await dht.start()
    try:
        assert await dht.ping(node.dht_addr) == mp.node_id(node.public_key)
        topic = mp.topic_from_name(mp.peer_topic_name(node.public_key))
        reply = await dht.topic_get(node.dht_addr, topic)
        assert all(mp.valid_contact(c) for c in reply["n"])
        assert len(reply["tk"]) == 16
        recs = [r for r in reply["r"] if r["k"] == node.public_key]
        assert len(recs) == 1
        rec = recs[0]
        assert rec["t"] == topic and mp.verify_record(rec)
        assert ["127.0.0.1", node.rpc] in rec["a"]
        assert rec["e"] > time.time() * 1000
        payload = msgpack.unpackb(rec["p"], raw=False)
        assert isinstance(payload, dict) and "nat" in payload
        tampered = dict(rec, s=rec["s"] + 1)
        assert not mp.verify_record(tampered)
    finally:
        dht.close()


async def test_dht_announce_seen_by_real_cli(node: Node, tmp_path: Path) -> None:
    me = mp.Identity()
    dht = mp.DhtClient(me)
    await dht.start()
    name = "compat/" + os.urandom(4).hex()
    topic = mp.topic_from_name(name)
    try:
        token = (await dht.topic_get(node.dht_addr, topic))["tk"]
        rec = mp.make_record(me, topic, [("127.0.0.1", 4242)], {"hello": "compat"})
        refused = await dht.topic_put(node.dht_addr, b"\x00" * 16, rec)
        assert refused["ok"] is False and refused["code"] == "ERR_FORBIDDEN"
        forged = dict(rec, p=msgpack.packb({"hello": "forged"}))
        refused = await dht.topic_put(node.dht_addr, token, forged)
        assert refused["ok"] is False and refused["code"] == "ERR_FORBIDDEN"
        assert await dht.topic_put(node.dht_addr, token, rec) == {"ok": True}
        older = mp.make_record(me, topic, [("127.0.0.1", 4242)], {}, seq=rec["s"] - 1)
        refused = await dht.topic_put(node.dht_addr, token, older)
        assert refused["ok"] is False and refused["code"] == "ERR_CONFLICT"
    finally:
        dht.close()
    out = run_cli(
        "--log-format", "json", "--data-dir", str(tmp_path / "cli"), "topic", "lookup", name,
        "--json", "--timeout", "3", "--bootstrap", f"127.0.0.1:{node.dht}",
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert [(f["public_key"], f["addresses"], f["payload"]) for f in found] == [
        (me.public_key.hex(), ["127.0.0.1:4242"], {"hello": "compat"})
    ]


async def test_stun_binding_on_dht_port(node: Node) -> None:
    dht = mp.DhtClient(mp.Identity(), client_mode=True)
    await dht.start()
    try:
        assert await dht.stun(node.dht_addr) == ("127.0.0.1", dht.local_port)
        # the same socket still does DHT RPCs after STUN (demultiplexing)
        assert await dht.ping(node.dht_addr) == mp.node_id(node.public_key)
    finally:
        dht.close()
