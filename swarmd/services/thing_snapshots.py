"""Snapshots of a thing service: every thing's `collect_thing_snap`, on an interval, into the log.

A round is bounded twice: a fixed pool of `snapshot_concurrency` workers, and a
timeout per thing (a slower one is recorded offline). Each entry is one JSON
line in the snapshot log (swarmd.services.snaplog) and the thing's `last`.
`ThingSnapshots` is a mixin of `ThingService`.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from swarmd.errors import (
    ERR_INTERNAL,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.services.snaplog import SnapLog
from swarmd.services.thing_methods import maybe_await
from swarmd.services.thing_store import Thing, now_ms

if TYPE_CHECKING:
    from swarmd.services.things import ThingsConfig


class ThingSnapshots:
    """collect_snaps and the loop that runs it."""

    name: str
    config: ThingsConfig
    things: dict[str, Thing]
    log: Any
    snaplog: SnapLog
    _round_lock: asyncio.Lock

    if TYPE_CHECKING:  # provided by ThingService and ThingMethods

        async def collect_thing_snap(self, thing: Thing) -> dict[str, Any] | None: ...

        def _error_of(self, e: BaseException) -> SwarmdError: ...

    async def collect_snaps(self) -> list[dict[str, Any]]:
        """One snapshot round over every thing; returns the log entries written.

        Bounded twice: a semaphore caps concurrent collections, and each one
        has its own timeout, so one stuck device costs one slot for at most
        `snapshot_timeout_s` and shows up as offline.
        """
        async with self._round_lock:
            things = list(self.things.values())
            entries: list[dict[str, Any] | None] = [None] * len(things)
            pending = iter(enumerate(things))

            async def worker() -> None:
                # A fixed pool of workers rather than a task per thing: the cap
                # holds by construction and a round over 10k things makes
                # `snapshot_concurrency` tasks, not 10k.
                for i, thing in pending:
                    entries[i] = await self._collect_one(thing)

            async with asyncio.TaskGroup() as tg:
                for _ in range(min(max(1, self.config.snapshot_concurrency), len(things))):
                    tg.create_task(worker())
            done = [e for e in entries if e is not None]
            self.snaplog.append(done)
            return done

    async def _collect_one(self, thing: Thing) -> dict[str, Any]:
        timeout = self.config.snapshot_timeout_s
        err: SwarmdError | None = None
        snap: Any = None
        try:
            async with asyncio.timeout(timeout):
                snap = await maybe_await(self.collect_thing_snap(thing))
            if snap is not None and not isinstance(snap, dict):
                err = SwarmdError(
                    ERR_INTERNAL, f"collect_thing_snap returned {type(snap).__name__}, not an object"
                )
                snap = None
        except TimeoutError:
            err = SwarmdError(ERR_TIMEOUT, f"snapshot of {thing.id} took longer than {timeout}s")
        except Exception as e:
            err = (
                self._error_of(e)
                if isinstance(e, SwarmdError)
                else SwarmdError(ERR_INTERNAL, f"{type(e).__name__}: {e}"[:200])
            )
        ts = now_ms()
        entry: dict[str, Any] = {"ts": ts, "id": thing.id, "type": thing.type, "online": err is None}
        # An update during the collection replaced the Thing object: record on the current one.
        thing = self.things.get(thing.id, thing)
        if err is None:
            entry["snap"] = snap
            thing.last = {"ts": ts, "online": True, "snap": snap, "err": None}
        else:
            entry["err"] = err.to_wire()
            thing.last = {"ts": ts, "online": False, "snap": None, "err": err.to_wire()}
            self.log.bind(event="snapshot_failed", thing=thing.id, code=err.code).debug(
                "snapshot of {} failed: {}", thing.id, err.message
            )
        try:
            json.dumps(entry, allow_nan=False)
        except (TypeError, ValueError):
            msg = "collect_thing_snap returned a value that is not plain JSON"
            entry = {
                "ts": ts,
                "id": thing.id,
                "type": thing.type,
                "online": False,
                "err": {"code": ERR_INTERNAL, "message": msg},
            }
            thing.last = {"ts": ts, "online": False, "snap": None, "err": entry["err"]}
        return entry

    async def _snapshot_loop(self) -> None:
        interval = self.config.snapshot_interval_s
        while True:
            try:
                await self.collect_snaps()
                self.snaplog.prune()
            except OSError as e:  # a full disk must not stop collection; say so once per round
                self.log.bind(event="snaplog_write_failed").warning("snapshot log write failed: {}", e)
            await asyncio.sleep(interval)
