"""RPC over real TCP and real Noise: calls, errors, timeouts, deadlines, events, callbacks."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_HANDSHAKE,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_TIMEOUT,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer, connect
from tests.rpc_helpers import Log, make_methods

T = 20.0  # generous: the machine is shared


@pytest.fixture
async def server():
    ident = Identity.generate()
    log = Log()
    srv = RpcServer(ident, make_methods(log))
    srv.log = log  # type: ignore[attr-defined]
    await srv.start()
    yield srv
    await srv.stop()


async def test_call_with_known_key_ik(server: RpcServer) -> None:
    me = Identity.generate()
    peer = await connect(
        me, "127.0.0.1", server.port, remote_public_key=server.identity.public_key, timeout=T
    )
    try:
        assert peer.remote_public_key == server.identity.public_key
        assert await peer.call("echo", {"a": [1, 2, "x"], "b": b"\x00\xff"}, timeout=T) == {
            "a": [1, 2, "x"],
            "b": b"\x00\xff",
        }
        assert await peer.call("whoami", timeout=T) == me.public_key
        assert await peer.call("ping", timeout=T) == "pong"
        assert isinstance(await peer.call("getInstanceId", timeout=T), str)
    finally:
        await peer.close()


async def test_call_without_key_xx_learns_it(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        assert peer.remote_public_key == server.identity.public_key
        assert await peer.call("echo", 5, timeout=T) == 5
    finally:
        await peer.close()


async def test_wrong_key_fails_with_err_handshake(server: RpcServer) -> None:
    with pytest.raises(SwarmdError) as ei:
        await connect(
            None, "127.0.0.1", server.port, remote_public_key=Identity.generate().public_key, timeout=T
        )
    assert ei.value.code == ERR_HANDSHAKE
    assert "wrong public key" in ei.value.message
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)  # server keeps serving
    assert await peer.call("echo", 1, timeout=T) == 1
    await peer.close()


async def test_errors_keep_their_codes(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        with pytest.raises(SwarmdError) as ei:
            await peer.call("missing", "m1", timeout=T)
        assert (ei.value.code, ei.value.message, ei.value.data) == (
            ERR_NOT_FOUND,
            "no such thing",
            {"name": "m1"},
        )
        with pytest.raises(SwarmdError) as ei:
            await peer.call("nope", timeout=T)
        assert ei.value.code == ERR_UNKNOWN_METHOD
        with pytest.raises(SwarmdError) as ei:
            await peer.call("crash", [1, 2], timeout=T)  # wrong param type
        assert ei.value.code == ERR_INTERNAL
        with pytest.raises(SwarmdError) as ei:
            await peer.call("upload", timeout=T)  # a stream method called plainly
        assert ei.value.code == ERR_BAD_REQUEST
        with pytest.raises(SwarmdError) as ei:
            await peer.call("echo", object(), timeout=T)  # not encodable: refused locally
        assert ei.value.code == ERR_BAD_REQUEST
        assert await peer.call("echo", "still fine", timeout=T) == "still fine"
    finally:
        await peer.close()


async def test_timeout_cancels_the_remote_handler(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        with pytest.raises(SwarmdError) as ei:
            await peer.call("sleep", 30, timeout=0.2)
        assert ei.value.code == ERR_TIMEOUT
        await server.log.wait_for("cancelled")  # type: ignore[attr-defined]
    finally:
        await peer.close()


async def test_task_cancellation_cancels_the_call(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        task = asyncio.create_task(peer.call("sleep", 30, timeout=T))
        await server.log.wait_for("sleeping")  # type: ignore[attr-defined]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.log.wait_for("cancelled")  # type: ignore[attr-defined]  # CANCEL reached the handler
        assert await peer.call("echo", 1, timeout=T) == 1
    finally:
        await peer.close()


async def test_deadline_reaches_the_handler(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        left = await peer.call("deadline", timeout=7.0)
        assert 0 < left <= 7.0
    finally:
        await peer.close()


async def test_event_runs_without_answer(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        peer.event("note", {"n": 1})
        peer.event("no-such-event", 1)  # dropped with a log line, nothing else
        await peer.call("echo", 0, timeout=T)  # ordered after the events on channel 0
        assert ("event", {"n": 1}) in server.log  # type: ignore[attr-defined]
    finally:
        await peer.close()


async def test_callee_calls_the_caller_back(server: RpcServer) -> None:
    mine = Methods()

    async def echo(ctx: Any, params: Any) -> Any:
        return ["from client", params]

    mine.register("echo", echo)
    peer = await connect(None, "127.0.0.1", server.port, methods=mine, timeout=T)
    try:
        assert await peer.call("callback", 3, timeout=T) == ["from client", 3]
    finally:
        await peer.close()


async def test_tensors_travel_as_raw_bytes(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        out = await peer.call("echo", {"x": arr, "y": np.array([True, False]), "z": np.int64(3)}, timeout=T)
        assert out["x"].dtype == np.float32 and out["x"].shape == (2, 3, 4)
        assert np.array_equal(out["x"], arr)
        assert out["y"].tolist() == [True, False] and out["z"] == 3
    finally:
        await peer.close()


async def test_server_vanishing_mid_call_gives_err_closed_promptly() -> None:
    log = Log()
    srv = RpcServer(Identity.generate(), make_methods(log))
    await srv.start()
    peer = await connect(None, "127.0.0.1", srv.port, timeout=T)
    task = asyncio.create_task(peer.call("sleep", 60, timeout=60))
    await log.wait_for("sleeping")
    await srv.stop()
    with pytest.raises(SwarmdError) as ei:
        await asyncio.wait_for(task, T)
    assert ei.value.code == ERR_CLOSED
    with pytest.raises(SwarmdError) as ei:
        await peer.call("echo", 1)
    assert ei.value.code == ERR_CLOSED
    await peer.close()


async def test_many_calls_in_flight(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        results = await asyncio.gather(*(peer.call("echo", i, timeout=T) for i in range(500)))
        assert results == list(range(500))
    finally:
        await peer.close()


async def test_deadlines_of_mixed_timeouts_expire_independently(server: RpcServer) -> None:
    """One sweep timer serves every call: an earlier deadline re-arms it, expiry touches only due calls."""
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        long_call = asyncio.create_task(peer.call("sleep", 0.5, timeout=T))
        await server.log.wait_for("sleeping")  # type: ignore[attr-defined]
        short = [asyncio.create_task(peer.call("sleep", 30, timeout=0.2)) for _ in range(3)]
        for task in short:
            with pytest.raises(SwarmdError) as ei:
                await task
            assert ei.value.code == ERR_TIMEOUT
        assert await long_call == "slept"
        assert await peer.call("echo", "after", timeout=T) == "after"
        assert not peer._pending  # nothing left behind
    finally:
        await peer.close()


async def test_tcp_nodelay_on_both_ends(server: RpcServer) -> None:
    """Small calls must not wait for Nagle's algorithm on either side."""
    import socket

    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        assert await peer.call("echo", 1, timeout=T) == 1
        (served,) = server.peers
        for conn in (peer.conn, served.conn):
            sock = conn._pipe.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await peer.close()


async def test_a_plain_handler_gets_every_context_field_and_each_call_its_own_timeout() -> None:
    """The inline path builds CallContext field by field (no __init__): a field added to the
    dataclass and not set there fails here. The caller keeps the last timeout's milliseconds:
    calls alternating timeouts still each carry their own."""
    import dataclasses

    from swarmd.rpc.methods import CallContext

    seen: list[Any] = []

    def context(ctx: Any, params: Any) -> Any:  # a plain function: dispatched inline
        seen.append(ctx)
        return {f.name: getattr(ctx, f.name) is not None for f in dataclasses.fields(CallContext)}

    methods = Methods()
    methods.register("context", context)
    ident = Identity.generate()
    srv = RpcServer(ident, methods)
    await srv.start()
    me = Identity.generate()
    peer = await connect(me, "127.0.0.1", srv.port, remote_public_key=ident.public_key, timeout=T)
    try:
        for timeout in (7.0, None, 3.0, 3.0, None, 0.5):
            set_fields = await peer.call("context", None, timeout=timeout)
            assert set(set_fields) == {f.name for f in dataclasses.fields(CallContext)}
            assert all(set_fields.values())
            ctx = seen[-1]
            assert ctx.peer == me.public_key and ctx.method == "context" and ctx.peer_conn in srv.peers
            left = ctx.time_left()
            assert left is not None and 0 < left <= (peer.config.default_timeout if timeout is None else timeout)
            if timeout is None or timeout > 3.0:
                assert left > 3.0  # not a shorter timeout left over from the call before
        assert [c.request_id for c in seen] == sorted({c.request_id for c in seen})
    finally:
        await peer.close()
        await srv.stop()
