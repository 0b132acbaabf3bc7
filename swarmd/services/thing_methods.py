"""The RPC methods of a thing service and the running of its hooks.

registerThing, updateThing, forgetThings, listThings and tailLog check their
params (swarmd.rpc.params), run the author's hooks in the documented order
(swarmd.services.things) and commit to the store under one write lock. A hook
that refuses raises: a SwarmdError keeps its code, anything else becomes
ERR_INTERNAL. `ThingMethods` is a mixin of `ThingService`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from swarmd.errors import (
    ERR_CONFLICT,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_TOO_LARGE,
    SwarmdError,
)
from swarmd.rpc.params import (
    ID_RE,
    as_params,
    bad_request,
    check_id,
    check_keys,
    check_object,
    check_tags,
    int_param,
    str_param,
)
from swarmd.services.query import (
    apply_sort,
    compile_projection,
    compile_query,
    compile_sort,
    get_path,
)
from swarmd.services.snaplog import SnapLog
from swarmd.services.thing_store import StoredThing, Thing, ThingStore, now_ms

if TYPE_CHECKING:
    from swarmd.services.things import ThingsConfig


async def maybe_await(value: Any) -> Any:
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


class ThingMethods:
    """register/update/forget/list/tail, and the hook runners they share."""

    name: str
    config: ThingsConfig
    things: dict[str, Thing]
    log: Any
    snaplog: SnapLog
    UNIQUE_KEYS: ClassVar[tuple[str, ...]]
    _write_lock: asyncio.Lock

    if TYPE_CHECKING:  # provided by ThingService

        def thing_tags(self, thing: Thing) -> list[str]: ...

        def view(self, thing: Thing) -> dict[str, Any]: ...

        def _match_view(self, thing: Thing) -> dict[str, Any]: ...

        def _require_store(self) -> ThingStore: ...

    def _error_of(self, e: BaseException) -> SwarmdError:
        if isinstance(e, SwarmdError):
            return e
        self.log.opt(exception=e).bind(event="hook_failed").error("a hook of {} raised {!r}", self.name, e)
        return SwarmdError(ERR_INTERNAL, f"{type(e).__name__} in a hook of thing service {self.name}")

    async def _hook(self, name: str, *args: Any) -> Any:
        """Run a refusing hook: its exception becomes a SwarmdError for the caller."""
        try:
            return await maybe_await(getattr(self, name)(*args))
        except Exception as e:
            raise self._error_of(e) from None

    async def _quiet_hook(self, name: str, *args: Any) -> None:
        """Run a hook whose failure cannot undo anything: log it and go on."""
        try:
            await maybe_await(getattr(self, name)(*args))
        except Exception as e:
            self.log.opt(exception=e).bind(event="hook_failed", hook=name).warning(
                "{} of {} failed: {!r}", name, self.name, e
            )

    def _check_size(self, thing: StoredThing, method: str) -> None:
        try:
            body = ThingStore.encode_body(thing)
        except (TypeError, ValueError, RecursionError) as e:
            raise bad_request(
                f"{method}: tags, info and opts must be plain JSON (no bytes, NaN or deep nesting): {e}"
            ) from None
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
                        ERR_CONFLICT,
                        f"{path} {value!r:.60} is already used by thing {other.id}",
                        {"id": other.id},
                    )

    def _ids(self, v: Any, m: str) -> list[str]:
        """A caller's list of thing ids, each checked, at most things.max_ids of them."""
        if not isinstance(v, list) or len(v) > self.config.max_ids:
            raise bad_request(f"{m}: ids must be a list of at most {self.config.max_ids} ids")
        return [check_id(i, f"{m}: each id") for i in v]

    def _with_service_tags(self, thing: Thing, user_tags: list[str]) -> list[str]:
        tags = list(user_tags)
        for t in self.thing_tags(thing):
            if t not in tags:
                tags.append(t)
        return tags

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
                raise SwarmdError(
                    ERR_CONFLICT, f"{m}: thing {tid} is already registered; use updateThing", {"id": tid}
                )
            if len(self.things) >= self.config.max_things:
                raise SwarmdError(
                    ERR_TOO_LARGE, f"{m}: {self.name} already holds {len(self.things)} things, its max_things"
                )
            ttype = await self._hook("thing_type", p)
            if not isinstance(ttype, str) or not ID_RE.match(ttype):
                raise SwarmdError(
                    ERR_INTERNAL, f"thing_type of {self.name} returned {ttype!r:.40}, not a type name"
                )
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
                targets = []
                for i in self._ids(p["ids"], m):
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
        views = views[offset : offset + limit]
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
            ids = (ids or set()) | set(self._ids(p["ids"], m))
        ttype = str_param(p, "type", m)
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
