"""One owner for every long-lived task, in named scopes.

The node holds the root Supervisor; each part (swarm, dht, fleet, a role, the
gateway's backend) opens a child scope for its loops and closes it on stop,
which cancels and awaits exactly its own tasks. A scope says what a crash of
one of its tasks means:

- STOP_NODE: the node stops with a non-zero exit and a logged reason (the
  root's `on_crash`) instead of hanging half-alive — loops the node cannot do
  without (discovery, health checks, announcements, replication);
- LOG: the failure is logged and the rest goes on — per-peer and per-request
  work (a dial, a reconnect, a record hand-off) where one failure is no reason
  to stop serving everyone else.

`describe()` names every scope and task; `swarmd status` prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from loguru import logger

CrashHandler = Callable[[str, BaseException], None]
Reporter = Callable[[str, BaseException], None]  # (task path, exception): how a LOG scope logs a failure
Policy = Literal["stop-node", "log"]
STOP_NODE: Policy = "stop-node"
LOG: Policy = "log"


async def finish_within(tasks: list[asyncio.Task[Any]], grace: float, cancel_wait: float = 1.0) -> None:
    """A graceful stop's tail: let `tasks` (running requests) finish within `grace` seconds, then
    cancel the late ones and wait at most `cancel_wait` more for them to unwind."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=grace)
    for t in late:
        t.cancel()
    if late:
        await asyncio.wait(late, timeout=cancel_wait)


class Supervisor:
    def __init__(
        self,
        on_crash: CrashHandler | None = None,
        *,
        name: str = "node",
        policy: Policy = STOP_NODE,
        parent: Supervisor | None = None,
        report: Reporter | None = None,
    ) -> None:
        """`report` replaces the LOG policy's log line (e.g. a rate-limited one where a hostile
        peer can cause failures at will)."""
        self.name = name
        self.policy = policy
        self.parent = parent
        self.report = report
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scopes: list[Supervisor] = []
        self._on_crash = on_crash
        self._closing = False

    @property
    def path(self) -> str:
        return self.name if self.parent is None else f"{self.parent.path}/{self.name}"

    def scope(self, name: str, policy: Policy = STOP_NODE, *, report: Reporter | None = None) -> Supervisor:
        """A child scope: its tasks are ours too (closed with us), its crash policy its own."""
        if self._closing:
            raise RuntimeError(f"supervisor {self.path} is closing; refused to open scope {name!r}")
        child = Supervisor(name=name, policy=policy, parent=self, report=report)
        self._scopes.append(child)
        return child

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run coro as a task of this scope; what its failure means is the scope's policy."""
        if self._closing:
            coro.close()
            raise RuntimeError(f"supervisor {self.path} is closing; refused to start task {name!r}")
        if self.parent is not None and self not in self.parent._scopes:  # used again after a close
            self.parent._scopes.append(self)
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
        where = f"{self.path}/{task.get_name()}"
        if self.policy == LOG and self.report is not None:
            self.report(where, exc)
            return
        if self.policy == LOG:
            logger.bind(event="task_failed", task=where, error=f"{type(exc).__name__}: {exc}").warning(
                "background task {} failed: {!r}", where, exc
            )
            return
        logger.opt(exception=exc).bind(event="task_crashed", task=where).error(
            "background task {} crashed: {!r}", where, exc
        )
        root = self
        while root.parent is not None:
            root = root.parent
        if root._on_crash is not None:
            root._on_crash(where, exc)

    def __len__(self) -> int:
        """Tasks running in this scope and its children."""
        return len(self._tasks) + sum(len(s) for s in self._scopes)

    def describe(self) -> dict[str, Any]:
        """Names of this scope's running tasks and of its child scopes, with their policies."""
        return {
            "name": self.name,
            "policy": self.policy,
            "tasks": sorted(t.get_name() for t in self._tasks),
            "scopes": [s.describe() for s in self._scopes],
        }

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task of this scope and its children and wait (bounded) for them;
        a closed child scope leaves its parent (and rejoins it if it spawns again)."""
        self._closing = True
        for child in list(self._scopes):
            await child.close(timeout)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                logger.bind(event="task_stuck", task=f"{self.path}/{t.get_name()}").warning(
                    "task {} did not stop within {}s", t.get_name(), timeout
                )
        self._tasks.clear()
        self._closing = False  # a part that starts again may use its scope again
        if self.parent is not None:
            with contextlib.suppress(ValueError):
                self.parent._scopes.remove(self)
