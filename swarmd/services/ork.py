"""ork: a registry of racks (peers serving a thing service) that fans calls out to them.

Two kinds of rack: manual ones (`registerRack`, the seed's only way) persist as things of
type "rack" in the ork's own thing service; discovered ones (the DHT topic RACKS) live by
a lease and are never written to disk (the DHT is their source of truth). A thing method
called on the ork goes to every selected rack at once, and each rack answers with its
result or its error, so one rack down never fails the call. Methods, params and how a
rack is reached (`SwarmRackCaller`, `RpcRackCaller`): docs/things.md, "ork".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_HANDSHAKE,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.node.address import format_hostport, parse_hostport
from swarmd.node.deadline import within
from swarmd.node.identity import parse_public_key
from swarmd.node.supervisor import LOG, Supervisor
from swarmd.rpc.params import as_params, bad_request, check_id, check_keys, str_param
from swarmd.services.query import apply_sort, compile_sort
from swarmd.services.things import THING_METHODS, Handlers, Thing, ThingsConfig, ThingService

MAX_ADDRESSES = 8

# The ork's own methods (op as for THING_METHODS); the thing methods are proxied on top.
ORK_METHODS: dict[str, str] = {
    "registerRack": "w",
    "forgetRacks": "w",
    "listRacks": "r",
}


@dataclass
class OrkConfig:
    """[ork]: how long racks live and how calls fan out."""

    call_timeout_s: float = 10.0  # per rack, per call
    fanout_concurrency: int = 32  # racks called at once
    lease_s: float = 120.0  # a discovered rack not seen for this long leaves
    discover_interval_s: float = 30.0  # how often the RACKS topic is looked up

    def validate(self) -> None:
        from swarmd.errors import ConfigError

        ConfigError.refuse_if(self, "ork", "call_timeout_s lease_s", lambda v: v <= 0, "be > 0")
        ConfigError.refuse_if(self, "ork", "discover_interval_s", lambda v: v < 0, "be >= 0")
        ConfigError.refuse_if(self, "ork", "fanout_concurrency", lambda v: v < 1, "be >= 1")


@dataclass
class Rack:
    """Where a thing service is served and how to tell peers about it."""

    id: str
    public_key: str  # hex Ed25519 key: the rack's identity and address
    addresses: list[str] = field(default_factory=list)  # HOST:PORT to dial, best first
    type: str = ""  # the kind of things it serves ("book"), informative
    info: dict[str, Any] = field(default_factory=dict)
    source: str = "manual"  # "manual" (registerRack) or "dht" (announced on RACKS)
    expires: float | None = None  # wall-clock seconds; None for manual racks

    def view(self, with_key: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "addresses": list(self.addresses),
            "info": dict(self.info),
            "source": self.source,
        }
        if self.expires is not None:
            out["expires"] = int(self.expires * 1000)
        if with_key:
            out["public_key"] = self.public_key
        return out


class RackCaller(Protocol):
    async def __call__(self, rack: Rack, method: str, params: Any, timeout: float) -> Any: ...  # noqa: ASYNC109


def check_addresses(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > MAX_ADDRESSES:
        raise bad_request(f"{what} must be a list of at most {MAX_ADDRESSES} HOST:PORT strings")
    for i, a in enumerate(v):
        parse_hostport(a, what=f"{what}[{i}]", error=bad_request)
    return list(v)


def _addr_text(a: Any) -> Any:
    """("host", port) as DHT records carry it -> "host:port"; text passes through."""
    if isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int):
        return format_hostport(a[0], a[1])
    return a


class RackBook(ThingService):
    """The ork's manual racks, persisted as things of type "rack"."""

    TYPE = "rack"
    UNIQUE_KEYS = ("info.public_key",)

    def validate_thing(self, thing: Thing, previous: Thing | None) -> None:
        thing.info["public_key"] = parse_public_key(thing.info.get("public_key"), "info.public_key").hex()
        thing.info["addresses"] = check_addresses(thing.info.get("addresses", []), "info.addresses")
        rtype = thing.info.get("type", "")
        if not isinstance(rtype, str) or len(rtype) > 64:
            raise bad_request(f"info.type must be a string of at most 64 characters, got {rtype!r:.80}")


def rack_of(thing: Thing) -> Rack:
    info = {k: v for k, v in thing.info.items() if k not in ("public_key", "addresses", "type")}
    return Rack(
        id=thing.id,
        public_key=thing.info["public_key"],
        addresses=list(thing.info.get("addresses", [])),
        type=str(thing.info.get("type", "")),
        info=info,
    )


# Returns the current records of the RACKS topic: objects with public_key,
# addresses ((host, port) pairs or "host:port") and payload, such as the DHT's
# PeerRecord (`lambda: dht.lookup_all(topic_from_name(RACKS), timeout=5)`).
RackLookup = Callable[[], Awaitable[Iterable[Any]]]


def rack_payload(rack_id: str, rack_type: str) -> dict[str, Any]:
    """What a rack announces on RACKS so orks list it under a readable id."""
    return {"id": check_id(rack_id, "rack id"), "type": rack_type}


class Ork(Handlers):
    """The rack registry and its fan-out. Owns a RackBook (manual racks) and
    the leases of discovered racks; `caller` reaches a rack; `lookup`, when
    given, is polled every `discover_interval_s` by a task the Ork owns."""

    def __init__(
        self,
        data_dir: Path,
        caller: RackCaller,
        config: OrkConfig | None = None,
        things_config: ThingsConfig | None = None,
        clock: Callable[[], float] = time.time,
        lookup: RackLookup | None = None,
    ) -> None:
        self.config = config or OrkConfig()
        self.book = RackBook("ork-racks", data_dir, things_config or ThingsConfig(snapshot_interval_s=0))
        self.caller = caller
        self.discovered: dict[str, Rack] = {}  # public key hex -> rack with a lease
        self._clock = clock
        self._lookup = lookup
        self.tasks: Supervisor | None = None  # the discovery loop's scope, while started
        self.log = logger.bind(service="ork")

    async def start(self, tasks: Supervisor | None = None) -> None:
        """Open the rack book and start discovery, in an "ork" scope of `tasks` (the node's
        Supervisor) when given."""
        if self.tasks is None:
            self.tasks = tasks.scope("ork") if tasks is not None else Supervisor(name="ork", policy=LOG)
        await self.book.start(self.tasks)
        if self._lookup is not None and self.config.discover_interval_s > 0:
            self.tasks.spawn(self._discover_loop(), name="ork:discover")

    async def stop(self) -> None:
        if self.tasks is not None:
            await self.tasks.close()
        await self.book.stop()

    async def discover_once(self) -> int:
        """One lookup of RACKS: renew or add every announced rack, expire the rest."""
        if self._lookup is None:
            return 0
        records = await within(self._lookup(), timeout=max(self.config.call_timeout_s, 1.0))
        seen = 0
        for rec in records:
            if self.observe(getattr(rec, "public_key", None), getattr(rec, "addresses", ()),
                            getattr(rec, "payload", None)) is not None:
                seen += 1
        self.expire()
        return seen

    async def _discover_loop(self) -> None:
        while True:
            try:
                await self.discover_once()
            except (SwarmdError, TimeoutError, OSError) as e:  # the DHT is down or slow: try again later
                self.log.bind(event="rack_lookup_failed").warning("looking up racks failed: {!r}", e)
            await asyncio.sleep(self.config.discover_interval_s)

    # ----------------------------------------------------------------- racks

    def racks(self) -> list[Rack]:
        """Every live rack: manual ones first (registration order), then discovered.

        A key registered by hand shadows the same key discovered on the DHT,
        so a rack is never called twice.
        """
        self.expire()
        manual = [rack_of(t) for t in self.book.things.values()]
        keys = {r.public_key for r in manual}
        return manual + [r for r in self.discovered.values() if r.public_key not in keys]

    def observe(self, public_key: str | bytes, addresses: Any, payload: Any) -> Rack | None:
        """A rack announced itself on RACKS: add it or renew its lease.

        Payloads come from other peers: anything malformed is ignored with a
        debug line (the announcer's problem, not ours).
        """
        try:
            pk = parse_public_key(public_key, "rack public key").hex()
            if not isinstance(addresses, (list, tuple)):
                raise bad_request("rack addresses must be a list")
            addrs = check_addresses([_addr_text(a) for a in list(addresses)[:MAX_ADDRESSES]], "rack addresses")
            p = payload if isinstance(payload, Mapping) else {}
            rid = p.get("id", pk[:16])
            check_id(rid, "rack id")
            rtype = p.get("type", "")
            if not isinstance(rtype, str) or len(rtype) > 64:
                rtype = ""
        except SwarmdError as e:
            self.log.bind(event="rack_announce_refused").debug("ignored a rack announcement: {}", e.message)
            return None
        expires = self._clock() + self.config.lease_s
        rack = self.discovered.get(pk)
        if rack is None:
            rack = Rack(id=rid, public_key=pk, addresses=addrs, type=rtype, source="dht", expires=expires)
            self.discovered[pk] = rack
            self.log.bind(event="rack_discovered", rack=rid).info("rack {} joined through the DHT", rid)
        else:
            rack.id, rack.addresses, rack.type, rack.expires = rid, addrs, rtype, expires
        return rack

    def expire(self) -> list[Rack]:
        """Drop discovered racks whose lease ran out; returns them."""
        now = self._clock()
        gone = [r for r in self.discovered.values() if r.expires is not None and r.expires <= now]
        for r in gone:
            del self.discovered[r.public_key]
            self.log.bind(event="rack_expired", rack=r.id).info("rack {} left: lease expired", r.id)
        return gone

    def select(self, ids: Any) -> list[Rack]:
        """The racks named by `ids` (all when None); an unknown id is ERR_NOT_FOUND."""
        racks = self.racks()
        if ids is None:
            return racks
        if not isinstance(ids, list) or not ids:
            raise bad_request("racks must be a non-empty list of rack ids")
        by_id = {r.id: r for r in racks}
        out = []
        for i in ids:
            check_id(i, "each rack id")
            if i not in by_id:
                raise SwarmdError(ERR_NOT_FOUND, f"no rack with id {i}", {"rack": i})
            if by_id[i] not in out:
                out.append(by_id[i])
        return out

    # -------------------------------------------------------- rack methods

    async def register_rack(self, params: Any) -> dict[str, Any]:
        """registerRack {id, public_key, addresses?, type?, info?} -> the rack (with key)."""
        m = "registerRack"
        p = as_params(params, m)
        check_keys(p, m, ("id", "public_key", "addresses", "type", "info"))
        rid = check_id(p.get("id"), f"{m}: id")
        info = dict(p.get("info") or {}) if isinstance(p.get("info", {}), Mapping) else None
        if info is None:
            raise bad_request(f"{m}: info must be an object")
        for k in ("public_key", "addresses", "type"):
            info.pop(k, None)
        info["public_key"] = parse_public_key(p.get("public_key"), f"{m}: public_key").hex()
        info["addresses"] = check_addresses(p.get("addresses", []), f"{m}: addresses")
        info["type"] = p.get("type", "")
        view = await self.book.register_thing({"id": rid, "info": info})
        rack = rack_of(self.book.things[view["id"]])
        return rack.view(with_key=True)

    async def forget_racks(self, params: Any) -> dict[str, Any]:
        """forgetRacks {ids} | {all: true}: manual racks only (discovered ones expire)."""
        m = "forgetRacks"
        p = as_params(params, m)
        check_keys(p, m, ("ids", "all"))
        return await self.book.forget_things(p)

    async def list_racks(self, params: Any) -> list[dict[str, Any]]:
        """listRacks {keys?: bool, type?, source?} -> racks; public keys only when keys is true."""
        m = "listRacks"
        p = as_params(params, m)
        check_keys(p, m, ("keys", "type", "source"))
        keys = p.get("keys", False)
        if not isinstance(keys, bool):
            raise bad_request(f"{m}: keys must be true or false")
        rtype, source = str_param(p, "type", m), p.get("source")
        if source not in (None, "manual", "dht"):
            raise bad_request(f"{m}: source must be \"manual\" or \"dht\"")
        return [
            r.view(with_key=keys)
            for r in self.racks()
            if (rtype is None or r.type == rtype) and (source is None or r.source == source)
        ]

    # -------------------------------------------------------------- fan-out

    async def fan_out(self, method: str, params: Any) -> list[dict[str, Any]]:
        """Call `method` on the selected racks at once: one entry per rack, in
        rack order, each {"rack", "ok": true, "result"} or {"rack", "ok": false, "error"}."""
        p = as_params(params, method)
        racks = self.select(p.pop("racks", None))
        sem = asyncio.Semaphore(max(1, self.config.fanout_concurrency))
        timeout = self.config.call_timeout_s

        async def one(rack: Rack) -> dict[str, Any]:
            async with sem:
                try:
                    result = await within(self.caller(rack, method, p, timeout), timeout=timeout + 1.0)
                    return {"rack": rack.id, "ok": True, "result": result}
                except SwarmdError as e:
                    err = e
                except TimeoutError:
                    err = SwarmdError(ERR_UNAVAILABLE, f"rack {rack.id} did not answer {method} within {timeout}s")
                except Exception as e:  # one rack's bug must not fail the whole call
                    self.log.bind(event="rack_call_failed", rack=rack.id).warning("{} on {}: {!r}", method, rack.id, e)
                    err = SwarmdError(ERR_INTERNAL, f"{type(e).__name__} calling rack {rack.id}")
                return {"rack": rack.id, "ok": False, "error": err.to_wire()}

        return list(await asyncio.gather(*(one(r) for r in racks)))

    async def proxy(self, method: str, params: Any) -> dict[str, Any]:
        """A thing method across racks: {"results": per-rack entries} and, for
        listThings and tailLog, the merged items tagged with their rack."""
        if method not in THING_METHODS:
            raise SwarmdError(ERR_BAD_REQUEST, f"ork does not proxy {method!r:.40}")
        p = as_params(params, method)
        results = await self.fan_out(method, p)
        out: dict[str, Any] = {"results": results}
        if method == "listThings":
            merged = [{**item, "rack": r["rack"]} for r in results if r["ok"] and isinstance(r["result"], list)
                      for item in r["result"] if isinstance(item, dict)]
            try:
                sort = compile_sort(p.get("sort"))
            except ValueError:
                sort = []  # the racks already said what is wrong with it
            out["things"] = list(apply_sort(merged, sort)) if sort else merged
        elif method == "tailLog":
            merged = [{**item, "rack": r["rack"]} for r in results if r["ok"] and isinstance(r["result"], list)
                      for item in r["result"] if isinstance(item, dict)]
            merged.sort(key=lambda e: e.get("ts") if isinstance(e.get("ts"), int) else 0, reverse=True)
            limit = p.get("limit")
            out["entries"] = merged[:limit] if isinstance(limit, int) and limit >= 0 else merged
        return out

    # ------------------------------------------------------------- dispatch

    def handlers(self) -> dict[str, tuple[Callable[[Any], Awaitable[Any]], str]]:
        """Method name -> (handler(params), op): the ork's own methods, then
        the proxied thing methods (same names and ops as on a rack)."""
        own: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "registerRack": self.register_rack,
            "forgetRacks": self.forget_racks,
            "listRacks": self.list_racks,
        }
        out = {name: (own[name], op) for name, op in ORK_METHODS.items()}
        for name, op in THING_METHODS.items():
            out[name] = (lambda params, n=name: self.proxy(n, params), op)
        return out


# Errors that mean "this address did not work", so the next one is tried.
_DIAL_ERRORS = frozenset({ERR_UNAVAILABLE, ERR_TIMEOUT, ERR_CLOSED, ERR_HANDSHAKE})


class RpcRackCaller:
    """Reaches racks over RPC through a connection pool (swarmd_rpc.Pool, or
    anything with `call(target, method, params, timeout=)`), pinned to each
    rack's public key so a different peer on the same address is refused by
    the handshake. Addresses are tried in order; the first that connects wins."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def __call__(self, rack: Rack, method: str, params: Any, timeout: float) -> Any:  # noqa: ASYNC109
        from swarmd_rpc.pool import Target  # the client library sits beside the layers, not below them

        if not rack.addresses:
            raise SwarmdError(ERR_UNAVAILABLE, f"rack {rack.id} has no address to dial")
        key = bytes.fromhex(rack.public_key)
        last: SwarmdError | None = None
        for addr in rack.addresses:
            host, port = parse_hostport(addr, what="rack address")
            try:
                return await self.pool.call(Target(host, port, key), method, params, timeout=timeout)
            except SwarmdError as e:
                if e.code not in _DIAL_ERRORS:
                    raise
                last = e
        assert last is not None
        raise last


class SwarmRackCaller:
    """Reaches racks through the swarm by public key (`swarm.request`): the
    swarm finds the rack's record (or its peer topic), connects by whatever
    path works and keeps the connection pooled. Used for racks announced on
    RACKS and for manual racks registered without addresses; `direct`, when
    given, serves racks registered with explicit addresses."""

    def __init__(self, swarm: Any, direct: RackCaller | None = None) -> None:
        self.swarm = swarm
        self.direct = direct

    async def __call__(self, rack: Rack, method: str, params: Any, timeout: float) -> Any:  # noqa: ASYNC109
        if self.direct is not None and rack.source == "manual" and rack.addresses:
            return await self.direct(rack, method, params, timeout)
        return await self.swarm.request(bytes.fromhex(rack.public_key), method, params, timeout=timeout)
