"""The optional uvloop event loop: chosen by node.event_loop, with a fallback, same RPC behaviour."""

from __future__ import annotations

import asyncio

import pytest

from swarmd.node.eventloop import loop_factory, run, uvloop_available
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer, connect


async def _echo_round_trip() -> tuple[str, object]:
    methods = Methods()

    async def echo(ctx: object, params: object) -> object:
        return params

    methods.register("echo", echo)
    ident = Identity.generate()
    srv = RpcServer(ident, methods)
    await srv.start()
    try:
        peer = await connect(None, "127.0.0.1", srv.port, remote_public_key=ident.public_key, timeout=20)
        try:
            got = await peer.call("echo", b"x" * 64, timeout=20)
        finally:
            await peer.close()
    finally:
        await srv.stop()
    return type(asyncio.get_running_loop()).__module__, got


def test_standard_loop_by_default() -> None:
    assert loop_factory() is None
    module, got = run(_echo_round_trip())
    assert module.startswith("asyncio") and got == b"x" * 64


def test_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="event loop must be one of"):
        loop_factory("tokio")


@pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed (optional: swarmd[fast])")
def test_rpc_on_uvloop() -> None:
    module, got = run(_echo_round_trip(), "uvloop")
    assert module.startswith("uvloop") and got == b"x" * 64
    assert loop_factory("auto") is not None
