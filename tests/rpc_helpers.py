"""Shared pieces of the RPC tests: a server with a few real handlers."""

from __future__ import annotations

import asyncio
from typing import Any

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.rpc import CallContext, Methods, Stream


class Log(list):
    """What the handlers saw; tests await entries instead of polling."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def append(self, item: Any) -> None:
        super().append(item)
        self._changed.set()

    async def wait_for(self, kind: str, timeout: float = 20.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for item in self:
                    if item[0] == kind:
                        return item
                self._changed.clear()
                await self._changed.wait()


def make_methods(log: list[Any] | None = None) -> Methods:
    methods = Methods()
    seen = log if log is not None else []

    async def echo(ctx: CallContext, params: Any) -> Any:
        return params

    async def whoami(ctx: CallContext, params: Any) -> Any:
        return ctx.peer

    async def sleep(ctx: CallContext, params: Any) -> Any:
        seen.append(("sleeping", ctx.request_id))
        try:
            await asyncio.sleep(float(params))
        except asyncio.CancelledError:
            seen.append(("cancelled", ctx.request_id))
            raise
        return "slept"

    async def missing(ctx: CallContext, params: Any) -> Any:
        raise SwarmdError(ERR_NOT_FOUND, "no such thing", {"name": params})

    async def crash(ctx: CallContext, params: Any) -> Any:
        return params["key"]  # TypeError/KeyError on wrong params: a bug -> ERR_INTERNAL

    async def deadline(ctx: CallContext, params: Any) -> Any:
        return ctx.time_left()

    async def note(ctx: CallContext, params: Any) -> None:
        seen.append(("event", params))

    async def upload(ctx: CallContext, params: Any, stream: Stream) -> Any:
        total = 0
        while (chunk := await stream.recv()) is not None:
            total += len(chunk)
        return total

    async def download(ctx: CallContext, params: Any, stream: Stream) -> Any:
        size, chunk = int(params["size"]), int(params.get("chunk", 65536))
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            await stream.send(b"\x07" * n)
            sent += n
        await stream.close()
        return sent

    async def callback(ctx: CallContext, params: Any) -> Any:
        return await ctx.peer_conn.call("echo", params, timeout=10)

    async def blob(ctx: CallContext, params: Any) -> Any:
        return bytes(int(params["size"]))  # a plain result of any size (the message limit applies)

    methods.register("echo", echo)
    methods.register("blob", blob)
    methods.register("whoami", whoami)
    methods.register("sleep", sleep)
    methods.register("missing", missing)
    methods.register("crash", crash)
    methods.register("deadline", deadline)
    methods.register("note", note, op="w")
    methods.register("write", echo, op="w")
    methods.register("callback", callback)
    methods.register_stream("upload", upload, op="w")
    methods.register_stream("download", download)
    return methods
