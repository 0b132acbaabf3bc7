"""The thing template: a registry of things any role or plugin can mount.

A "thing" is whatever a worker looks after (a book, a miner, a model, a
worker lease): an id, a type, tags, public `info`, private `opts`. The
framework owns persistence (SQLite, replayed on start), queries, snapshots on
an interval, the snapshot log and the RPC surface; the author subclasses
`ThingService` and overrides a few methods, as with LitServe or Triton's
Python backend::

    class Books(ThingService):
        TYPE = "book"

        def validate_thing(self, thing, previous):
            if not isinstance(thing.info.get("title"), str):
                raise bad_request("info.title must be a string")

        async def collect_thing_snap(self, thing):
            return {"is_available": True, "ts": now_ms()}

Every hook may be sync or async; one that runs before the commit may refuse the
call by raising (a SwarmdError keeps its code, anything else becomes
ERR_INTERNAL), and state is then unchanged. The order of the hooks in each
method: docs/things.md, "Hook order".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from loguru import logger

from swarmd.errors import ERR_INTERNAL, ERR_UNKNOWN_METHOD, SwarmdError
from swarmd.node.supervisor import LOG, Supervisor
from swarmd.rpc.params import ID_RE, bad_request, check_id
from swarmd.services.snaplog import SnapLog, SnapLogConfig
from swarmd.services.thing_methods import ThingMethods, maybe_await
from swarmd.services.thing_snapshots import ThingSnapshots
from swarmd.services.thing_store import Thing, ThingStore, now_ms

# Method name -> op ("w" writes state and is refused to read-only peers).
THING_METHODS: dict[str, str] = {
    "registerThing": "w",
    "updateThing": "w",
    "forgetThings": "w",
    "listThings": "r",
    "tailLog": "r",
}


@dataclass
class ThingsConfig:
    """[things]: limits and timings of every thing service on the node."""

    snapshot_interval_s: float = 30.0  # 0 turns the snapshot loop off
    snapshot_concurrency: int = 8  # snapshots collected at once
    snapshot_timeout_s: float = 10.0  # a slower snapshot records the thing offline
    list_default_limit: int = 100  # things per listThings page when the caller names no limit
    list_max_limit: int = 1000  # largest page a caller may ask for
    max_thing_bytes: int = 64 * 1024  # tags + info + opts as JSON
    max_ids: int = 10_000  # ids in one forgetThings call
    max_things: int = 100_000  # registrations past this are refused (ERR_TOO_LARGE): memory stays bounded
    log_max_bytes: int = 4 * 1024 * 1024  # snapshot log: rotate past this size
    log_keep_files: int = 8  # snapshot log: rotated files kept
    log_max_age_s: float = 7 * 24 * 3600.0  # snapshot log: rotated files older than this go

    def validate(self) -> None:
        """Refuse values that would stall or unbound the service, naming the key."""
        from swarmd.errors import ConfigError

        ConfigError.refuse_if(self, "things", "snapshot_interval_s log_max_age_s log_keep_files", lambda v: v < 0,
                              "be >= 0")
        ConfigError.refuse_if(self, "things", "snapshot_timeout_s", lambda v: v <= 0, "be > 0")
        ConfigError.refuse_if(self, "things", "snapshot_concurrency list_default_limit list_max_limit max_ids "
                              "max_things", lambda v: v < 1, "be >= 1")
        if self.list_default_limit > self.list_max_limit:
            raise ConfigError("things.list_default_limit must not exceed things.list_max_limit")
        if self.max_thing_bytes < 256 or self.log_max_bytes < 256:
            raise ConfigError("things.max_thing_bytes and things.log_max_bytes must be at least 256")

    def snaplog(self) -> SnapLogConfig:
        return SnapLogConfig(max_bytes=self.log_max_bytes, keep_files=self.log_keep_files, max_age_s=self.log_max_age_s)


def mount_handlers(
    methods: Any, handlers: Mapping[str, tuple[Callable[[Any], Awaitable[Any]], str]], prefix: str = ""
) -> list[str]:
    """Register `handlers` (name -> (handler(params), op)) as RPC methods
    `async def h(ctx, params)`; returns the names registered."""
    names = []
    for name, (fn, op) in handlers.items():
        async def handler(ctx: Any, params: Any, fn: Callable[[Any], Awaitable[Any]] = fn) -> Any:
            return await fn(params)

        methods.register(prefix + name, handler, op=op)
        names.append(prefix + name)
    return names


class Handlers:
    """mount() and call() over a class's handlers(): name -> (handler(params), op);
    `async with` runs the subclass's start() and stop()."""

    def handlers(self) -> dict[str, tuple[Callable[[Any], Awaitable[Any]], str]]:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()  # type: ignore[attr-defined]  # both subclasses have start() and stop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()  # type: ignore[attr-defined]

    def mount(self, methods: Any, prefix: str = "") -> list[str]:
        """Serve the methods on an RPC method table (swarmd.rpc.Methods).

        Writes are registered with op "w", so the node's firewall refuses them
        to read-only peers (ERR_FORBIDDEN) before the service sees the call.
        `prefix` lets one node serve several services ("books.listThings").
        """
        return mount_handlers(methods, self.handlers(), prefix)

    async def call(self, method: str, params: Any) -> Any:
        """Call a method in-process, exactly as a peer would over RPC."""
        entry = self.handlers().get(method)
        if entry is None:
            raise SwarmdError(ERR_UNKNOWN_METHOD, f"{type(self).__name__} has no method {method!r:.60}")
        return await entry[0](params)


class ThingService(Handlers, ThingMethods, ThingSnapshots):
    """Subclass and override the hooks; see the module docstring for their order.

    The RPC methods are `thing_methods.ThingMethods`, snapshots `thing_snapshots.ThingSnapshots`."""

    TYPE: ClassVar[str] = "thing"
    # Dotted paths (e.g. "info.isbn") no two things of this service may share.
    UNIQUE_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, data_dir: Path, config: ThingsConfig | None = None, *,
                 persist: bool = True) -> None:
        """persist=False keeps the table in an in-memory SQLite database: for
        registries whose entries are leases rebuilt from the network after a
        restart (an orchestrator's workers), where a disk write per renewal
        buys nothing. Everything else (hooks, queries, snapshots, log) is the same."""
        if not ID_RE.match(name):
            raise ValueError(f"thing service name {name!r} must match {ID_RE.pattern}")
        self.name = name
        self.config = config or ThingsConfig()
        self.dir = Path(data_dir) / "things" / name
        self.things: dict[str, Thing] = {}
        self.log = logger.bind(service=name)
        self.snaplog = SnapLog(self.dir / "log", "snap", self.config.snaplog())
        self.persist = persist
        self._store: ThingStore | None = None
        self._write_lock = asyncio.Lock()
        self.tasks: Supervisor | None = None  # the snapshot loop's scope, while started
        self._round_lock = asyncio.Lock()

    # ------------------------------------------------------------------ hooks

    def thing_type(self, params: Mapping[str, Any]) -> str:
        """The type of a new thing; override to derive subtypes from params."""
        return self.TYPE

    def thing_tags(self, thing: Thing) -> list[str]:
        """Tags the service adds to every thing (the seed's "t-<type>" convention)."""
        return [f"t-{thing.type}"]

    def select_thing_info(self, thing: Thing) -> dict[str, Any]:
        """The `info` peers see in listThings; `opts` is never shown."""
        return thing.info

    def make_thing_id(self, params: Mapping[str, Any]) -> str:
        """A new id; the caller's `id` param when given, else a random one."""
        given = params.get("id")
        if given is not None:
            return check_id(given, "registerThing: id")
        return uuid.uuid4().hex

    def validate_thing(self, thing: Thing, previous: Thing | None) -> Any:
        """Refuse a thing by raising (bad_request(...)); previous is None on register."""

    def setup(self) -> Any:
        """Once per start, before replay: acquire what the whole service needs
        (a bus, a client); raising fails the start."""

    def teardown(self) -> Any:
        """Once per stop, after every teardown_thing: release what setup acquired."""

    def setup_thing(self, thing: Thing) -> Any:
        """Acquire what the thing needs at run time (on register and on replay)."""

    def teardown_thing(self, thing: Thing) -> Any:
        """Release what setup_thing acquired (after forget and at stop)."""

    def on_register(self, thing: Thing) -> Any:
        """Last word before a new thing is committed."""

    def on_update(self, thing: Thing, previous: Thing) -> Any:
        """Last word before a changed thing is committed."""

    def on_forget(self, thing: Thing) -> Any:
        """Last word before a thing is deleted."""

    def on_list(self, views: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        """Filter or decorate matched views before sorting; return the list (or None to keep it)."""

    async def collect_thing_snap(self, thing: Thing) -> dict[str, Any] | None:
        """The thing's current state; overriding this turns the snapshot loop on."""
        return None

    # -------------------------------------------------------------- lifecycle

    @property
    def collects_snaps(self) -> bool:
        return type(self).collect_thing_snap is not ThingService.collect_thing_snap

    async def start(self, tasks: Supervisor | None = None) -> None:
        """Open the database, replay it into memory, start the snapshot loop (in a
        "things:NAME" scope of `tasks`, the node's Supervisor, when given)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._store = ThingStore(self.dir / "things.sqlite" if self.persist else None)
        try:
            await self._hook("setup")
        except BaseException:
            self._store.close()
            self._store = None
            raise
        await self.replay()
        if self.collects_snaps and self.config.snapshot_interval_s > 0:
            if self.tasks is None:
                scope = f"things:{self.name}"
                self.tasks = tasks.scope(scope) if tasks is not None else Supervisor(name=scope, policy=LOG)
            self.tasks.spawn(self._snapshot_loop(), name=f"things:{self.name}:snapshots")
        self.log.bind(event="things_started", count=len(self.things)).info(
            "thing service {} serving {} things", self.name, len(self.things)
        )

    async def stop(self) -> None:
        """Stop the loop (cancel and await it), tear things down, close the database."""
        if self.tasks is not None:
            await self.tasks.close()
        async with self._write_lock:  # let a write in flight commit before the database closes
            if self._store is not None:
                for thing in list(self.things.values()):
                    await self._quiet_hook("teardown_thing", thing)
                await self._quiet_hook("teardown")
                self._store.close()
                self._store = None

    async def replay(self) -> None:
        """Make memory equal the database: rows become things (runtime state of
        known ids is kept); in-memory things with no row are dropped."""
        store = self._require_store()
        rows = store.load_all()
        stored_ids = {r.id for r in rows}
        for tid in [t for t in self.things if t not in stored_ids]:
            gone = self.things.pop(tid)
            await self._quiet_hook("teardown_thing", gone)
            self.log.bind(event="thing_dropped", thing=tid).info("dropped {}: no stored row", tid)
        fresh: dict[str, Thing] = {}
        for row in rows:
            old = self.things.get(row.id)
            thing = Thing(**vars(row), last=old.last if old else {})
            if old is None:
                try:
                    await maybe_await(self.setup_thing(thing))
                except Exception as e:
                    err = self._error_of(e)
                    thing.last = {"ts": now_ms(), "online": False, "snap": None, "err": err.to_wire()}
                    self.log.bind(event="thing_setup_failed", thing=row.id, code=err.code).warning(
                        "setup of {} failed on replay: {}", row.id, err.message
                    )
            fresh[row.id] = thing
        self.things = fresh

    def _require_store(self) -> ThingStore:
        if self._store is None:
            raise SwarmdError(ERR_INTERNAL, f"thing service {self.name} is not started")
        return self._store

    def view(self, thing: Thing) -> dict[str, Any]:
        """What peers see of a thing: no opts; info through select_thing_info."""
        return {
            "id": thing.id,
            "type": thing.type,
            "tags": list(thing.tags),
            "info": self.select_thing_info(thing),
            "rev": thing.rev,
            "created": thing.created,
            "updated": thing.updated,
            "last": dict(thing.last),
        }

    def _match_view(self, thing: Thing) -> dict[str, Any]:
        """The view without copies, for matching only (never handed out)."""
        return {
            "id": thing.id, "type": thing.type, "tags": thing.tags, "info": self.select_thing_info(thing),
            "rev": thing.rev, "created": thing.created, "updated": thing.updated, "last": thing.last,
        }

    # ------------------------------------------------------------- dispatch

    def handlers(self) -> dict[str, tuple[Callable[[Any], Awaitable[Any]], str]]:
        """Method name -> (handler(params), op) for every RPC method of the service."""
        impl: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "registerThing": self.register_thing,
            "updateThing": self.update_thing,
            "forgetThings": self.forget_things,
            "listThings": self.list_things,
            "tailLog": self.tail_log,
        }
        return {name: (impl[name], op) for name, op in THING_METHODS.items()}


# What a plugin author imports from here (docs/things.md)
__all__ = ["THING_METHODS", "Thing", "ThingService", "ThingsConfig", "bad_request", "mount_handlers", "now_ms"]
