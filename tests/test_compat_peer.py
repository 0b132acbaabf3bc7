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


async def test_stream_cancel_and_deadline(node: Node) -> None:
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), node.public_key)
    try:
        # cancel: no answer, the channel is RESET with ERR_CANCELLED
        rid, ch = await conn.open_stream("nat.sink", None, 30_000)
        conn.send_mux(mp.MSG, ch, b"x" * 100)
        await conn.cancel(rid)
        await conn.stream_ended(ch)
        assert conn.resets[ch]["code"] == "ERR_CANCELLED"
        # deadline: a handler still running at timeout_ms is answered ERR_TIMEOUT
        rid, ch = await conn.open_stream("nat.sink", None, 200)
        with pytest.raises(mp.PeerError) as err:
            await conn.answer(rid)
        assert err.value.code == "ERR_TIMEOUT"
        await conn.stream_ended(ch)
        assert conn.resets[ch]["code"] == "ERR_TIMEOUT"
        # a plain call of a stream method
        with pytest.raises(mp.PeerError) as err:
            await conn.call("nat.sink")
        assert err.value.code == "ERR_BAD_REQUEST"
        assert await conn.call("ping") == "pong"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(1, b"\x03<f4\x01" + (5).to_bytes(8, "little") + b"\0" * 4),  # byte count != dims
        msgpack.ExtType(2, b"x"),  # unknown ext type
    ],
    ids=["tensor-size", "ext-type"],
)
async def test_malformed_tensor_fails_its_request_only(node: Node, ext: msgpack.ExtType) -> None:
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), node.public_key)
    try:
        with pytest.raises(mp.PeerError) as err:
            await conn.call_raw([0, 5, "ping", ext, 1000, 0], 5)
        assert err.value.code == "ERR_BAD_REQUEST" and "undecodable" in str(err.value)
        assert await conn.call("ping") == "pong"  # the connection stays
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "frame",
    [
        (9, 0, b""),  # unknown mux frame type
        (mp.CREDIT, 0, b"\0\0\0\1"),  # control frame on the wrong channel
    ],
    ids=["mux-type", "credit-on-0"],
)
async def test_protocol_errors_goaway(node: Node, frame: tuple[int, int, bytes]) -> None:
    conn = await mp.connect("127.0.0.1", node.rpc, mp.Identity(), node.public_key)
    try:
        conn.send_mux(*frame)
        await conn.writer.drain()
        await asyncio.wait_for(conn.closed.wait(), 30)
        assert conn.goaway is not None and conn.goaway["code"] == "ERR_PROTOCOL"
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
    dht = mp.DhtClient(me, client_mode=True)
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


async def test_dht_unannounce(node: Node) -> None:
    me = mp.Identity()
    dht = mp.DhtClient(me, client_mode=True)
    await dht.start()
    topic = mp.topic_from_name("compat/" + os.urandom(4).hex())
    try:
        token = (await dht.topic_get(node.dht_addr, topic))["tk"]
        rec = mp.make_record(me, topic, [("127.0.0.1", 1)], {})
        assert rec["p"] == msgpack.packb({}) or rec["p"] == b""
        assert await dht.topic_put(node.dht_addr, token, rec) == {"ok": True}
        assert len((await dht.topic_get(node.dht_addr, topic))["r"]) == 1
        un = {"t": topic, "k": me.public_key, "s": rec["s"]}
        forged = dict(un, g=mp.Identity().sign(mp.unannounce_signing_bytes(un)))
        refused = await dht.request(node.dht_addr, "topic_del", token, forged)
        assert refused["ok"] is False and refused["code"] == "ERR_FORBIDDEN"
        un["g"] = me.sign(mp.unannounce_signing_bytes(un))
        assert await dht.request(node.dht_addr, "topic_del", token, un) == {"ok": True, "removed": True}
        assert "r" not in await dht.topic_get(node.dht_addr, topic)
    finally:
        dht.close()


async def test_stun_binding_on_dht_port(node: Node) -> None:
    dht = mp.DhtClient(mp.Identity(), client_mode=True)
    await dht.start()
    try:
        assert await dht.stun(node.dht_addr) == ("127.0.0.1", dht.local_port)
        # the same socket still does DHT RPCs after STUN (demultiplexing)
        assert await dht.ping(node.dht_addr) == mp.node_id(node.public_key)
    finally:
        dht.close()


# ------------------------------------------------------------------ byte-for-byte cross-checks
# The only place swarmd itself is imported: the doc-derived encoders must
# produce the very bytes swarmd produces, for any input.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from swarmd.dht.records import signing_bytes, topic_from_name  # noqa: E402
from swarmd.rpc import codec  # noqa: E402

_DTYPES = st.sampled_from(["<f4", "<f8", "<f2", "|i1", "<i8", "<u2", "|b1", "|u1", ">i4"])


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_tensor_encoding_matches_swarmd(arr: np.ndarray) -> None:
    ours = mp.pack({"x": arr})
    assert ours == codec.packb({"x": arr})
    back = codec.unpackb(ours)["x"]
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()
    mine = mp.unpack(codec.packb({"x": arr}))["x"]
    assert mine.dtype == arr.dtype and mine.tobytes() == arr.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(max_size=40),
    addrs=st.lists(st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), max_size=8),
    payload=st.binary(max_size=64),
    seq=st.integers(0, 2**63 - 1),
    expiry=st.integers(0, 2**63 - 1),
)
def test_record_signing_bytes_match_swarmd(
    name: str, addrs: list[tuple[str, int]], payload: bytes, seq: int, expiry: int
) -> None:
    topic = mp.topic_from_name(name)
    assert topic == topic_from_name(name)
    pk = bytes(range(32))
    rec = {"t": topic, "k": pk, "a": [list(a) for a in addrs], "p": payload, "s": seq, "e": expiry}
    assert mp.record_signing_bytes(rec) == signing_bytes(topic, pk, tuple(addrs), payload, seq, expiry)
