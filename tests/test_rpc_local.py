"""LocalPeer: our own method table reached like a remote peer (calls, streams, timeouts, errors)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_CLOSED,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_TIMEOUT,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.node.identity import Identity
from swarmd.rpc import Methods
from swarmd.rpc.local import PIPE_CHUNKS, LocalPeer
from swarmd.store.transfer import pull_stream


def methods() -> tuple[Methods, dict[str, Any]]:
    seen: dict[str, Any] = {"cancelled": asyncio.Event()}
    m = Methods()

    async def echo(ctx: Any, params: Any) -> Any:
        seen["ctx"] = ctx
        return {"params": params, "time_left": ctx.time_left()}

    async def hang(ctx: Any, params: Any) -> Any:
        await asyncio.Event().wait()

    async def broken(ctx: Any, params: Any) -> Any:
        raise KeyError("a bug")

    async def missing(ctx: Any, params: Any) -> Any:
        raise SwarmdError(ERR_NOT_FOUND, "no such thing")

    async def upper(ctx: Any, params: Any, stream: Any) -> Any:
        """Read everything, answer it upper-cased in chunks, return the byte count."""
        got = b""
        while (chunk := await stream.recv()) is not None:
            got += chunk
        for i in range(0, len(got), 3):
            await stream.send(got[i : i + 3].upper())
        await stream.close()
        return len(got)

    async def source(ctx: Any, params: Any, stream: Any) -> Any:
        try:
            for i in range(params["n"]):
                await stream.send(bytes([i]))
        except asyncio.CancelledError:
            seen["cancelled"].set()
            raise
        return params["n"]

    async def fails_midway(ctx: Any, params: Any, stream: Any) -> Any:
        await stream.send(b"part")
        raise SwarmdError(ERR_NOT_FOUND, "blob vanished")

    for name, fn in (("echo", echo), ("hang", hang), ("broken", broken), ("missing", missing)):
        m.register(name, fn)
    for name, fn in (("upper", upper), ("source", source), ("failsMidway", fails_midway)):
        m.register_stream(name, fn)
    return m, seen


async def test_calls_run_the_handler_with_our_key_and_a_deadline() -> None:
    m, seen = methods()
    me = Identity.generate().public_key
    peer = LocalPeer(m, me)
    ans = await peer.call("echo", {"a": 1}, timeout=5)
    assert ans["params"] == {"a": 1} and 0 < ans["time_left"] <= 5
    assert seen["ctx"].peer == me and peer.remote_public_key == me
    assert await peer.call("ping", None, timeout=1) == "pong"  # the built-ins every peer answers
    with pytest.raises(SwarmdError) as ei:
        await peer.call("hang", None, timeout=0.05)
    assert ei.value.code == ERR_TIMEOUT
    with pytest.raises(SwarmdError) as ei:
        await peer.call("nope")
    assert ei.value.code == ERR_UNKNOWN_METHOD
    with pytest.raises(SwarmdError) as ei:
        await peer.call("upper")
    assert ei.value.code == ERR_BAD_REQUEST and "stream" in ei.value.message
    with pytest.raises(SwarmdError) as ei:
        await peer.call("broken")
    assert ei.value.code == ERR_INTERNAL and "KeyError" in ei.value.message  # as a remote caller sees it
    with pytest.raises(SwarmdError) as ei:
        await peer.call("missing")
    assert ei.value.code == ERR_NOT_FOUND
    await peer.close()
    with pytest.raises(SwarmdError) as ei:
        await peer.call("echo")
    assert ei.value.code == ERR_CLOSED and peer.is_closed


async def test_streams_carry_bytes_both_ways_with_a_bounded_window() -> None:
    m, seen = methods()
    peer = LocalPeer(m, b"k" * 32)
    s = await peer.open_stream("upper", None, timeout=5)
    for word in (b"hello ", b"local ", b"world"):
        await s.send(word)
    await s.close()
    out = b""
    while (chunk := await s.recv()) is not None:
        out += chunk
    assert out == b"HELLO LOCAL WORLD" and await s.result() == 17
    assert await s.recv() is None  # the end stays the end

    # a reader that does not read: the handler waits at the window instead of queueing it all
    s = await peer.open_stream("source", {"n": PIPE_CHUNKS * 4}, timeout=5)
    await asyncio.sleep(0.05)
    assert len(s._in._items) == PIPE_CHUNKS
    got = [await s.recv() for _ in range(PIPE_CHUNKS * 4)]
    assert got == [bytes([i]) for i in range(PIPE_CHUNKS * 4)] and await s.result() == PIPE_CHUNKS * 4

    # aborting cancels the handler; its result says so
    s = await peer.open_stream("source", {"n": 10_000}, timeout=5)
    await s.recv()
    s.abort()
    async with asyncio.timeout(5):
        await seen["cancelled"].wait()
    with pytest.raises(SwarmdError) as ei:
        await s.result()
    assert ei.value.code == ERR_CANCELLED
    await peer.close()


async def test_a_stream_handler_error_reaches_the_reader_and_the_result() -> None:
    m, _ = methods()
    peer = LocalPeer(m, b"k" * 32)
    s = await peer.open_stream("failsMidway", None, timeout=5)
    with pytest.raises(SwarmdError) as ei:
        while await s.recv() is not None:
            pass
    assert ei.value.code == ERR_NOT_FOUND
    with pytest.raises(SwarmdError):
        await s.result()
    # a stream still running when the peer closes is cancelled and awaited
    s = await peer.open_stream("source", {"n": 10_000}, timeout=5)
    await peer.close()
    with pytest.raises(SwarmdError) as ei:
        await s.result()
    assert ei.value.code == ERR_CANCELLED


async def test_the_store_transfer_code_runs_over_a_local_peer(tmp_path: Any) -> None:
    """The same client code that pulls a blob from a remote store pulls it from our own table."""
    data = bytes(range(256)) * 5000
    m = Methods()

    async def download(ctx: Any, params: Any, stream: Any) -> Any:
        off = params["offset"]
        for i in range(off, len(data), 65536):
            await stream.send(data[i : i + 65536])
        return {"size": len(data)}

    m.register_stream("downloadBlob", download)
    peer = LocalPeer(m, b"k" * 32)
    chunks: list[bytes] = []

    def sink(batch: list[bytes]) -> None:  # called from a worker thread, a batch at a time
        chunks.extend(batch)

    await pull_stream(peer, "00" * 32, 0, sink)
    assert b"".join(chunks) == data
    await peer.close()
