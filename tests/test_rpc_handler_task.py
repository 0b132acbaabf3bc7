"""Handlers run inside a Task by default, so asyncio.timeout() and TaskGroup work in them;
inline=True is the opt-in fast path for handlers that answer at once."""

import asyncio

from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer, connect

T = 30.0


async def test_default_handlers_run_in_a_task_and_inline_ones_answer_too():
    ident = Identity.generate()
    methods = Methods()
    seen: list[object] = []

    async def structured(ctx, params):
        async with asyncio.timeout(T):
            await asyncio.sleep(0)
        async with asyncio.TaskGroup() as tg:
            t = tg.create_task(asyncio.sleep(0, result=params))
        return t.result()

    async def quick(ctx, params):
        seen.append(asyncio.current_task())
        return params

    async def on_event(ctx, params):
        async with asyncio.timeout(T):
            await asyncio.sleep(0)
        seen.append(("event", params))

    methods.register("structured", structured)
    methods.register("quick", quick, inline=True)
    methods.register("note", on_event)
    server = RpcServer(ident, methods)
    await server.start()
    peer = await connect(None, "127.0.0.1", server.port, remote_public_key=ident.public_key, timeout=T)
    try:
        assert await peer.call("structured", 7, timeout=T) == 7
        assert await peer.call("quick", 8, timeout=T) == 8
        assert seen == [None]  # the inline handler's first step ran outside any task
        peer.event("note", 9)
        assert await peer.call("ping", timeout=T) == "pong"
        for _ in range(1000):
            if ("event", 9) in seen:
                break
            await asyncio.sleep(0.01)
        assert ("event", 9) in seen
    finally:
        await peer.close()
        await server.stop()
