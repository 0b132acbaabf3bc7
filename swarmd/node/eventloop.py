"""Which event loop runs a node: the standard asyncio loop, or uvloop when asked for and installed.

uvloop (libuv underneath) roughly halves the loopback round trip of a small
RPC call against the standard selector loop (bench/rpc.py --uvloop measures
both in one run) and takes ~a fifth off the gateway's CPU per request
(bench/gateway.py). It is a dependency on Linux and the default there:
`node.event_loop = "auto"` (the default) uses it whenever it is importable;
"uvloop" insists, falling back to asyncio with one log line when it is not
installed; "asyncio" never uses it. Everything in swarmd uses only the public
asyncio API, so the choice changes speed, not behaviour. `loop_factory()`
without an argument is the standard loop: library callers (tests, the client)
keep whatever loop they run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from loguru import logger

T = TypeVar("T")

CHOICES = ("asyncio", "uvloop", "auto")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: str = "asyncio") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for asyncio.Runner; None means the standard loop."""
    if choice not in CHOICES:
        raise ValueError(f"event loop must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "asyncio":
        return None
    if not uvloop_available():
        if choice == "uvloop":
            logger.bind(component="node").warning("uvloop is not installed: running on the standard asyncio loop")
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "asyncio", reap_timeout: float | None = None) -> T:
    """asyncio.run(main) on the chosen loop.

    With reap_timeout (daemons), tasks still alive when main returns get that
    long to finish after being cancelled; if one ignores its cancellation the
    process exits at once with main's exit status instead of hanging in
    asyncio's shutdown, which waits for every task without a bound.
    """
    if reap_timeout is not None:
        main = _then_reap(main, reap_timeout)
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def exit_process(code: int) -> NoReturn:
    """Exit a daemon now that its node has stopped, skipping interpreter teardown.

    After a graceful stop every socket, database and thread of the node is closed;
    what is left is the interpreter unloading ~1,000 modules (numpy, onnxruntime,
    aiohttp...), which took 3-5 s of wall time on a busy 2-core box: most of an idle
    worker's stop. Output is flushed first. Only for the process entry points
    (`swarmd --role ...`, `python -m swarmd.demo`), never a library call.
    """
    logger.complete()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def _then_reap(main: Coroutine[Any, Any, T], timeout: float) -> T:  # noqa: ASYNC109
    result = await main
    current = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not current]
    for t in others:
        t.cancel()
    if others:
        _, pending = await asyncio.wait(others, timeout=timeout)
        if pending:
            logger.bind(event="tasks_stuck", tasks=sorted(t.get_name() for t in pending)).error(
                "{} task(s) ignored cancellation; exiting without waiting for them", len(pending)
            )
            await logger.complete()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(result if isinstance(result, int) else 1)
    return result
