"""Traversal on loopback: a peer whose addresses do not answer is reached through
its signal peer and a relay, with Noise end to end; floods of requests are limited."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from swarmd import topics
from swarmd.errors import ERR_RATE_LIMITED, SwarmdError
from swarmd.net.nat import NatConfig
from swarmd.net.relay import RelayConfig
from swarmd.net.relayio import new_token
from swarmd.net.relayserver import RelayServer
from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, Methods, RpcServer, connect
from swarmd.swarm import Swarm, SwarmConfig
from swarmd.swarm.paths import path_of
from swarmd.swarm.traversal import Traversal
from tests.dht_testnet import DhtTestnet


def _methods(tag: str) -> Methods:
    m = Methods()

    async def who(ctx: CallContext, params: Any) -> Any:
        return {"tag": tag, "echo": params}

    async def slow(ctx: CallContext, params: Any) -> Any:
        await asyncio.sleep(params)
        return "slept"

    m.register("who", who)
    m.register("slow", slow)
    return m


async def _node(net: DhtTestnet, tag: str, nat: NatConfig, firewall: Any = None, **swarm_kw: Any) -> Swarm:
    ident = Identity.generate()
    dht = await net.add(ident)
    rpc = RpcServer(ident, _methods(tag), "127.0.0.1", 0)
    await rpc.start()
    cfg = dataclasses.replace(SwarmConfig(connect_timeout=3.0, lookup_timeout=3.0), **swarm_kw)
    sw = Swarm(ident, dht, rpc, cfg, firewall=firewall)
    await sw.start()
    await Traversal(sw, nat).start()
    return sw


async def _wait(cond, what: str, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def world():
    net = await DhtTestnet.create(4)
    swarms: list[Swarm] = []
    relay = RelayServer(RelayConfig(), "127.0.0.1")
    await relay.start()
    quick = dict(redetect_interval=3600.0, stun_timeout=1.0, punch_timeout=3.0, relay_timeout=10.0)
    r = await _node(net, "relay", NatConfig(assume="public", **quick))
    await r.join(topics.RELAYS, announce=True, lookup=False, payload={"relay_port": relay.port})
    assert await r.flush(10)
    # a NATed target: what it advertises does not answer (port 9 refuses), it is "symmetric"
    t = await _node(net, "target", NatConfig(assume="symmetric", **quick), announce_addresses=[("127.0.0.1", 9)])
    c = await _node(net, "caller", NatConfig(assume="symmetric", **quick))
    swarms += [r, t, c]
    yield r, t, c, relay
    for s in swarms:
        if s.traversal is not None:
            await s.traversal.stop()
        await s.stop()
        await s.server.stop()
    await relay.stop()
    await net.close()


async def test_unreachable_peer_is_reached_through_a_relay(world) -> None:
    r, t, c, relay = world
    await _wait(lambda: t.traversal.signal_peers == [r.public_key], "the target to pick its signal peer")
    assert t.traversal.status()["nat"]["type"] in ("public", "unknown", "cone")  # detected (loopback); assume wins
    res = await c.request(t.public_key, "who", {"x": 1}, timeout=30)
    assert res == {"tag": "target", "echo": {"x": 1}}
    [(pk, peer, _, inbound)] = [p for p in c.peers() if p[0] == t.public_key]
    assert path_of(peer) == "relayed" and not inbound
    info = c.traversal.paths[t.public_key].to_dict()
    assert info["path"] == "relayed"
    assert [a["path"] for a in info["attempts"]] == ["direct", "relayed"]
    assert info["attempts"][0]["ok"] is False
    # the target sees the same connection, inbound and relayed, authenticated as the caller
    await _wait(lambda: t.public_key in c.traversal.paths and c.public_key in t.traversal.paths, "target side")
    assert t.traversal.paths[c.public_key].path == "relayed"
    assert (await t.request(c.public_key, "who", 2, timeout=30))["tag"] == "caller"
    assert relay.stats()["paired_total"] == 1
    assert c.status()["nat"]["paths"][t.public_key.hex()]["path"] == "relayed"


async def test_signalling_flood_is_rate_limited_per_source(world) -> None:
    r, t, c, _relay = world
    await _wait(lambda: t.traversal.signal_peers == [r.public_key], "the target to pick its signal peer")
    peer = await c.connect(r.public_key)
    req = {"target": t.public_key, "kind": "relay", "relay": ["127.0.0.1", 1], "token": new_token()}
    codes: list[str] = []
    for _ in range(40):
        try:
            await peer.call("nat.signal", req, timeout=10)
            codes.append("ok")
        except SwarmdError as e:
            codes.append(e.code)
    assert codes.count("ok") <= NatConfig().signal_burst + 2
    assert codes.count(ERR_RATE_LIMITED) >= 40 - NatConfig().signal_burst - 2
    assert r.traversal.limiter.refused > 0
    # another caller is still served
    other = await t.connect(r.public_key)
    assert await other.call("nat.status", None, timeout=10)


async def test_a_better_path_takes_new_calls_while_calls_in_flight_finish_on_the_old(world) -> None:
    r, t, c, relay = world
    await _wait(lambda: t.traversal.signal_peers == [r.public_key], "the target to pick its signal peer")
    assert (await c.request(t.public_key, "who", 1, timeout=30))["tag"] == "target"
    relayed = c._registry.get(t.public_key)
    assert path_of(relayed) == "relayed"
    await _wait(lambda: path_of(t._registry.get(c.public_key) or relayed) == "relayed", "target side relayed")
    in_flight = asyncio.ensure_future(relayed.call("slow", 1.0, timeout=30))  # no retry: must not fail
    await _wait(lambda: bool(relayed._pending), "the slow call to be sent")
    # a better path to the same peer appears (as a punch would give): a direct connection
    better = await connect(c.identity, "127.0.0.1", t.server.port, remote_public_key=t.public_key,
                           methods=c.methods, timeout=10)
    assert c._register(better, inbound=False) is better
    assert c._registry.get(t.public_key) is better  # new calls take it at once
    assert (await c.request(t.public_key, "who", 2, timeout=30))["tag"] == "target"
    assert not relayed.is_closed  # the slow call is still running there
    assert await in_flight == "slept"  # and finishes where it started
    await _wait(lambda: relayed.is_closed, "the replaced connection to close", 30)
    await _wait(lambda: path_of(t._registry.get(c.public_key) or relayed) == "direct", "target side moved")
    assert c.path_metrics.opened["relayed"] == 1 and c.path_metrics.opened["direct"] >= 2  # the relay peer too
    assert c.status()["nat"]["metrics"]["relay_bytes_in"] > 0
    assert t.path_metrics.opened["relayed"] == 1 and t.path_metrics.opened["direct"] >= 1


def test_swarmd_status_shows_the_nat_report(daemons, tmp_path) -> None:
    from tests.conftest import run_cli

    d = daemons("--data-dir", str(tmp_path / "n"), "--host", "127.0.0.1")
    d.wait_event("nat_detected", 60)
    res = run_cli("status", "--data-dir", str(tmp_path / "n"), "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["nat"]["type"] in ("unknown", "public", "udp_blocked")  # a lone node has nobody to ask
    assert set(st["paths"]["opened"]) == {"direct", "punched-tcp", "punched-udp", "mapped", "relayed"}
    res = run_cli("status", "--data-dir", str(tmp_path / "n"))
    assert res.returncode == 0 and "nat " in res.stdout
    assert d.stop() == 0


@pytest.mark.parametrize("verdict", [True, False])
async def test_async_firewall_answers_before_a_relayed_call_is_dispatched(verdict: bool) -> None:
    """A connection that reached us through a relay (or a punch) passes the same firewall
    gate as a direct one: its calls wait for the verdict, and a denied peer runs nothing."""
    net = await DhtTestnet.create(4)
    relay = RelayServer(RelayConfig(), "127.0.0.1")
    await relay.start()
    asked, answer = asyncio.Event(), asyncio.Event()
    ran: list[Any] = []

    async def firewall(pk: bytes) -> bool:
        asked.set()
        await answer.wait()
        return verdict

    quick = dict(redetect_interval=3600.0, stun_timeout=1.0, punch_timeout=3.0, relay_timeout=10.0)
    swarms = [await _node(net, "relay", NatConfig(assume="public", **quick))]
    try:
        r = swarms[0]
        await r.join(topics.RELAYS, announce=True, lookup=False, payload={"relay_port": relay.port})
        assert await r.flush(10)
        t = await _node(net, "target", NatConfig(assume="symmetric", **quick),
                        announce_addresses=[("127.0.0.1", 9)], firewall=firewall)
        swarms.append(t)
        c = await _node(net, "caller", NatConfig(assume="symmetric", **quick))
        swarms.append(c)

        async def record(ctx: CallContext, params: Any) -> Any:
            ran.append(params)
            return "ran"

        t.methods.register("record", record, op="w")
        await _wait(lambda: t.traversal.signal_peers == [r.public_key], "the target to pick its signal peer")
        call = asyncio.ensure_future(c.request(t.public_key, "record", 1, timeout=30))
        await asyncio.wait_for(asked.wait(), 30)
        await _wait(lambda: c._registry.get(t.public_key) is not None, "the caller's relayed connection")
        assert path_of(c._registry.get(t.public_key)) == "relayed"
        await asyncio.sleep(0.2)  # the call reaches the target while its firewall thinks
        assert ran == [], "a relayed call was dispatched before the firewall answered"
        answer.set()
        if verdict:
            assert await call == "ran"
            assert ran == [1]
        else:
            with pytest.raises(SwarmdError):
                await call
            assert ran == []
            assert c.public_key not in t.traversal.paths
    finally:
        answer.set()
        for s in reversed(swarms):
            if s.traversal is not None:
                await s.traversal.stop()
            await s.stop()
            await s.server.stop()
        await relay.stop()
        await net.close()


def test_from_outside_tells_the_forwarded_from_the_lan() -> None:
    """An accepted connection counts as `mapped` only from outside our own /24 (or /64)."""
    from swarmd.swarm.paths import from_outside

    assert from_outside(("198.18.0.11", 4000), ("198.19.2.2", 7000))  # through nat-b's forward
    assert not from_outside(("198.19.2.7", 4000), ("198.19.2.2", 7000))  # a LAN neighbour
    assert not from_outside(("127.0.0.1", 4000), ("127.0.0.1", 7000))
    assert from_outside(("2001:db8:1::5", 1, 0, 0), ("2001:db8:2::1", 2, 0, 0))
    assert not from_outside(("10.0.0.1", 1), ("2001:db8::1", 2, 0, 0))
    for bad in (None, (), ("not an ip", 1)):
        assert not from_outside(bad, ("10.0.0.1", 1)) and not from_outside(("10.0.0.1", 1), bad)
