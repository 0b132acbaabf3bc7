"""The Swarm over real DHT nodes and real Noise/TCP RPC connections on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest

from swarmd.errors import ERR_TIMEOUT, ERR_UNKNOWN_METHOD, SwarmdError
from swarmd.net.config import NetConfig
from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, Methods, RpcServer
from swarmd.rpc.config import RpcConfig
from swarmd.swarm import ConnectionEvent, Swarm, SwarmConfig
from tests.dht_testnet import DhtTestnet


def _methods(tag: str) -> Methods:
    m = Methods()

    async def who(ctx: CallContext, params: Any) -> Any:
        return {"tag": tag, "caller": ctx.peer, "echo": params}

    async def slow(ctx: CallContext, params: Any) -> Any:
        await asyncio.sleep(10)

    m.register("who", who)
    m.register("slow", slow)
    return m


def _cfg(**kw: Any) -> SwarmConfig:
    base = SwarmConfig(relookup_interval=0.3, reconnect_initial=0.05, connect_timeout=3.0, lookup_timeout=3.0)
    return dataclasses.replace(base, **kw)


async def _swarm(net: DhtTestnet, tag: str, *, server: bool = False, **kw: Any) -> Swarm:
    ident = Identity.generate()
    dht = await net.add(ident)
    rpc: Any = _methods(tag)
    rpc_config = kw.pop("rpc_config", None)
    if server:
        rpc = RpcServer(ident, rpc, "127.0.0.1", 0, config=rpc_config)
        await rpc.start()
    firewall = kw.pop("firewall", None)
    sw = Swarm(ident, dht, rpc, _cfg(**kw), firewall=firewall)
    await sw.start()
    return sw


@pytest.fixture
async def net():  # noqa: ANN201
    n = await DhtTestnet.create(10)
    yield n
    await n.close()


async def _stop(*swarms: Swarm) -> None:
    for s in swarms:
        await s.stop()
        if not s._own_server:
            await s.server.stop()


async def test_join_connects_both_sides_and_reports_topics(net: DhtTestnet) -> None:
    a = await _swarm(net, "a")
    b = await _swarm(net, "b", server=True)
    events: list[ConnectionEvent] = []
    a.on_connection = events.append
    try:
        seen_by_b = b.connections()
        t = await b.join("room", announce=True, lookup=False, payload={"load": 1})
        assert await b.flush(10)
        await a.join("room", announce=False, lookup=True)
        assert await a.flush(10)
        ev = await asyncio.wait_for(seen_by_b.__anext__(), 10)
        assert ev.kind == "open" and ev.public_key == a.public_key and ev.inbound
        assert [(e.kind, e.public_key, e.topics, e.inbound) for e in events] == [
            ("open", b.public_key, frozenset({t}), False)
        ]
        out = await a.request(b.public_key, "who", "x", timeout=5)
        assert out == {"tag": "b", "caller": a.public_key, "echo": "x"}
        back = await b.request(a.public_key, "who", "y", timeout=5)  # over the same connection, served by a
        assert back["tag"] == "a" and len(a.peers()) == 1 and len(b.peers()) == 1
    finally:
        await _stop(a, b)


async def test_connect_by_key_alone_and_local_dispatch(net: DhtTestnet) -> None:
    a = await _swarm(net, "a")
    b = await _swarm(net, "b")
    try:
        await b.flush(10)  # b's own peer topic is announced
        assert (await a.request(b.public_key, "who", 1, timeout=5))["tag"] == "b"
        assert (await a.request(a.public_key, "who", 2, timeout=5)) == {
            "tag": "a",
            "caller": a.public_key,
            "echo": 2,
        }
        with pytest.raises(SwarmdError) as e:
            await a.request(a.public_key, "nope", None, timeout=5)
        assert e.value.code == ERR_UNKNOWN_METHOD
        with pytest.raises(SwarmdError) as e:
            await a.request(a.public_key, "slow", None, timeout=0.1)
        assert e.value.code == ERR_TIMEOUT
        p1, p2 = await asyncio.gather(a.connect(b.public_key), a.connect(b.public_key))
        assert p1 is p2  # dialled once, pooled
    finally:
        await _stop(a, b)


async def test_connections_a_node_dials_use_its_rpc_settings(net: DhtTestnet) -> None:
    # [rpc] / [rpc.net] hold for outbound connections too, not only for the ones the server accepts
    cfg = RpcConfig(net=NetConfig(busy_poll_us=0, flush_frames=7))
    a = await _swarm(net, "a", server=True, rpc_config=cfg)
    b = await _swarm(net, "b")
    try:
        await b.flush(10)
        peer = await a.connect(b.public_key)
        assert peer.conn.config is cfg.net and peer.config is cfg
        assert peer.conn._busy is None  # busy_poll_us = 0: this connection never polls
    finally:
        await _stop(a, b)


async def test_simultaneous_dials_are_deduplicated_the_same_way_on_both_sides(net: DhtTestnet) -> None:
    a = await _swarm(net, "a")
    b = await _swarm(net, "b")
    try:
        await asyncio.gather(a.flush(10), b.flush(10))
        await asyncio.gather(a.connect(b.public_key), b.connect(a.public_key))
        low_is_a = a.public_key < b.public_key
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            pa, pb = a.peers(), b.peers()
            if len(pa) == 1 and len(pb) == 1 and not pa[0][1].is_closed and not pb[0][1].is_closed:
                # both kept the connection dialled by the lower key
                if pa[0][3] == (not low_is_a) and pb[0][3] == low_is_a:
                    break
            assert asyncio.get_running_loop().time() < deadline, (pa, pb)
            await asyncio.sleep(0.02)
        assert (await a.request(b.public_key, "who", None, timeout=5))["tag"] == "b"
        assert (await b.request(a.public_key, "who", None, timeout=5))["tag"] == "a"
        assert len(a.peers()) == 1 and len(b.peers()) == 1
    finally:
        await _stop(a, b)


async def test_request_topic_fails_over_and_request_all_reports_each_peer(net: DhtTestnet) -> None:
    client = await _swarm(net, "client")
    workers = [await _swarm(net, f"w{i}") for i in range(3)]
    try:
        for w in workers:
            await w.join("workers", announce=True, lookup=False)
        assert all([await w.flush(10) for w in workers])
        tags = {(await client.request_topic("workers", "who", None, timeout=5))["tag"] for _ in range(6)}
        assert tags <= {"w0", "w1", "w2"} and tags
        dead = workers[0]
        await dead.server.stop()  # crashes: its record stays on the DHT, its port refuses
        for _ in range(6):
            assert (await client.request_topic("workers", "who", None, timeout=5))["tag"] in {"w1", "w2"}
        results = await client.request_all_topic("workers", "who", None, timeout=5)
        assert {v["tag"] for v in results.values() if not isinstance(v, SwarmdError)} == {"w1", "w2"}
        assert isinstance(results[dead.public_key], SwarmdError)
    finally:
        await _stop(client, *workers)


async def test_update_changes_payload_and_leave_withdraws(net: DhtTestnet) -> None:
    a = await _swarm(net, "a")
    b = await _swarm(net, "b")
    try:
        await a.join("load", announce=True, lookup=False, payload={"load": 0})
        await a.flush(10)
        await a.update("load", {"load": 5})
        recs = [r for r in await b.lookup_all("load", 5) if r.public_key == a.public_key]
        assert [r.payload for r in recs] == [{"load": 5}]
        await a.leave("load")
        assert [r for r in await b.lookup_all("load", 5) if r.public_key == a.public_key] == []
    finally:
        await _stop(a, b)


async def test_firewall_and_max_peers_refuse_inbound(net: DhtTestnet) -> None:
    async def deny(pk: bytes) -> bool:
        return False

    guarded = await _swarm(net, "g", firewall=deny)
    full = await _swarm(net, "f", max_peers=0)
    a = await _swarm(net, "a")
    try:
        await asyncio.gather(guarded.flush(10), full.flush(10))
        for target in (guarded, full):
            peer = await a.connect(target.public_key)
            await asyncio.wait_for(peer.wait_closed(), 10)
            assert target.peers() == []
    finally:
        await _stop(guarded, full, a)


@pytest.mark.parametrize("verdict", [True, False])
async def test_async_firewall_answers_before_any_call_is_dispatched(net: DhtTestnet, verdict: bool) -> None:
    from swarmd.rpc import connect

    asked = asyncio.Event()
    answer = asyncio.Event()
    ran: list[Any] = []

    async def firewall(pk: bytes) -> bool:
        asked.set()
        await answer.wait()
        return verdict

    guarded = await _swarm(net, "g", firewall=firewall)

    async def record(ctx: CallContext, params: Any) -> Any:
        ran.append(params)
        return "ran"

    async def count(ctx: CallContext, params: Any, stream: Any) -> int:
        ran.append("stream")
        total = 0
        while (chunk := await stream.recv()) is not None:
            total += len(chunk)
        return total

    guarded.methods.register("record", record, op="w")
    guarded.methods.register_stream("count", count, op="w")
    try:
        peer = await connect(None, "127.0.0.1", guarded.server.port, remote_public_key=guarded.public_key, timeout=10)
        try:
            calls = [asyncio.ensure_future(peer.call("record", i, timeout=20)) for i in range(3)]
            stream = await peer.open_stream("count", None, timeout=20)
            await stream.send(b"x" * 100_000)  # bytes of a stream call sent before admission are kept
            await stream.close()
            await asyncio.wait_for(asked.wait(), 10)
            await asyncio.sleep(0.2)  # the calls reached the node while its firewall thinks
            assert ran == [], "a call was dispatched before the firewall answered"
            answer.set()
            if verdict:
                assert await asyncio.gather(*calls) == ["ran"] * 3
                assert await stream.result() == 100_000
                assert [r for r in ran if r != "stream"] == [0, 1, 2] and "stream" in ran  # in the order sent
            else:
                await asyncio.wait_for(peer.wait_closed(), 10)
                results = await asyncio.gather(*calls, stream.result(), return_exceptions=True)
                assert all(isinstance(r, SwarmdError) for r in results)
                assert ran == []
        finally:
            await peer.close()
    finally:
        await _stop(guarded)


async def test_dropped_connection_is_reconnected(net: DhtTestnet) -> None:
    a = await _swarm(net, "a")
    b = await _swarm(net, "b")
    try:
        await b.join("r", announce=True, lookup=False)
        await b.flush(10)
        await a.join("r", announce=False, lookup=True)
        await a.flush(10)
        events = a.connections()
        (pk, peer, _topics, _inbound) = a.peers()[0]
        await peer.close()
        kinds = [(await asyncio.wait_for(events.__anext__(), 10)).kind for _ in range(2)]
        assert kinds == ["close", "open"]
        assert (await a.request(b.public_key, "who", None, timeout=5))["tag"] == "b"
    finally:
        await _stop(a, b)


async def test_private_swarm_topics_are_invisible_without_the_secret(net: DhtTestnet) -> None:
    a = await _swarm(net, "a", secret=b"k1")
    b = await _swarm(net, "b", secret=b"k1")
    outsider = await _swarm(net, "o")
    try:
        await a.join("models", announce=True, lookup=False)
        await a.flush(10)
        assert [r.public_key for r in await b.lookup_all("models", 5)] == [a.public_key]
        assert await outsider.lookup_all("models", 5) == []
    finally:
        await _stop(a, b, outsider)


async def test_reannounce_keeps_a_short_lived_record_alive_until_the_announcer_dies(net: DhtTestnet) -> None:
    # ttl 2 s, not 1: one re-announce cycle (0.3 s + the puts, bounded by request_timeout) stretches on
    # a loaded machine, and the record must not lapse between two of them while b looks
    a = await _swarm(net, "a", record_ttl=2.0, reannounce_interval=0.3, reannounce_jitter=0.05)
    b = await _swarm(net, "b")
    try:
        t = await a.join("ttl", announce=True, lookup=False)
        await a.flush(10)
        loop = asyncio.get_running_loop()
        first_seq = a._topics[t].seq
        deadline = loop.time() + 15
        while a._topics[t].seq < first_seq + 7:  # seven re-announces: past the 2 s TTL
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        recs = [r for r in await b.lookup_all(t, 5) if r.public_key == a.public_key]
        assert recs and recs[0].seq > first_seq
        await a.dht.stop()  # the announcer dies without a word
        while [r for r in await b.lookup_all(t, 5) if r.public_key == a.public_key]:
            assert loop.time() < deadline + 15, "record outlived its announcer"
            await asyncio.sleep(0.1)
    finally:
        await _stop(b)
        with contextlib.suppress(Exception):
            await a.stop()
