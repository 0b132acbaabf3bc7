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


async def test_plain_function_handlers_answer_at_once_and_their_errors_reach_the_caller():
    """A plain (non-async) handler's return value is the answer, given in the read callback with
    no coroutine and no Task; what it raises is the caller's error and the connection stays up.
    Handlers returning another awaitable (a Future, a lambda's coroutine) are awaited as before."""
    from swarmd.errors import ERR_INTERNAL, ERR_NOT_FOUND, SwarmdError

    ident = Identity.generate()
    methods = Methods()
    seen: list[object] = []

    def echo(ctx, params):
        seen.append(asyncio.current_task())
        return [params, ctx.method]

    def missing(ctx, params):
        raise SwarmdError(ERR_NOT_FOUND, f"no {params}")

    def broken(ctx, params):
        raise ValueError("a bug")

    def later(ctx, params):
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, params * 2)
        return fut

    async def double(ctx, params):
        return params * 2

    def note(ctx, params):
        seen.append(("event", params))

    methods.register("echo", echo)
    methods.register("missing", missing, inline=True)
    methods.register("broken", broken)
    methods.register("later", later)
    methods.register("wrapped", lambda ctx, params: double(ctx, params))
    methods.register("note", note)
    server = RpcServer(ident, methods)
    await server.start()
    peer = await connect(None, "127.0.0.1", server.port, remote_public_key=ident.public_key, timeout=T)
    try:
        assert await peer.call("echo", 5, timeout=T) == [5, "echo"]
        assert seen == [None]  # ran in the read callback, outside any task
        for name, code in (("missing", ERR_NOT_FOUND), ("broken", ERR_INTERNAL)):
            try:
                await peer.call(name, "x", timeout=T)
                raise AssertionError(f"{name} answered")
            except SwarmdError as e:
                assert e.code == code, e
        assert await peer.call("later", 4, timeout=T) == 8
        assert await peer.call("wrapped", 5, timeout=T) == 10
        peer.event("note", 9)
        assert await peer.call("echo", 6, timeout=T) == [6, "echo"]  # the connection is still fine
        assert ("event", 9) in seen  # the event arrived before the call after it, and ran at once
    finally:
        await peer.close()
        await server.stop()
