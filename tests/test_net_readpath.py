"""Each event loop reads a secure connection its quicker way, and both ways carry the same bytes.

SecureConnection is both a Protocol and a BufferedProtocol: the standard loop reads
into our reused buffer (get_buffer/buffer_updated), uvloop hands data_received the
bytes it read into its own buffer. Calls, a multi-MiB stream (reads that split
Noise messages and mux frames) and calls again must arrive intact on both.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from swarmd.net.connection import SecureConnection
from swarmd.node.eventloop import run, uvloop_available
from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, Methods, RpcServer, Stream, connect

T = 30.0


async def _exchange() -> tuple[list[Any], str]:
    methods = Methods()

    async def echo(ctx: CallContext, params: Any) -> Any:
        return params

    async def digest(ctx: CallContext, params: Any, stream: Stream) -> str:
        h = hashlib.sha256()
        while (chunk := await stream.recv()) is not None:
            h.update(chunk)
        return h.hexdigest()

    methods.register("echo", echo, inline=True)
    methods.register_stream("digest", digest)
    ident = Identity.generate()
    srv = RpcServer(ident, methods)
    await srv.start()
    try:
        peer = await connect(None, "127.0.0.1", srv.port, remote_public_key=ident.public_key, timeout=T)
        try:
            got = [await peer.call("echo", i.to_bytes(2, "big") * 40, timeout=T) for i in range(50)]
            got += await asyncio.gather(*(peer.call("echo", [i, "x" * i], timeout=T) for i in range(200)))
            data = bytes(range(256)) * 12_289  # ~3 MiB, not a multiple of any frame size
            s = await peer.open_stream("digest", timeout=T)
            for off in range(0, len(data), 100_003):
                await s.send(data[off : off + 100_003])
            await s.close()
            got.append(await s.result())
            got.append(hashlib.sha256(data).hexdigest())
            got.append(await peer.call("echo", b"after", timeout=T))
        finally:
            await peer.close()
    finally:
        await srv.stop()
    return got, type(asyncio.get_running_loop()).__module__


def _expected() -> list[Any]:
    return [i.to_bytes(2, "big") * 40 for i in range(50)] + [[i, "x" * i] for i in range(200)]


def _check(got: list[Any]) -> None:
    assert got[:250] == _expected()
    assert got[250] == got[251]  # the handler's digest of the stream is the sender's
    assert got[252] == b"after"


def test_standard_loop_reads_into_our_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    orig = SecureConnection.get_buffer
    monkeypatch.setattr(SecureConnection, "get_buffer", lambda self, n: calls.append(n) or orig(self, n))
    got, module = run(_exchange(), "asyncio")
    assert module.startswith("asyncio")
    _check(got)
    assert calls, "the selector loop did not use the buffered read path"


@pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed (optional: swarmd[fast])")
def test_uvloop_reads_into_its_own_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    orig = SecureConnection.get_buffer
    monkeypatch.setattr(SecureConnection, "get_buffer", lambda self, n: calls.append(n) or orig(self, n))
    got, module = run(_exchange(), "uvloop")
    assert module.startswith("uvloop")
    _check(got)
    assert not calls, "uvloop used the buffered read path (a Python call per read)"
