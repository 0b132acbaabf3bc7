"""One owner for every background task.

A part of the node spawns its loops here; on stop the supervisor cancels and
awaits them all. A task that dies with an exception is a crash of the node:
the supervisor reports it to `on_crash`, which stops the node with a non-zero
exit and a logged reason instead of leaving it hanging half-alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

CrashHandler = Callable[[str, BaseException], None]


class Supervisor:
    def __init__(self, on_crash: CrashHandler | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_crash = on_crash
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run coro as a supervised task; its failure is the node's failure."""
        if self._closing:
            coro.close()
            raise RuntimeError(f"supervisor is closing; refused to start task {name!r}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is None:
            return
        logger.opt(exception=exc).bind(event="task_crashed", task=task.get_name()).error(
            "background task {} crashed: {!r}", task.get_name(), exc
        )
        if self._on_crash is not None:
            self._on_crash(task.get_name(), exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait (bounded) for them to finish."""
        self._closing = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                logger.bind(event="task_stuck", task=t.get_name()).warning(
                    "task {} did not stop within {}s", t.get_name(), timeout
                )
        self._tasks.clear()
