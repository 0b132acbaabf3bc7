"""The trust model (swarmd.node.trust): no key outside the swarm's trust gets traffic, data or a say.

Real DHT nodes, swarms, Noise/TCP RPC and daemons on loopback; the hostile
peers (tests/hostile_peer.py) are built from swarmd's own classes, each with
its own key, and forge no signature.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from orchestrator_peers import Orchestrator, PeerWorker, expected

from swarmd.errors import ERR_FORBIDDEN, ERR_UNAVAILABLE, ConfigError, SwarmdError
from swarmd.node.identity import Identity
from swarmd.node.trust import Grant, GrantError, Trust, TrustConfig
from swarmd.rpc import Firewall, Methods, RpcServer
from swarmd.rpc.config import AccessConfig
from swarmd.rpc.part import firewall_from
from swarmd.swarm import Swarm
from swarmd.topics import STORES, WORKERS, model_topic, topic_role, worker_model_topic
from swarmd.worker.cache import ModelCache
from swarmd.worker.config import WorkerConfig
from swarmd.worker.fetch import ModelFetcher
from tests.conftest import run_cli, swarmd_env
from tests.dht_testnet import DhtTestnet
from tests.hostile_peer import HostilePeer, swarm_cfg

T = 20.0
HOUR = 3600.0


@pytest.fixture
async def net() -> AsyncIterator[DhtTestnet]:
    n = await DhtTestnet.create(6)
    yield n
    await n.close()


def grant(op: Identity, roles: str, who: Identity, *, ttl: float = HOUR, age: float = 0.0) -> Grant:
    now = time.time() - age
    return Grant.issue(op, roles, who.public_key, issued=now, expires=now + ttl)


def member(op: Identity, ident: Identity, roles: str = "") -> Trust:
    """A member's trust: the operator's key, and its own grant when it has roles."""
    return Trust(
        [op.public_key], own_key=ident.public_key, own_grants=[grant(op, roles, ident)] if roles else []
    )


def hostiles(op: Identity) -> list[HostilePeer]:
    """No grant; an operator's grant that expired; a grant signed by itself; a copy of
    another node's valid grant (records and hellos are public, so anyone can copy one)."""
    a, b, c, d = Identity.generate(), Identity.generate(), Identity.generate(), Identity.generate()
    return [
        HostilePeer(a),
        HostilePeer(b, [grant(op, "worker,store", b, ttl=60, age=HOUR)]),
        HostilePeer(c, [grant(c, "worker,store", c)]),
        HostilePeer(d, [grant(op, "worker,store", Identity.generate())]),
    ]


WORKER_PAYLOAD = {
    "state": "ONLINE",
    "models": ["mlp"],
    "weight": 1e6,
    "load": {"queue": 0, "in_flight": 0, "ewma_ms": 0.01, "rps": 0},
}


async def eventually(cond: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.05)


# -- the grant itself (sans-IO) -----------------------------------------------------


def test_a_grant_admits_only_its_roles_its_key_and_its_time() -> None:
    op, node, other = Identity.generate(), Identity.generate(), Identity.generate()
    g = grant(op, "store,worker", node)
    assert Grant.from_text(g.to_text()) == g and g.roles == ("store", "worker")
    trust = Trust([op.public_key])
    assert trust.roles_of(node.public_key, [g.encode()]) == {"store", "worker"}
    assert not trust.admits(node.public_key, "relay", [g.encode()])
    assert not trust.admits(other.public_key, "worker", [g.encode()])  # someone else's grant
    expired = grant(op, "worker", node, ttl=60, age=HOUR)
    with pytest.raises(GrantError, match="expired"):
        expired.check([op.public_key])
    assert not trust.admits(node.public_key, "worker", [expired.encode()])
    self_signed = grant(node, "worker", node)
    with pytest.raises(GrantError, match="not an operator"):
        self_signed.check([op.public_key])
    assert not trust.admits(node.public_key, "worker", [self_signed.encode()])
    # a grant whose roles were widened after signing no longer verifies
    widened = Grant(("relay", "worker"), g.subject, g.issuer, g.issued, g.expires, g.signature)
    with pytest.raises(GrantError, match="signature"):
        widened.check([op.public_key])
    assert not trust.admits(node.public_key, "relay", [widened.encode()])
    # a grant is valid until its expiry second, not after
    late = Trust([op.public_key], clock=lambda: g.expires)
    assert not late.admits(node.public_key, "worker", [g.encode()])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decoding_any_bytes_gives_a_grant_or_a_worded_error(data: bytes) -> None:
    try:
        g = Grant.decode(data)
    except GrantError as e:
        assert str(e)
    else:
        assert g.encode() == data or Grant.decode(g.encode()) == g
    assert Trust([Identity.generate().public_key]).roles_of(b"k" * 32, [data, data]) == frozenset()


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=159), st.integers(min_value=1, max_value=255))
def test_no_flipped_byte_of_a_grant_admits(pos: int, flip: int) -> None:
    op, node = Identity.from_seed(b"o" * 32), Identity.from_seed(b"n" * 32)
    data = bytearray(Grant.issue(op, "worker", node.public_key, issued=1e9, expires=4e9).encode())
    data[pos % len(data)] ^= flip
    trust = Trust([op.public_key], clock=lambda: 2e9)
    assert not trust.admits(node.public_key, "worker", [bytes(data)])


def test_topics_of_roles_name_the_role_their_announcers_need() -> None:
    assert topic_role(WORKERS) == topic_role(worker_model_topic("m")) == "worker"
    assert (
        topic_role(STORES) == topic_role(model_topic("m")) == topic_role("swarmd/blob/" + "a" * 64) == "store"
    )
    assert topic_role("swarmd/peer/ab") is None and topic_role("my-topic") is None


def test_config_asks_for_a_trust_model_explicitly() -> None:
    key = Identity.generate()
    with pytest.raises(ConfigError, match="open = true"):
        Trust.from_config(TrustConfig(), key.public_key, ["worker"])
    assert Trust.from_config(TrustConfig(), key.public_key, ["bootstrap"]).is_open  # no role to admit
    assert Trust.from_config(TrustConfig(open=True), key.public_key, ["worker"]).is_open
    op = Identity.generate()
    with pytest.raises(ConfigError, match="swarmd grant worker"):
        Trust.from_config(TrustConfig(operators=[op.public_hex]), key.public_key, ["worker"])
    ok = TrustConfig(operators=[op.public_hex], grants=[grant(op, "worker", key).to_text()])
    assert Trust.from_config(ok, key.public_key, ["worker"]).presented()
    expired = TrustConfig(
        operators=[op.public_hex], grants=[grant(op, "worker", key, ttl=60, age=HOUR).to_text()]
    )
    with pytest.raises(ConfigError, match="expired"):
        Trust.from_config(expired, key.public_key, ["worker"])
    theirs = TrustConfig(operators=[op.public_hex], grants=[grant(op, "worker", op).to_text()])
    with pytest.raises(ConfigError, match="not this node's"):
        Trust.from_config(theirs, key.public_key, ["worker"])


# -- discovery: what a node calls out to ------------------------------------------------


async def _swarm_worker(net: DhtTestnet, trust_of: Any) -> tuple[PeerWorker, Swarm]:
    w = await PeerWorker().start()
    sw = Swarm(w.identity, await net.add(w.identity), w.server, swarm_cfg(), trust=trust_of(w.identity))
    await sw.start()
    payload = {
        "state": "ONLINE",
        "models": ["mlp"],
        "load": {"queue": 0, "in_flight": 0, "ewma_ms": 1.0, "rps": 0},
    }
    for topic in (WORKERS, worker_model_topic("mlp")):
        await sw.join(topic, announce=True, lookup=False, payload=payload)
    assert await sw.flush(T)
    return w, sw


async def _orchestrator(net: DhtTestnet, tmp: Path, trust_of: Any) -> Orchestrator:
    ident = Identity.generate()
    trust = trust_of(ident)
    server = RpcServer(ident, Methods(), firewall=firewall_from(AccessConfig(), ident.public_key, trust))
    await server.start()
    sw = Swarm(ident, await net.add(ident), server, swarm_cfg(), trust=trust)
    await sw.start()
    o = Orchestrator(
        tmp,
        swarm=sw,
        seed=1,
        dht_refresh=0.1,
        dht_lease_ttl=3.0,
        health_interval=0.1,
        health_timeout=2.0,
        policy="round_robin",
    )
    o.ctx.trust = trust
    return await o.start()


async def _stop_all(
    o: Orchestrator | None, workers: list[tuple[PeerWorker, Swarm]], rogues: list[HostilePeer]
) -> None:
    if o is not None:
        await o.stop()
        await o.ctx.swarm.stop()
        await o.ctx.swarm.server.stop()
    for w, sw in workers:
        await sw.stop()
        await w.stop()
    for r in rogues:
        await r.stop()


async def test_unadmitted_workers_with_a_huge_weight_get_no_requests(net: DhtTestnet, tmp_path: Path) -> None:
    op = Identity.generate()
    rogues = hostiles(op)
    o = None
    workers: list[tuple[PeerWorker, Swarm]] = []
    try:
        for r in rogues:
            await r.start(net)
            await r.announce(WORKERS, WORKER_PAYLOAD)
            await r.announce(worker_model_topic("mlp"), WORKER_PAYLOAD)
        workers.append(await _swarm_worker(net, lambda i: member(op, i, "worker")))
        good = workers[0][0]
        o = await _orchestrator(net, tmp_path, lambda i: member(op, i))
        # the rogues' records are on the DHT for anyone to read: only trust keeps them out
        raw = await o.ctx.swarm.dht.lookup_all(o.ctx.swarm.topic(WORKERS), timeout=T)
        assert {r.public_key for r in rogues} | {good.identity.public_key} <= {rec.public_key for rec in raw}

        async def sees_good() -> bool:
            status = await o.call("getServiceStatus", {})
            return [w["public_key"] for w in status["workers"]] == [good.public_hex]

        await eventually(sees_good)
        for i in range(20):
            x = np.full((1, 4), float(i), dtype=np.float32)
            out = await o.call("routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}})
            np.testing.assert_allclose(out["outputs"]["y"], expected(x))
            assert out["worker"] == good.public_hex
        await asyncio.sleep(0.5)  # a few more lookup and health rounds
        assert await sees_good()
        assert good.served == 20
        assert sum(sum(r.calls.values()) for r in rogues) == 0, [dict(r.calls) for r in rogues]
    finally:
        await _stop_all(o, workers, rogues)


async def test_an_open_swarm_admits_every_announcer_but_not_its_self_declared_weight(
    net: DhtTestnet, tmp_path: Path
) -> None:
    rogue = HostilePeer()
    o = None
    workers: list[tuple[PeerWorker, Swarm]] = []
    try:
        await rogue.start(net)
        await rogue.announce(WORKERS, WORKER_PAYLOAD)
        workers.append(await _swarm_worker(net, Trust.open_swarm))
        o = await _orchestrator(net, tmp_path, Trust.open_swarm)

        async def sees_both() -> bool:
            return len((await o.call("getServiceStatus", {}))["workers"]) == 2

        await eventually(sees_both)
        status = await o.call("getServiceStatus", {})
        assert {w["public_key"]: w["weight"] for w in status["workers"]} == {
            rogue.identity.public_hex: 1.0,
            workers[0][0].public_hex: 1.0,
        }
        for i in range(10):
            x = np.full((1, 4), float(i), dtype=np.float32)
            try:
                await o.call("routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}})
            except SwarmdError:
                pass  # the rogue's answer has no outputs; what matters is that it was asked
        assert rogue.calls["runInference"] > 0  # open means open: this is what operators close
    finally:
        await _stop_all(o, workers, [rogue])


async def test_workers_never_fetch_from_an_unadmitted_store(net: DhtTestnet, tmp_path: Path) -> None:
    op = Identity.generate()
    rogues = hostiles(op)
    ident = Identity.generate()
    server = RpcServer(ident, Methods())
    await server.start()
    closed = Swarm(ident, await net.add(ident), server, swarm_cfg(), trust=member(op, ident, "worker"))
    opened = Swarm(
        ident, await net.add(ident), Methods(), swarm_cfg(), trust=Trust.open_swarm(ident.public_key)
    )
    try:
        for r in rogues:
            await r.start(net)
            await r.announce(model_topic("m"), {"models": 1})
            await r.announce(STORES, {"models": 1, "bytes": 1})
        cfg = WorkerConfig(store_timeout=5.0)
        fetcher = ModelFetcher(closed, ModelCache(tmp_path / "c1", 1 << 20), cfg)
        for version in (None, "9"):
            with pytest.raises(SwarmdError) as ei:
                await fetcher.resolve("m", version)
            assert ei.value.code == ERR_UNAVAILABLE  # no admitted store at all: nobody to ask
        assert await closed.lookup_all(STORES, timeout=5.0) == []
        assert sum(sum(r.calls.values()) for r in rogues) == 0
        # the same lookup with an open trust finds them and asks them: the check above can fail
        meta = await ModelFetcher(opened, ModelCache(tmp_path / "c2", 1 << 20), cfg).resolve("m", "9")
        assert meta.version == "9" and sum(r.calls["getModel"] for r in rogues) == 1
    finally:
        await opened.stop()
        await closed.stop()
        await server.stop()
        for r in rogues:
            await r.stop()


async def test_replication_never_calls_an_unadmitted_store(net: DhtTestnet, tmp_path: Path) -> None:
    from tests.store_nodes import start_swarm_store

    op = Identity.generate()
    rogues = hostiles(op)
    store = None
    try:
        for r in rogues:
            await r.start(net)
            await r.announce(STORES, {"models": 1, "bytes": 1})
        store = await start_swarm_store(
            net, tmp_path / "s", replicate_interval=3600.0, trust_of=lambda i: member(op, i, "store")
        )
        await store.role.replicate_once()
        assert sum(sum(r.calls.values()) for r in rogues) == 0
        # and inbound: storeState (what replication reads) is for admitted stores only
        for r in rogues:
            peer = await r.dial("127.0.0.1", store.server.port, store.ident.public_key)
            try:
                with pytest.raises(SwarmdError) as ei:
                    await peer.call("storeState", {}, timeout=T)
                assert ei.value.code == ERR_FORBIDDEN and "store" in ei.value.message
            finally:
                await peer.close()
        friend = Identity.generate()
        peer = await _dial_as(member(op, friend, "store"), friend, store.server.port, store.ident)
        try:
            state = await peer.call("storeState", {}, timeout=T)
            assert isinstance(state, dict) and "have" in state
        finally:
            await peer.close()
    finally:
        if store is not None:
            await store.stop()
        for r in rogues:
            await r.stop()


async def _dial_as(trust: Trust, ident: Identity, port: int, remote: Identity) -> Any:
    from swarmd.rpc import connect

    return await connect(
        ident,
        "127.0.0.1",
        port,
        remote_public_key=remote.public_key,
        firewall=Firewall(open=True, trust=trust),
    )


# -- inbound: who may say what about whom ----------------------------------------------


@pytest.mark.parametrize("closed", [True, False])
async def test_a_worker_cannot_register_drain_or_unregister_another(tmp_path: Path, closed: bool) -> None:
    op = Identity.generate()
    ident = Identity.generate()
    trust = Trust([op.public_key], own_key=ident.public_key) if closed else Trust.open_swarm(ident.public_key)
    o = Orchestrator(tmp_path, trust=trust, identity=ident, policy="round_robin")
    server = o.server
    await o.start()
    w1, w2 = Identity.generate(), Identity.generate()
    peers = []
    try:
        p1 = await _dial_as(member(op, w1, "worker"), w1, server.port, ident)
        p2 = await _dial_as(member(op, w2, "worker"), w2, server.port, ident)
        peers += [p1, p2]
        reg = {"models": ["mlp"], "host": "127.0.0.1", "port": 9}
        await p1.call("registerWorker", {"public_key": w1.public_hex, "weight": 1e6, **reg}, timeout=T)
        for method, params in (
            ("registerWorker", {"public_key": w1.public_hex, **reg}),  # re-register (new address)
            ("registerWorker", {"public_key": w1.public_hex, "state": "DRAINING", **reg}),  # drain
            ("unregisterWorker", {"public_key": w1.public_hex}),
        ):
            with pytest.raises(SwarmdError) as ei:
                await p2.call(method, params, timeout=T)
            assert ei.value.code == ERR_FORBIDDEN and "its own key" in ei.value.message
        status = await o.call("getServiceStatus", {})
        assert [(w["public_key"], w["state"], w["weight"]) for w in status["workers"]] == [
            (w1.public_hex, "ONLINE", 1.0)  # a worker does not set its own weight either
        ]
        # the operator (or this node) may: registering by hand is the operator's tool
        # (an open swarm names no operators: there it is this node's own key, `swarmd call` on its box)
        admin = op if closed else ident
        pop = await _dial_as(Trust([op.public_key], own_key=admin.public_key), admin, server.port, ident)
        peers.append(pop)
        await pop.call("registerWorker", {"public_key": w2.public_hex, "weight": 3.0, **reg}, timeout=T)
        status = await o.call("getServiceStatus", {})
        assert {w["public_key"]: w["weight"] for w in status["workers"]}[w2.public_hex] == 3.0
        # in a closed swarm only admitted workers register at all, whatever their hello shows
        for r in hostiles(op):
            p = await r.dial("127.0.0.1", server.port, ident.public_key)
            peers.append(p)
            if closed:
                with pytest.raises(SwarmdError) as ei:
                    await p.call("registerWorker", {"public_key": r.identity.public_hex, **reg}, timeout=T)
                assert ei.value.code == ERR_FORBIDDEN and "worker" in ei.value.message
            else:
                await p.call("registerWorker", {"public_key": r.identity.public_hex, **reg}, timeout=T)
    finally:
        for p in peers:
            await p.close()
        await o.stop()
        await server.stop()


# -- the CLI and the daemon ---------------------------------------------------------------


def _env_without_trust(**extra: str) -> dict[str, str]:
    env = swarmd_env(**extra)
    env.pop("SWARMD_TRUST_OPEN", None)
    return env


def test_a_daemon_with_roles_and_no_trust_model_refuses_to_start(tmp_path: Path) -> None:
    r = run_cli("--role", "worker", "--data-dir", str(tmp_path), env=_env_without_trust())
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "open = true" in lines[0] and "operators" in lines[0], r.stderr


def test_grant_cli_signs_what_a_node_then_accepts(tmp_path: Path) -> None:
    op_dir, node_dir = tmp_path / "op", tmp_path / "node"
    op_key = run_cli("identity", "--data-dir", str(op_dir)).stdout.strip()
    node_key = run_cli("identity", "--data-dir", str(node_dir)).stdout.strip()
    r = run_cli("grant", "worker,store", node_key, "--expires", "2h", "--data-dir", str(op_dir), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    g = Grant.from_text(doc["grant"])
    g.check([bytes.fromhex(op_key)])
    assert (
        g.roles == ("store", "worker") and g.subject.hex() == node_key and 7000 < g.expires - g.issued <= 7200
    )
    cfg = TrustConfig(operators=[op_key], grants=[doc["grant"]])
    assert Trust.from_config(cfg, bytes.fromhex(node_key), ["worker", "store"]).presented() == [g.encode()]
    bad = run_cli("grant", "wizard", node_key, "--data-dir", str(op_dir))
    assert bad.returncode != 0 and "unknown role 'wizard'" in bad.stderr
    # a node whose grant comes from someone who is not its operator does not start
    env = _env_without_trust(
        SWARMD_TRUST_OPERATORS=Identity.generate().public_hex, SWARMD_TRUST_GRANTS=doc["grant"]
    )
    r = run_cli("--role", "worker", "--data-dir", str(node_dir), env=env)
    assert r.returncode != 0 and "not an operator" in r.stderr, r.stderr


async def test_a_client_given_operators_never_calls_an_unadmitted_store(net: DhtTestnet) -> None:
    from swarmd_rpc import Client, ClientConfig

    op = Identity.generate()
    rogues = hostiles(op)
    boot = [f"{net.nodes[0].address[0]}:{net.nodes[0].address[1]}"]
    try:
        for r in rogues:
            await r.start(net)
            await r.announce(STORES, {"models": 1, "bytes": 1})
        async with Client(config=ClientConfig(bootstrap=boot, operators=[op.public_hex], timeout=5.0)) as c:
            assert await c.lookup(STORES, timeout=5.0) == []
            assert await c.models.list() == []  # no admitted store: nobody is asked
        assert sum(sum(r.calls.values()) for r in rogues) == 0
        async with Client(config=ClientConfig(bootstrap=boot, timeout=5.0)) as c:  # trusts every announcer
            assert len(await c.lookup(STORES, timeout=5.0)) == len(rogues)
    finally:
        for r in rogues:
            await r.stop()


class _Joined:
    """net.config() for HostilePeer.start: a DHT node that joins a daemon's swarm through its bootstrap."""

    def __init__(self, boot: tuple[str, int]) -> None:
        self.boot = boot

    def config(self) -> Any:
        from tests.dht_testnet import dht_config

        return dht_config(bootstrap=[self.boot])


@pytest.mark.slow
async def test_daemons_under_operators_send_no_user_request_to_a_rogue(tmp_path: Path, daemons: Any) -> None:
    """The review's first attack against real daemons: a stranger on WORKERS with weight 1e6
    (and on the model's store topic) gets nothing, and users get their answers."""
    import http.client
    import re

    from tests.gateway_fixtures import reference, tiny_mlp

    op = Identity.generate()

    def granted(name: str, roles: str) -> dict[str, str]:
        key = run_cli("identity", "--data-dir", str(tmp_path / name)).stdout.strip()
        g = Grant.issue(op, roles, bytes.fromhex(key), expires=time.time() + HOUR)
        return _env_without_trust(
            SWARMD_TRUST_OPERATORS=op.public_hex,
            SWARMD_TRUST_GRANTS=g.to_text(),
            SWARMD_GATEWAY_ACCESS_LOG="false",
            SWARMD_ORCHESTRATOR_DHT_REFRESH="0.5",
            SWARMD_WORKER_ANNOUNCE_INTERVAL="0.5",
        )

    hub = daemons(
        "--role",
        "bootstrap,store,orchestrator,gateway",
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "hub"),
        env=granted("hub", "store,orchestrator,gateway"),
    )
    ready = await asyncio.to_thread(hub.wait_event, "ready")
    boot = ("127.0.0.1", ready["ports"]["dht"])
    worker = daemons(
        "--role",
        "worker",
        "--bootstrap",
        f"127.0.0.1:{boot[1]}",
        "--data-dir",
        str(tmp_path / "worker"),
        env=granted("worker", "worker"),
    )
    wready = await asyncio.to_thread(worker.wait_event, "ready")
    api_key = re.search(r"first admin API key \(shown once, store it now\): (\S+)", "".join(hub.lines)).group(
        1
    )
    rogue = HostilePeer()
    try:
        await rogue.start(_Joined(boot))
        for topic in (WORKERS, worker_model_topic("mlp"), STORES, model_topic("mlp")):
            await rogue.announce(topic, WORKER_PAYLOAD)
        # the hub's discovery saw the rogue's records and refused them
        seen = await asyncio.to_thread(hub.wait_event, "peer_not_admitted", 60.0)
        assert seen["peer"] == rogue.identity.public_hex[:16]

        def call(method: str, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", ready["ports"]["http"], timeout=60)
            conn.request(method, path, body=body, headers={"x-api-key": api_key, "Content-Type": ctype})
            r = conn.getresponse()
            out = (r.status, r.read())
            conn.close()
            return out

        model = tiny_mlp(seed=5)
        status, out = await asyncio.to_thread(
            call, "POST", "/api/v1/models?name=mlp&version=1", model, "application/octet-stream"
        )
        assert status == 201, out
        x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
        body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
        want = reference(model, x)[0]
        answered = 0
        async with asyncio.timeout(120):
            while answered < 20:
                status, out = await asyncio.to_thread(
                    call, "POST", "/api/v1/inference/mlp", body, "application/json"
                )
                if status != 200 and answered == 0:
                    await asyncio.sleep(0.2)  # the worker has not announced the model yet
                    continue
                assert status == 200, out
                doc = json.loads(out)
                assert doc["worker"] == wready["public_key"]
                np.testing.assert_allclose(
                    np.asarray(doc["outputs"]["y"], dtype=np.float32), want, rtol=1e-5, atol=1e-6
                )
                answered += 1
        assert sum(rogue.calls.values()) == 0, dict(rogue.calls)
    finally:
        await rogue.stop()


async def test_a_grant_that_expires_mid_connection_stops_admitting_on_that_connection(tmp_path: Path) -> None:
    op, ident, w = Identity.generate(), Identity.generate(), Identity.generate()
    o = await Orchestrator(
        tmp_path, trust=Trust([op.public_key], own_key=ident.public_key), identity=ident, policy="round_robin"
    ).start()
    short = Grant.issue(op, "worker", w.public_key, expires=time.time() + 2)
    peer = await _dial_as(Trust([op.public_key], own_key=w.public_key, own_grants=[short]), w, o.server.port, ident)
    reg = {"public_key": w.public_hex, "models": ["mlp"], "host": "127.0.0.1", "port": 9}
    try:
        await peer.call("registerWorker", reg, timeout=T)
        while time.time() < short.expires + 0.05:
            await asyncio.sleep(0.1)
        with pytest.raises(SwarmdError) as ei:
            await peer.call("registerWorker", reg, timeout=T)
        assert ei.value.code == ERR_FORBIDDEN
    finally:
        await peer.close()
        await o.stop()


async def test_topic_lookup_shows_each_role_records_admission(net: DhtTestnet, tmp_path: Path) -> None:
    """`swarmd topic lookup` of a role's topic lists rogue announcers as NOT admitted (with why)
    when the config names the operators, and marks every record unverified when it names none;
    never as plain members."""
    op = Identity.generate()
    good = Identity.generate()
    peers = [HostilePeer(good, [grant(op, "worker", good)]), *hostiles(op)]
    boot = "{}:{}".format(*net.nodes[0].address)
    try:
        for p in peers:
            await p.start(net)
            await p.announce(WORKERS, WORKER_PAYLOAD)

        def lookup(env: dict[str, str]) -> tuple[dict[str, Any], str]:
            r = run_cli("topic", "lookup", WORKERS, "--json", "--bootstrap", boot, "--timeout", "5",
                        "--data-dir", str(tmp_path / "cli"), env=env)
            assert r.returncode == 0, r.stderr[-2000:]
            return {d["public_key"]: d["admission"] for d in json.loads(r.stdout)}, r.stderr

        async with asyncio.timeout(60):
            while True:  # every record is on the DHT (announce is asynchronous)
                seen, _ = await asyncio.to_thread(lookup, _env_without_trust(SWARMD_TRUST_OPERATORS=op.public_hex))
                if len(seen) == len(peers):
                    break
        assert seen[good.public_hex]["admitted"] is True and "granted by" in seen[good.public_hex]["why"]
        rogue = {p.identity.public_hex for p in peers[1:]}
        assert all(seen[k]["admitted"] is False for k in rogue), seen
        whys = " | ".join(seen[k]["why"] for k in rogue)
        for reason in ("presents no grant", "expired", "not an operator", "another key"):
            assert reason in whys, whys
        # a config without operators cannot tell: every record says so
        seen, err = await asyncio.to_thread(lookup, _env_without_trust())
        assert len(seen) == len(peers) and all(a["admitted"] is None for a in seen.values()), seen
        r = await asyncio.to_thread(run_cli, "topic", "lookup", WORKERS, "--bootstrap", boot, "--timeout", "5",
                                    "--data-dir", str(tmp_path / "cli"),
                                    env=_env_without_trust(SWARMD_TRUST_OPERATORS=op.public_hex))
        lines = {ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()}
        assert lines == {"admitted", "NOT-ADMITTED"}, r.stdout
        assert "1 admitted as worker, 4 not admitted" in r.stderr, r.stderr
    finally:
        for p in peers:
            await p.stop()


def test_status_marks_each_worker_with_its_admission(capsys: Any) -> None:
    from types import SimpleNamespace

    from swarmd.commands.status import admission_check, print_status
    from swarmd.settings import Settings

    op, good, bad = Identity.generate(), Identity.generate(), Identity.generate()

    def rec(ident: Identity, grants: list[Grant]) -> Any:  # what admission reads of a DHT record
        return SimpleNamespace(public_key=ident.public_key, payload={"grants": [g.encode() for g in grants]})

    settings = Settings()
    settings.trust.operators = [op.public_hex]
    check = admission_check(settings)
    workers = [{"public_key": i.public_hex, "state": "ONLINE", "load": {}, "models": [], "last_seen_s": 1.0,
                "ejected_by": [], "admission": check(rec(i, g), "worker")}
               for i, g in ((good, [grant(op, "worker", good)]), (bad, []))]
    print_status({"public_key": "ee" * 32, "roles": [], "ports": {}, "workers": workers, "models": [], "errors": {}})
    out = capsys.readouterr().out
    assert f"{good.public_hex[:16]}  admitted     ONLINE" in out
    assert f"{bad.public_hex[:16]}  NOT-ADMITTED ONLINE" in out
    unverified = admission_check(Settings())(rec(bad, []), "worker")
    assert unverified is not None and unverified["admitted"] is None


async def test_an_admitted_store_answering_another_version_is_not_believed(net: DhtTestnet, tmp_path: Path) -> None:
    """The review's second attack, from inside the trust: a store the operator granted answers
    every getModel with its own version 9. Admission lets it be asked; the version check refuses
    the answer, so nothing is remembered, fetched, or made the default."""
    op, liar_key, ident = Identity.generate(), Identity.generate(), Identity.generate()
    liar = HostilePeer(liar_key, [grant(op, "store", liar_key)])
    server = RpcServer(ident, Methods())
    await server.start()
    sw = Swarm(ident, await net.add(ident), server, swarm_cfg(), trust=member(op, ident, "worker"))
    try:
        await liar.start(net)
        await liar.announce(model_topic("m"), {"models": 1})
        fetcher = ModelFetcher(sw, ModelCache(tmp_path / "c", 1 << 20), WorkerConfig(store_timeout=5.0))
        with pytest.raises(SwarmdError) as ei:
            await fetcher.resolve("m", "1")
        assert ei.value.code == ERR_UNAVAILABLE and "'m':'9'" in ei.value.message, ei.value.message
        assert liar.calls["getModel"] >= 1  # it was admitted and asked: what refused it is the check
        with pytest.raises(SwarmdError):
            await fetcher.resolve("m", None)  # nor is its answer taken as the latest version
        assert fetcher._known == {} and list((tmp_path / "c").glob("**/*.onnx")) == []
    finally:
        await sw.stop()
        await server.stop()
        await liar.stop()
