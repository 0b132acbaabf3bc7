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

Hook order (every hook may be sync or async). Hooks that run before the
commit may refuse the call by raising (a SwarmdError keeps its code, anything
else becomes ERR_INTERNAL); state is then unchanged.

  start        open the database -> `setup` (raising fails the start) ->
               replay: for each stored row, oldest first,
               `setup_thing` (a failure is logged and recorded in `last.err`,
               the thing stays registered) -> start the snapshot loop
  registerThing  check params -> `make_thing_id` (duplicate: ERR_CONFLICT) ->
               `thing_type` -> `thing_tags` -> `validate_thing(thing, None)` ->
               unique keys (ERR_CONFLICT) -> `setup_thing` -> `on_register`
               (refusal: `teardown_thing` undoes setup) -> commit
  updateThing  check params -> find (ERR_NOT_FOUND) -> `rev` check
               (ERR_CONFLICT) -> merge -> `thing_tags` (of previous, then of the
               merged thing: service tags follow info) -> `validate_thing(thing,
               previous)` -> unique keys -> `on_update(thing, previous)` -> commit
  forgetThings select (ids | query | all) -> `on_forget` for each (any refusal
               forgets nothing) -> commit (one transaction) -> `teardown_thing`
               for each (failures logged)
  listThings   query over public views -> `on_list(views, params)` -> sort ->
               offset/limit -> projection
  snapshots    every `snapshot_interval_s`: `collect_thing_snap` per thing, at
               most `snapshot_concurrency` at once, each bounded by
               `snapshot_timeout_s` (a timeout records the thing offline) ->
               `last` updated -> one JSON line per thing in the snapshot log
  stop         stop the snapshot loop -> `teardown_thing` for each ->
               `teardown` -> close
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from loguru import logger

from swarmd.errors import (
    ERR_CONFLICT,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.node.supervisor import LOG, Supervisor
from swarmd.services.params import (
    ID_RE,
    as_params,
    bad_request,
    check_id,
    check_keys,
    check_object,
    check_tags,
    int_param,
)
from swarmd.services.query import (
    apply_sort,
    compile_projection,
    compile_query,
    compile_sort,
    get_path,
)
from swarmd.services.snaplog import SnapLog, SnapLogConfig
from swarmd.services.thing_store import StoredThing, ThingStore

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

        for key in ("snapshot_interval_s", "log_max_age_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"things.{key} must be >= 0, got {getattr(self, key)}")
        if self.snapshot_timeout_s <= 0:
            raise ConfigError(f"things.snapshot_timeout_s must be > 0, got {self.snapshot_timeout_s}")
        for key in ("snapshot_concurrency", "list_default_limit", "list_max_limit", "max_ids", "max_things"):
            if getattr(self, key) < 1:
                raise ConfigError(f"things.{key} must be >= 1, got {getattr(self, key)}")
        if self.list_default_limit > self.list_max_limit:
            raise ConfigError("things.list_default_limit must not exceed things.list_max_limit")
        if self.max_thing_bytes < 256 or self.log_max_bytes < 256:
            raise ConfigError("things.max_thing_bytes and things.log_max_bytes must be at least 256")
        if self.log_keep_files < 0:
            raise ConfigError(f"things.log_keep_files must be >= 0, got {self.log_keep_files}")

    def snaplog(self) -> SnapLogConfig:
        return SnapLogConfig(max_bytes=self.log_max_bytes, keep_files=self.log_keep_files, max_age_s=self.log_max_age_s)


@dataclass
class Thing(StoredThing):
    """A registered thing in memory: its stored part plus its last snapshot.

    `last` is {"ts": ms, "online": bool, "snap": dict | None, "err": {code,
    message} | None}; it is runtime state, empty until the first snapshot.
    """

    last: dict[str, Any] = field(default_factory=dict)


def now_ms() -> int:
    return int(time.time() * 1000)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Shallow merge where a null value deletes the key (JSON merge-patch, one level)."""
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


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


class ThingService:
    """Subclass and override the hooks; see the module docstring for their order."""

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
                    await _maybe_await(self.setup_thing(thing))
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

    async def __aenter__(self) -> ThingService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- helpers

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

    def _error_of(self, e: BaseException) -> SwarmdError:
        if isinstance(e, SwarmdError):
            return e
        self.log.opt(exception=e).bind(event="hook_failed").error("a hook of {} raised {!r}", self.name, e)
        return SwarmdError(ERR_INTERNAL, f"{type(e).__name__} in a hook of thing service {self.name}")

    async def _hook(self, name: str, *args: Any) -> Any:
        """Run a refusing hook: its exception becomes a SwarmdError for the caller."""
        try:
            return await _maybe_await(getattr(self, name)(*args))
        except Exception as e:
            raise self._error_of(e) from None

    async def _quiet_hook(self, name: str, *args: Any) -> None:
        """Run a hook whose failure cannot undo anything: log it and go on."""
        try:
            await _maybe_await(getattr(self, name)(*args))
        except Exception as e:
            self.log.opt(exception=e).bind(event="hook_failed", hook=name).warning(
                "{} of {} failed: {!r}", name, self.name, e
            )

    def _check_size(self, thing: StoredThing, method: str) -> None:
        try:
            body = ThingStore.encode_body(thing)
        except (TypeError, ValueError, RecursionError) as e:
            raise bad_request(f"{method}: tags, info and opts must be plain JSON (no bytes, NaN or deep nesting): {e}") from None
        if len(body) > self.config.max_thing_bytes:
            raise SwarmdError(
                ERR_TOO_LARGE,
                f"{method}: tags, info and opts take {len(body)} bytes as JSON; at most {self.config.max_thing_bytes}",
            )

    def _check_unique(self, thing: Thing) -> None:
        for path in self.UNIQUE_KEYS:
            value = get_path({"info": thing.info, "opts": thing.opts, "type": thing.type}, path)
            if value is None or not isinstance(value, (str, int, float)):
                continue
            for other in self.things.values():
                if other.id == thing.id:
                    continue
                if get_path({"info": other.info, "opts": other.opts, "type": other.type}, path) == value:
                    raise SwarmdError(
                        ERR_CONFLICT, f"{path} {value!r:.60} is already used by thing {other.id}", {"id": other.id}
                    )

    def _with_service_tags(self, thing: Thing, user_tags: list[str]) -> list[str]:
        tags = list(user_tags)
        for t in self.thing_tags(thing):
            if t not in tags:
                tags.append(t)
        return tags

    # ------------------------------------------------------------ the methods

    async def register_thing(self, params: Any) -> dict[str, Any]:
        """registerThing {id?, tags?, info?, opts?} -> the thing's public view."""
        m = "registerThing"
        p = as_params(params, m)
        check_keys(p, m, ("id", "tags", "info", "opts"))
        tags = check_tags(p.get("tags", []), m)
        info = check_object(p.get("info", {}), "info", m)
        opts = check_object(p.get("opts", {}), "opts", m)
        async with self._write_lock:
            store = self._require_store()
            tid = check_id(await self._hook("make_thing_id", p), f"{m}: id")
            if tid in self.things:
                raise SwarmdError(ERR_CONFLICT, f"{m}: thing {tid} is already registered; use updateThing", {"id": tid})
            if len(self.things) >= self.config.max_things:
                raise SwarmdError(
                    ERR_TOO_LARGE, f"{m}: {self.name} already holds {len(self.things)} things, its max_things"
                )
            ttype = await self._hook("thing_type", p)
            if not isinstance(ttype, str) or not ID_RE.match(ttype):
                raise SwarmdError(ERR_INTERNAL, f"thing_type of {self.name} returned {ttype!r:.40}, not a type name")
            ts = now_ms()
            thing = Thing(id=tid, type=ttype, tags=tags, info=info, opts=opts, rev=1, created=ts, updated=ts)
            thing.tags = self._with_service_tags(thing, tags)
            self._check_size(thing, m)
            await self._hook("validate_thing", thing, None)
            self._check_unique(thing)
            await self._hook("setup_thing", thing)
            try:
                await self._hook("on_register", thing)
                store.put(thing)
            except BaseException:
                await self._quiet_hook("teardown_thing", thing)
                raise
            self.things[tid] = thing
        self.log.bind(event="thing_registered", thing=tid, type=ttype).info("registered {}", tid)
        return self.view(thing)

    async def update_thing(self, params: Any) -> dict[str, Any]:
        """updateThing {id, rev?, tags?, info?, opts?}: info/opts merged (null
        deletes a key), tags replaced; `rev` guards against lost updates."""
        m = "updateThing"
        p = as_params(params, m)
        check_keys(p, m, ("id", "rev", "tags", "info", "opts"))
        tid = check_id(p.get("id"), f"{m}: id")
        rev = p.get("rev")
        if rev is not None and (not isinstance(rev, int) or isinstance(rev, bool)):
            raise bad_request(f"{m}: rev must be an integer, got {rev!r:.40}")
        tags = check_tags(p["tags"], m) if "tags" in p else None
        info = check_object(p["info"], "info", m) if "info" in p else None
        opts = check_object(p["opts"], "opts", m) if "opts" in p else None
        async with self._write_lock:
            store = self._require_store()
            previous = self.things.get(tid)
            if previous is None:
                raise SwarmdError(ERR_NOT_FOUND, f"{m}: no thing with id {tid}", {"id": tid})
            if rev is not None and rev != previous.rev:
                raise SwarmdError(
                    ERR_CONFLICT,
                    f"{m}: thing {tid} is at rev {previous.rev}, not {rev}; list it again and retry",
                    {"id": tid, "rev": previous.rev},
                )
            thing = Thing(
                id=tid,
                type=previous.type,
                tags=list(previous.tags),
                info=_merge(previous.info, info) if info is not None else dict(previous.info),
                opts=_merge(previous.opts, opts) if opts is not None else dict(previous.opts),
                rev=previous.rev + 1,
                created=previous.created,
                updated=max(now_ms(), previous.updated),
                last=previous.last,
            )
            # Service tags may follow info (a "lost" tag), so they are recomputed on
            # every update; the caller's own tags are kept unless replaced.
            if tags is None:
                service_before = set(self.thing_tags(previous))
                tags = [t for t in previous.tags if t not in service_before]
            thing.tags = self._with_service_tags(thing, tags)
            self._check_size(thing, m)
            await self._hook("validate_thing", thing, previous)
            self._check_unique(thing)
            await self._hook("on_update", thing, previous)
            store.put(thing)
            self.things[tid] = thing
        self.log.bind(event="thing_updated", thing=tid, rev=thing.rev).info("updated {}", tid)
        return self.view(thing)

    async def forget_things(self, params: Any) -> dict[str, Any]:
        """forgetThings {ids} | {query} | {all: true} -> {forgotten: [ids], missing: [ids]}."""
        m = "forgetThings"
        p = as_params(params, m)
        check_keys(p, m, ("ids", "query", "all"))
        chosen = [k for k in ("ids", "query", "all") if p.get(k) is not None]
        if len(chosen) != 1:
            raise bad_request(f"{m}: give exactly one of ids, query or all (true)")
        async with self._write_lock:
            store = self._require_store()
            missing: list[str] = []
            if "ids" in chosen:
                ids = p["ids"]
                if not isinstance(ids, list) or len(ids) > self.config.max_ids:
                    raise bad_request(f"{m}: ids must be a list of at most {self.config.max_ids} ids")
                targets = []
                for i in ids:
                    check_id(i, f"{m}: each id")
                    if i in self.things:
                        if self.things[i] not in targets:
                            targets.append(self.things[i])
                    elif i not in missing:
                        missing.append(i)
            elif "query" in chosen:
                pred = self._compile(compile_query, p["query"], m, "query")
                targets = [t for t in self.things.values() if pred(self._match_view(t))]
            else:
                if p["all"] is not True:
                    raise bad_request(f"{m}: all must be true when given")
                targets = list(self.things.values())
            for thing in targets:
                await self._hook("on_forget", thing)
            store.delete([t.id for t in targets])
            for thing in targets:
                self.things.pop(thing.id, None)
        for thing in targets:
            await self._quiet_hook("teardown_thing", thing)
        if targets:
            self.log.bind(event="things_forgotten", count=len(targets)).info("forgot {} things", len(targets))
        return {"forgotten": [t.id for t in targets], "missing": missing}

    @staticmethod
    def _compile(fn: Callable[[Any], Any], arg: Any, method: str, key: str) -> Any:
        try:
            return fn(arg)
        except ValueError as e:
            raise bad_request(f"{method}: {key}: {e}") from None

    async def list_things(self, params: Any) -> list[dict[str, Any]]:
        """listThings {query?, fields?, sort?, offset?, limit?} -> public views."""
        m = "listThings"
        p = as_params(params, m)
        check_keys(p, m, ("query", "fields", "sort", "offset", "limit"))
        query = p.get("query")
        pred = self._compile(compile_query, {} if query is None else query, m, "query")
        project = self._compile(compile_projection, p.get("fields"), m, "fields")
        sort = self._compile(compile_sort, p.get("sort"), m, "sort")
        offset = int_param(p, "offset", m, 0, 0, 2**31)
        limit = int_param(p, "limit", m, self.config.list_default_limit, 0, self.config.list_max_limit)
        views = [self.view(t) for t in self.things.values() if pred(self._match_view(t))]
        hooked = await self._hook("on_list", views, p)
        if hooked is not None:
            views = list(hooked)
        if sort:
            views = list(apply_sort(views, sort))
        views = views[offset: offset + limit]
        if project is not None:
            views = [project(v) for v in views]
        return views

    async def tail_log(self, params: Any) -> list[dict[str, Any]]:
        """tailLog {id?|ids?, type?, start?, end? (ms), offset?, limit?} -> entries, newest first."""
        m = "tailLog"
        p = as_params(params, m)
        check_keys(p, m, ("id", "ids", "type", "start", "end", "offset", "limit"))
        ids: set[str] | None = None
        if p.get("id") is not None:
            ids = {check_id(p["id"], f"{m}: id")}
        if p.get("ids") is not None:
            if not isinstance(p["ids"], list) or len(p["ids"]) > self.config.max_ids:
                raise bad_request(f"{m}: ids must be a list of at most {self.config.max_ids} ids")
            ids = (ids or set()) | {check_id(i, f"{m}: each id") for i in p["ids"]}
        ttype = p.get("type")
        if ttype is not None and not isinstance(ttype, str):
            raise bad_request(f"{m}: type must be a string")
        start = int_param(p, "start", m, 0, 0, 2**63 - 1)
        end = int_param(p, "end", m, 2**63 - 1, 0, 2**63 - 1)
        offset = int_param(p, "offset", m, 0, 0, 2**31)
        limit = int_param(p, "limit", m, self.config.list_default_limit, 0, self.config.list_max_limit)
        if limit == 0:
            return []

        def match(e: dict[str, Any]) -> bool:
            ts = e.get("ts")
            if not isinstance(ts, int) or not start <= ts <= end:
                return False
            if ids is not None and e.get("id") not in ids:
                return False
            return ttype is None or e.get("type") == ttype

        return self.snaplog.tail(limit, offset, match)

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

    def mount(self, methods: Any, prefix: str = "") -> list[str]:
        """Serve the thing methods on an RPC method table (swarmd.rpc.Methods).

        Writes are registered with op "w", so the node's firewall refuses them
        to read-only peers (ERR_FORBIDDEN) before the service sees the call.
        `prefix` lets one node serve several services ("books.listThings").
        """
        return mount_handlers(methods, self.handlers(), prefix)

    async def call(self, method: str, params: Any) -> Any:
        """Call a method in-process, exactly as a peer would over RPC."""
        entry = self.handlers().get(method)
        if entry is None:
            raise SwarmdError(ERR_UNKNOWN_METHOD, f"thing service {self.name} has no method {method!r:.60}")
        return await entry[0](params)

    # ------------------------------------------------------------- snapshots

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
                snap = await _maybe_await(self.collect_thing_snap(thing))
            if snap is not None and not isinstance(snap, dict):
                err = SwarmdError(ERR_INTERNAL, f"collect_thing_snap returned {type(snap).__name__}, not an object")
                snap = None
        except TimeoutError:
            err = SwarmdError(ERR_TIMEOUT, f"snapshot of {thing.id} took longer than {timeout}s")
        except Exception as e:
            err = self._error_of(e) if isinstance(e, SwarmdError) else SwarmdError(
                ERR_INTERNAL, f"{type(e).__name__}: {e}"[:200]
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
            entry = {"ts": ts, "id": thing.id, "type": thing.type, "online": False,
                     "err": {"code": ERR_INTERNAL, "message": msg}}
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
