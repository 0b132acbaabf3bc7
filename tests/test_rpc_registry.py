"""Connection dedupe when two peers dial each other at once, and the client pool."""

from __future__ import annotations

import asyncio

import pytest

from swarmd.errors import ERR_CLOSED, ERR_NOT_FOUND, ERR_UNAVAILABLE, SwarmdError
from swarmd.node.identity import Identity
from swarmd.rpc import RpcPeer, RpcServer, connect
from swarmd.rpc.registry import ConnectionRegistry, dialler_key
from swarmd_rpc import Pool, PoolConfig, Target, fan_out
from tests.rpc_helpers import make_methods

T = 20.0


async def test_simultaneous_dials_keep_the_same_connection_on_both_sides() -> None:
    a, b = Identity.generate(), Identity.generate()
    reg_a, reg_b = ConnectionRegistry(a.public_key), ConnectionRegistry(b.public_key)
    established_a: asyncio.Queue[RpcPeer] = asyncio.Queue()
    established_b: asyncio.Queue[RpcPeer] = asyncio.Queue()
    srv_a = RpcServer(a, make_methods(), on_peer=established_a.put_nowait)
    srv_b = RpcServer(b, make_methods(), on_peer=established_b.put_nowait)
    await srv_a.start()
    await srv_b.start()
    try:
        a_to_b, b_to_a = await asyncio.gather(
            connect(
                a, "127.0.0.1", srv_b.port, remote_public_key=b.public_key, methods=make_methods(), timeout=T
            ),
            connect(
                b, "127.0.0.1", srv_a.port, remote_public_key=a.public_key, methods=make_methods(), timeout=T
            ),
        )
        accepted_by_a = await asyncio.wait_for(established_a.get(), T)
        accepted_by_b = await asyncio.wait_for(established_b.get(), T)
        kept_a = [reg_a.add(a_to_b), reg_a.add(accepted_by_a)][-1]
        kept_b = [reg_b.add(accepted_by_b), reg_b.add(b_to_a)][-1]
        smaller = min(a.public_key, b.public_key)
        assert dialler_key(a.public_key, kept_a) == smaller
        assert dialler_key(b.public_key, kept_b) == smaller
        # the two survivors are the two ends of one TCP connection
        assert kept_a.conn.session.handshake_hash == kept_b.conn.session.handshake_hash
        assert await kept_a.call("whoami", timeout=T) == a.public_key
        losers = [p for p in (a_to_b, accepted_by_a) if p is not kept_a]
        await asyncio.wait_for(losers[0].wait_closed(), T)
        assert reg_a.get(b.public_key) is kept_a and len(reg_a) == 1
        await kept_a.close()
        await asyncio.wait_for(kept_b.wait_closed(), T)
        assert reg_a.get(b.public_key) is None and reg_b.get(a.public_key) is None
    finally:
        await srv_a.stop()
        await srv_b.stop()


async def test_pool_reuses_retries_and_closes_idle() -> None:
    ident = Identity.generate()
    srv = RpcServer(ident, make_methods())
    await srv.start()
    target = Target("127.0.0.1", srv.port, ident.public_key)
    pool = Pool(config=PoolConfig(idle_timeout=0.3, retries=1))
    try:
        p1, p2 = await asyncio.gather(pool.get(target), pool.get(target))
        assert p1 is p2  # concurrent first uses share one dial
        assert await pool.call(target, "echo", 1, timeout=T) == 1
        p1.conn.close(SwarmdError(ERR_CLOSED, "test closes it"))
        assert await pool.call(target, "echo", 2, timeout=T) == 2  # retried on a fresh connection
        p3 = await pool.get(target)
        assert p3 is not p1
        with pytest.raises(SwarmdError) as ei:
            await pool.call(target, "missing", "x", timeout=T)  # other errors are not retried
        assert ei.value.code == ERR_NOT_FOUND
        await asyncio.wait_for(p3.wait_closed(), T)  # idle: the pool closed it
        assert await pool.call(target, "echo", 3, timeout=T) == 3
    finally:
        await pool.close()
        await srv.stop()


async def test_fan_out_reports_each_peer() -> None:
    servers = [RpcServer(Identity.generate(), make_methods()) for _ in range(3)]
    for s in servers:
        await s.start()
    dead = Target("127.0.0.1", servers[0].port, Identity.generate().public_key)  # wrong key
    targets = [Target("127.0.0.1", s.port, s.identity.public_key) for s in servers]
    pool = Pool(config=PoolConfig(retries=0))
    try:
        out = await pool.fan_out([*targets, dead], "whoami", timeout=T)
        for t in targets:
            assert out[t] == pool.identity.public_key
        assert isinstance(out[dead], SwarmdError)
        peers = [await pool.get(t) for t in targets]
        by_key = await fan_out(peers, "echo", "hi", timeout=T)
        assert by_key == {s.identity.public_key: "hi" for s in servers}
        with pytest.raises(SwarmdError) as ei:
            await pool.get(Target("127.0.0.1", 1, None))
        assert ei.value.code == ERR_UNAVAILABLE
    finally:
        await pool.close()
        for s in servers:
            await s.stop()
