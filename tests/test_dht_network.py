"""Real UDP testnets on 127.0.0.1: lookups at 200 nodes, churn, expiry,
unannounce, client mode, and hostile peers."""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import aclosing

import msgpack
import pytest
from loguru import logger

from swarmd.dht.records import make_record, topic_from_name
from swarmd.node.identity import Identity
from tests.dht_testnet import DhtTestnet, record_for
from tests.test_dht_defects import HostileResponder, _is_alive


@pytest.mark.slow
async def test_200_nodes_100_lookups_find_the_announcer_even_with_30_percent_killed() -> None:
    # one event loop serves all 200 nodes: on a loaded machine replies can queue
    # for long, so give requests time (a timeout evicts the contact)
    async with await DhtTestnet.create(200, request_timeout=1.0) as net:
        rng = random.Random(1)
        announcer = Identity.generate()
        topic = topic_from_name("swarmd/workers/mnist")
        res = await net.nodes[17].announce(record_for(announcer, topic, port=5555, state="ONLINE"))
        assert res.ok and res.stored >= 10
        askers = rng.sample(net.nodes, 100)
        results = []
        for i in range(0, 100, 10):  # 10 concurrent lookups at a time (one loop serves all: more only queue)
            results += await asyncio.gather(*(n.lookup_all(topic, 30) for n in askers[i : i + 10]))
        for recs in results:
            assert [(r.public_key, r.addresses, r.payload) for r in recs] == [
                (announcer.public_key, (("127.0.0.1", 5555),), {"state": "ONLINE"})
            ]
        # churn: 30% of the nodes die without a word
        victims = rng.sample(net.nodes[1:], 60)
        await asyncio.gather(*(v.stop() for v in victims))
        alive = [n for n in net.nodes if n not in victims]
        askers = rng.sample(alive, 50)
        results = []
        for i in range(0, 50, 10):
            results += await asyncio.gather(*(n.lookup_all(topic, 30) for n in askers[i : i + 10]))
        assert all(any(r.public_key == announcer.public_key for r in recs) for recs in results)


async def test_lookup_streams_many_announcers_of_one_topic() -> None:
    async with await DhtTestnet.create(30) as net:
        topic = topic_from_name("many")
        idents = [Identity.generate() for _ in range(12)]
        await asyncio.gather(
            *(
                net.nodes[i].announce(record_for(ident, topic, port=6000 + i))
                for i, ident in enumerate(idents)
            )
        )
        got = []
        async with aclosing(net.nodes[-1].lookup(topic)) as it:
            async for rec in it:
                got.append(rec.public_key)
        assert sorted(got) == sorted(i.public_key for i in idents)
        assert len(got) == len(set(got))


async def test_records_expire_when_the_announcer_stops() -> None:
    async with await DhtTestnet.create(12) as net:
        topic = topic_from_name("short-lived")
        ident = Identity.generate()
        assert (await net.nodes[3].announce(record_for(ident, topic, ttl=1.0))).ok
        assert len(await net.nodes[7].lookup_all(topic, 5)) == 1
        deadline = time.monotonic() + 15
        while await net.nodes[7].lookup_all(topic, 5):
            assert time.monotonic() < deadline, "record outlived its expiry"
            await asyncio.sleep(0.2)
        assert all(
            len(n.protocol.records) == 0 or n.protocol.records.expire(time.time()) >= 0 for n in net.nodes
        )


async def test_newer_seq_replaces_and_unannounce_removes() -> None:
    async with await DhtTestnet.create(12) as net:
        topic = topic_from_name("update")
        ident = Identity.generate()
        await net.nodes[2].announce(record_for(ident, topic, seq=1, load=1))
        await net.nodes[2].announce(record_for(ident, topic, seq=2, load=7))
        recs = await net.nodes[9].lookup_all(topic, 5)
        assert [(r.seq, r.payload) for r in recs] == [(2, {"load": 7})]
        from swarmd.dht.records import Unannounce

        removed = await net.nodes[2].unannounce(Unannounce.make(ident, topic, 2))
        assert removed >= 5
        assert await net.nodes[9].lookup_all(topic, 5) == []


async def test_client_mode_node_looks_up_and_announces_but_holds_nothing() -> None:
    async with await DhtTestnet.create(8) as net:
        client = await net.add(mode="client")
        assert client.mode == "client"
        assert all(client.node_id not in {c[0] for c in n.contacts()} for n in net.nodes[:-1])
        topic = topic_from_name("from-client")
        ident = Identity.generate()
        res = await client.announce(record_for(ident, topic))
        assert res.ok and len(client.protocol.records) == 0
        assert len(await net.nodes[0].lookup_all(topic, 5)) == 1
        assert len(await client.lookup_all(topic, 5)) == 1


async def test_forged_expired_and_oversized_records_are_refused_by_storing_nodes() -> None:
    async with await DhtTestnet.create(4) as net:
        a, b = net.nodes[0], net.nodes[1]
        topic = topic_from_name("attacked")
        ok, reply = await a.protocol.request(b.address, "topic_get", b"", topic)
        token = reply["tk"]
        good = record_for(Identity.generate(), topic).to_wire()
        forged = dict(good, a=[["10.9.9.9", 1]])
        expired = make_record(Identity.generate(), topic, [], None, 1, 1.0, time.time() - 10).to_wire()
        huge = dict(good, p=msgpack.packb({"x": b"y" * 5000}))
        for bad, code in ((forged, "ERR_FORBIDDEN"), (expired, "ERR_BAD_REQUEST"), (huge, "ERR_TOO_LARGE")):
            ok, reply = await a.protocol.request(b.address, "topic_put", b"", token, bad)
            assert ok and reply["ok"] is False and reply["code"] == code
        ok, reply = await a.protocol.request(b.address, "topic_put", b"", b"\x00" * 16, good)
        assert reply["code"] == "ERR_FORBIDDEN"  # token of nobody
        ok, reply = await a.protocol.request(b.address, "topic_put", b"", token, good)
        assert reply == {"ok": True}
        assert len(b.protocol.records) == 1


async def test_hostile_find_node_replies_do_not_break_lookups() -> None:
    loop = asyncio.get_running_loop()
    junk = [[b"\x01" * 20, "127.0.0.1", "port"], 5, None, [None, None, None], "x" * 100] + [
        [b"", "", 0]
    ] * 10_000
    evil_t, _ = await loop.create_datagram_endpoint(
        lambda: HostileResponder(junk), local_addr=("127.0.0.1", 0)
    )
    net = await DhtTestnet.create(10)
    try:
        victim = net.nodes[5]
        await victim.bootstrap([evil_t.get_extra_info("sockname")[:2]])
        topic = topic_from_name("still works")
        ident = Identity.generate()
        await net.nodes[2].announce(record_for(ident, topic))
        assert len(await victim.lookup_all(topic, 30)) == 1  # a bound, not a wait: a loaded machine may need more than 5 s
        assert await _is_alive(victim.address)
        assert all(len(c[0]) == 20 and isinstance(c[2], int) for c in victim.contacts())
    finally:
        await net.close()
        evil_t.close()


async def test_flood_from_one_address_is_dropped_and_others_are_still_served() -> None:
    net = await DhtTestnet.create(2, per_source_rate=50.0, per_source_burst=50.0)
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING")
    loop = asyncio.get_running_loop()
    try:
        target = net.nodes[0]
        flood, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=target.address)
        for i in range(2000):
            flood.sendto(b"\x00" + i.to_bytes(20, "big") + msgpack.packb(["ping", [b""]]))
            if i % 20 == 0:
                await asyncio.sleep(0)  # pace so the kernel buffer, not our code, is what we test
        flood.sendto(b"\x00" * 61_000)  # oversized
        flood.sendto(b"garbage that is not rpc")
        assert await _is_alive(target.address)
        assert await net.nodes[1].ping(target.address) == target.node_id
        assert target.protocol.rlog.counts.get("flood", 0) > 1000
        assert len(lines) <= 10
        assert len(target.protocol.limiter) <= target.config.max_sources_tracked
        flood.close()
    finally:
        logger.remove(sink)
        await net.close()


async def test_records_are_handed_off_to_a_node_that_joins_closer() -> None:
    async with await DhtTestnet.create(1) as net:
        topic = topic_from_name("hand-off")
        ident = Identity.generate()
        res = await net.nodes[0].announce(record_for(ident, topic))
        assert res.stored == 1 and len(net.nodes[0].protocol.records) == 1  # alone: kept locally
        newcomer = await net.add()
        deadline = time.monotonic() + 10
        while not newcomer.protocol.records.get(topic, time.time()):
            assert time.monotonic() < deadline, "record never handed off"
            await asyncio.sleep(0.02)
        assert newcomer.protocol.records.get(topic, time.time())[0].public_key == ident.public_key


async def test_stop_with_requests_outstanding_resolves_them_as_failed() -> None:
    net = await DhtTestnet.create(1)
    node = net.nodes[0]
    pending = node.protocol.request(("127.0.0.1", 9), "ping", b"")  # nobody answers there
    await net.close()
    assert pending.done() and pending.result() == (False, None)


async def test_large_topics_need_a_token_round_trip_so_spoofed_requests_reflect_little() -> None:
    async with await DhtTestnet.create(3) as net:
        topic = topic_from_name("big")
        idents = [Identity.generate() for _ in range(30)]
        for ident in idents:
            await net.nodes[0].announce(record_for(ident, topic, pad=b"x" * 200))
        holder = net.nodes[1]
        ok, reply = await net.nodes[2].protocol.request(holder.address, "topic_get", b"", topic)
        assert ok and reply["more"] is True
        assert len(msgpack.packb(reply)) < 3000  # a 60-byte request gets a bounded reply
        ok, full = await net.nodes[2].protocol.request(holder.address, "topic_get", b"", topic, reply["tk"])
        assert "more" not in full and len(full["r"]) == 30
        # a lookup follows up with the token by itself and finds every announcer
        client = await net.add(mode="client")  # holds nothing locally
        assert len(await client.lookup_all(topic, 5)) == 30


async def test_reannounce_reuses_holders_and_recrawls_when_they_are_gone() -> None:
    async with await DhtTestnet.create(12) as net:
        topic = topic_from_name("live-load")
        ident = Identity.generate()
        announcer = net.nodes[4]
        first = await announcer.announce(record_for(ident, topic, seq=1, load=1))
        holders = announcer._holders[topic][1]
        again = await announcer.announce(record_for(ident, topic, seq=2, load=2))
        assert again.stored == first.stored and announcer._holders[topic][1] is holders  # no new crawl
        # the holders die: the next announce notices and crawls for live ones
        dead = {n.id for n, _ in holders}
        for node in net.nodes:
            if node.node_id in dead and node is not announcer and node is not net.nodes[0]:
                await node.stop()
        third = await announcer.announce(record_for(ident, topic, seq=3, load=3))
        assert third.ok
        client = await net.add(mode="client")
        assert [r.payload for r in await client.lookup_all(topic, 5)] == [{"load": 3}]


async def test_one_ip_rotating_source_ports_is_limited_per_ip() -> None:
    async with await DhtTestnet.create(1, per_ip_rate=10.0, per_ip_burst=10.0) as net:
        proto = net.nodes[0].protocol
        for port in range(1000, 1100):  # garbage gets no reply: nothing is sent anywhere
            proto.datagram_received(b"not rpc", ("198.18.0.7", port))
        assert proto.rlog.counts.get("flood_ip", 0) >= 85
        assert proto.rlog.counts.get("garbage", 0) <= 15
        for port in range(1000, 1100):  # loopback is exempt (many local nodes share it)
            proto.datagram_received(b"not rpc", ("127.0.0.1", port))
        assert proto.rlog.counts.get("flood_ip", 0) < 100
