"""Which event loop runs a node: the standard asyncio loop, or uvloop when asked for and installed.

uvloop (libuv underneath) roughly halves the loopback round trip of a small
RPC call against the standard selector loop (bench/rpc.py --uvloop measures
both in one run). It is optional: `node.event_loop = "uvloop"` uses it when
the package is installed and falls back to asyncio with one log line when it
is not; "auto" uses it whenever it is importable; "asyncio" (the default)
never does. Everything in swarmd uses only the public asyncio API, so the
choice changes speed, not behaviour.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

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


def run(main: Coroutine[Any, Any, T], choice: str = "asyncio") -> T:
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
