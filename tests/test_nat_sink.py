"""nat.sink (the receiving end of `swarmd nat probe`) cannot be used by any peer as a free byte sink."""

from __future__ import annotations

from typing import Any

import pytest

from swarmd.errors import ERR_BAD_REQUEST, ERR_FORBIDDEN, ERR_OVERLOADED, SwarmdError
from swarmd.net.nat import NatConfig
from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, Methods, RpcServer
from swarmd.swarm import Swarm, SwarmConfig
from swarmd.swarm.pathprobe import pattern_block, pattern_sha256
from swarmd.swarm.traversal import Traversal
from tests.dht_testnet import DhtTestnet

QUICK = dict(assume="public", redetect_interval=3600.0, stun_timeout=1.0)


async def _node(net: DhtTestnet, nat: NatConfig) -> Swarm:
    ident = Identity.generate()
    dht = await net.add(ident)
    rpc = RpcServer(ident, Methods(), "127.0.0.1", 0)
    await rpc.start()
    sw = Swarm(ident, dht, rpc, SwarmConfig(connect_timeout=5.0, lookup_timeout=5.0))
    await sw.start()
    await Traversal(sw, nat).start()
    return sw


@pytest.fixture
async def pair():
    net = await DhtTestnet.create(2)
    made: list[Swarm] = []

    async def make(**nat: Any) -> Swarm:
        sw = await _node(net, NatConfig(**QUICK, **nat))
        assert await sw.flush(10)  # its peer record is on the DHT: others can connect by key
        made.append(sw)
        return sw

    yield make
    for s in made:
        if s.traversal is not None:
            await s.traversal.stop()
        await s.stop()
        await s.server.stop()
    await net.close()


async def _sink(caller: Swarm, target: Swarm, size: int, params: Any = None, data: bytes | None = None) -> Any:
    peer = await caller.connect(target.public_key)
    stream = await peer.open_stream("nat.sink", params, timeout=30)
    data = b"\x00" * size if data is None else data
    try:
        sent = 0
        while sent < size:
            n = min(64 * 1024, size - sent)
            await stream.send(data[sent : sent + n])
            sent += n
        await stream.close()
    except SwarmdError:
        pass  # the callee may end the stream early; its error comes from result()
    return await stream.result()


async def test_sink_charges_each_caller_a_byte_budget(pair) -> None:
    target = await pair(probe_max_bytes=256 * 1024, sink_rate=1)
    caller = await pair()
    assert (await _sink(caller, target, 256 * 1024))["bytes"] == 256 * 1024
    with pytest.raises(SwarmdError) as e:
        await _sink(caller, target, 256 * 1024)
    assert e.value.code == ERR_OVERLOADED
    assert target.traversal.probe.sink_refused == 1
    # another key has its own budget
    other = await pair()
    assert (await _sink(other, target, 1024))["bytes"] == 1024


async def test_sink_can_be_turned_off_and_probe_still_reports(pair) -> None:
    target = await pair(sink=False)
    caller = await pair()
    with pytest.raises(SwarmdError) as e:
        await _sink(caller, target, 1024)
    assert e.value.code == ERR_FORBIDDEN
    # `swarmd nat probe` without a stream still works against it; with a stream, against a default node
    res = await caller.traversal.probe._rpc_probe(_own_ctx(caller), {"target": target.public_key.hex(), "bytes": 0})
    assert res["rtt_ms"] >= 0
    open_node = await pair()
    res = await caller.traversal.probe._rpc_probe(_own_ctx(caller), {"target": open_node.public_key.hex(), "bytes": 300_000})
    assert res["stream"]["ok"] is True


async def test_sink_checks_a_named_pattern_as_it_arrives(pair) -> None:
    """With {"pattern": seed} the sink compares the stream with pattern_block(seed) repeated
    (no hashing) and says whether every byte matched; one flipped byte anywhere is caught."""
    target = await pair(probe_max_bytes=8 << 20, sink_rate=1 << 30)
    caller = await pair()
    seed = b"s" * 16
    block = pattern_block(seed)
    size = 3 * len(block) + 1234  # crosses the pattern's end three times, ends mid-block
    good = (block * 4)[:size]
    assert await _sink(caller, target, size, {"pattern": seed}, good) == {"bytes": size, "match": True}
    for at in (0, len(block) - 1, len(block), size - 1):
        bad = bytearray(good)
        bad[at] ^= 1
        assert await _sink(caller, target, size, {"pattern": seed}, bytes(bad)) == {"bytes": size, "match": False}, at
    # without a pattern: sha256 of what arrived, as older probes expect
    assert (await _sink(caller, target, 1000, None, good))["sha256"] == pattern_sha256(block, 1000)
    for bad_seed in (b"", b"x" * 33, "text", 5):
        with pytest.raises(SwarmdError) as e:
            await _sink(caller, target, 10, {"pattern": bad_seed})
        assert e.value.code == ERR_BAD_REQUEST, bad_seed


async def test_probe_refuses_bad_params_with_a_stable_code(pair) -> None:
    caller, target = await pair(), await pair()
    key = target.public_key.hex()
    for bad in (None, [1], {}, {"target": 5}, {"target": None}, {"target": "zz"}, {"target": key, "bytes": -1},
                {"target": key, "bytes": True}, {"target": key, "watch": "1"}):
        with pytest.raises(SwarmdError) as e:
            await caller.traversal.probe._rpc_probe(_own_ctx(caller), bad)
        assert e.value.code == ERR_BAD_REQUEST, bad


def _own_ctx(sw: Swarm) -> CallContext:
    """What the RPC layer hands nat.probe when `swarmd nat probe` calls the node's own key."""
    return CallContext(peer=sw.public_key, method="nat.probe", request_id=0, deadline=None, peer_conn=None)  # type: ignore[arg-type]


async def test_sink_fails_a_stalled_stream_but_not_a_long_steady_one(pair) -> None:
    """The sink's deadline moves with progress (once per half of request_timeout, not per
    chunk): a stream that stops sending fails with ERR_TIMEOUT, one that keeps sending for
    longer than request_timeout in total does not."""
    import asyncio

    from swarmd.errors import ERR_TIMEOUT

    target = await pair(probe_max_bytes=8 << 20, sink_rate=1 << 30)
    caller = await pair()
    target.config.request_timeout = 2.0
    peer = await caller.connect(target.public_key)
    seed = b"t" * 16
    block = pattern_block(seed)
    stream = await peer.open_stream("nat.sink", {"pattern": seed}, timeout=60)
    for i in range(50):  # 5 s of steady progress, 20 chunks per request_timeout
        await stream.send(block[i * 1000 : (i + 1) * 1000])
        await asyncio.sleep(0.1)
    await stream.close()
    assert await stream.result() == {"bytes": 50_000, "match": True}
    stalled = await peer.open_stream("nat.sink", {"pattern": seed}, timeout=60)
    await stalled.send(block[:1000])  # then nothing: no END, no more bytes
    with pytest.raises(SwarmdError) as e:
        await stalled.result()
    assert e.value.code == ERR_TIMEOUT
