"""The async client: a short-lived member of a swarm, or a channel to one peer.

A swarm client runs a client-mode DHT node (it looks up and announces, but
never enters other nodes' routing tables, where it would be a dead contact
once it exits) and a Swarm of its own for pooled, Noise-authenticated
connections. Inference is routed exactly as the gateway routes it: a Fleet
(swarmd.orchestrator.fleet) fed by the workers' DHT records, whose Router picks
a worker, calls it and fails over on the errors swarmd.errors.classify calls
retryable; model transfers are `models.Models` (the store's streams through
swarmd.store.transfer). Nothing here needs a daemon on this box.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_NOT_FOUND,
    ERR_UNAVAILABLE,
    ERR_UNKNOWN_METHOD,
    ConfigError,
    SwarmdError,
)
from swarmd.node.address import parse_address, parse_hostport
from swarmd.node.deadline import within
from swarmd.node.identity import Identity, parse_public_key
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.discovery import missed_refreshes
from swarmd.orchestrator.fleet import Fleet
from swarmd.worker.result import InferResult
from swarmd_rpc.errors import Closed, translated
from swarmd_rpc.models import Models


def _hostport(value: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(value, str):
        return parse_hostport(value, what="bootstrap entry")
    return parse_address(value, "bootstrap entry", error=ConfigError)


@dataclass
class ClientConfig:
    """Tunables of a Client; every field has a default that suits a laptop talking to a LAN swarm."""

    bootstrap: list[str | tuple[str, int]] = field(default_factory=list)  # HOST:PORT of DHT nodes
    swarm_secret: bytes | str | None = None  # private swarm: the secret its nodes use (hex or bytes)
    # the swarm's operator keys (hex): when given, only orchestrators, workers and stores holding a
    # valid grant from one of them are used (docs/operations.md "Trust model"); empty: trust every announcer
    operators: list[str] = field(default_factory=list)
    timeout: float = 30.0  # default seconds for call(), push/pull steps
    infer_timeout: float = 30.0  # budget of one infer() including failover
    lookup_timeout: float = 5.0  # one DHT lookup
    discovery_ttl: float = 5.0  # how long a lookup of the workers' topic is reused
    settle: float = 1.0  # lookups return this long after the first record (no full crawl wait)
    listen_host: str = "127.0.0.1"  # where our RPC server listens (peers dial it after join(announce=True))
    dht_host: str = "0.0.0.0"
    dht_port: int = 0
    # reach peers behind NAT the way daemons do (hole punching through signal peers, relays;
    # swarmd.swarm.traversal). Off by default: it detects our NAT type in the background and
    # bounds a direct dial by nat.direct_timeout (2 s) before trying the other paths; the CLI
    # turns it on
    traversal: bool = False


Inference = InferResult  # one inference's answer: outputs, model version, worker (the type the worker sends)


@dataclass(frozen=True)
class PeerAddress:
    """One peer reached directly, with no DHT: its key (pinned by the Noise handshake; None accepts
    whoever answers, as `swarmd model --store HOST:PORT` without --store-key does) and address."""

    public_key: bytes | None
    host: str
    port: int


class Client:
    """Async client of a swarmd swarm.

        async with Client(bootstrap=["10.0.0.1:7000"]) as c:
            out = await c.infer("digits", {"input": x})

    Give `bootstrap` to join a swarm, or use Client.for_peer() to talk to one
    peer by key and address. `identity` is an Identity or a key file path
    (created if missing); by default a throwaway key is made, which is what
    a peer's firewall sees unless it admits anonymous readers.
    """

    def __init__(
        self,
        bootstrap: list[str | tuple[str, int]] | None = None,
        *,
        identity: Identity | str | Path | None = None,
        swarm_secret: bytes | str | None = None,
        config: ClientConfig | None = None,
        peer: PeerAddress | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        if bootstrap is not None:
            self.config.bootstrap = list(bootstrap)
        if swarm_secret is not None:
            self.config.swarm_secret = swarm_secret
        if isinstance(identity, (str, Path)):
            identity = Identity.load_or_create(Path(identity).expanduser())
        self.identity: Identity = identity or Identity.generate()
        self.peer_address = peer
        self.models = Models(self)
        self.fleet: Fleet | None = None  # the router over the workers' records (swarm mode)
        self._records: dict[bytes, Any] = {}  # public key -> newest PeerRecord seen by discovery
        self._stack: Any = None  # swarmd.swarm.stack.Stack in swarm mode
        self._swarm: Any = None
        self._direct: Any = None  # RpcPeer in single-peer mode
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()

    # -- construction --------------------------------------------------------------

    @classmethod
    def for_peer(
        cls,
        public_key: bytes | str | None,
        host: str,
        port: int,
        *,
        identity: Identity | str | Path | None = None,
        config: ClientConfig | None = None,
    ) -> Client:
        """A client of one peer (no DHT): every call, inference and transfer goes to it."""
        pk = None if public_key is None else parse_public_key(public_key, "public_key")
        return cls(identity=identity, config=config, peer=PeerAddress(pk, host, int(port)))

    @classmethod
    def from_settings(
        cls, settings: Any, *, config: ClientConfig | None = None, identity: Identity | str | Path | None = None
    ) -> Client:
        """A client joined to the swarm of a node's settings (bootstrap, swarm secret).

        The key is a throwaway one unless `identity` is given: reusing the node's own key from
        its data dir would make the node's peers see two connections under one key (and
        deduplicate the node's real one away), and the node itself unreachable from us."""
        cfg = config or ClientConfig()
        cfg.bootstrap = list(settings.node.bootstrap)
        cfg.swarm_secret = settings.node.swarm_secret
        trust = getattr(settings, "trust", None)
        if trust is not None and not trust.open:
            cfg.operators = list(trust.operators)
        return cls(identity=identity, config=cfg)

    @translated
    async def start(self) -> Client:
        """Bootstrap the DHT node (swarm mode) or open the channel (peer mode). Idempotent."""
        async with self._start_lock:
            if self._closed:
                raise Closed("the client is closed")
            if self._started:
                return self
            if self.peer_address is not None:
                from swarmd.rpc import connect

                pa = self.peer_address
                self._direct = await connect(
                    self.identity, pa.host, pa.port, remote_public_key=pa.public_key, timeout=self.config.timeout
                )
            else:
                await self._start_swarm()
            self._started = True
        return self

    async def _start_swarm(self) -> None:
        from swarmd.dht import DhtConfig
        from swarmd.swarm import SwarmConfig
        from swarmd.swarm.stack import open_stack

        cfg = self.config
        if not cfg.bootstrap:
            raise SwarmdError(
                ERR_BAD_REQUEST,
                "a swarm client needs bootstrap=['HOST:PORT', ...]; use Client.for_peer() for a single peer",
            )
        secret = cfg.swarm_secret
        if isinstance(secret, str):
            secret = bytes.fromhex(secret)
        trust = None
        if cfg.operators:
            from swarmd.node.trust import GrantError, Trust, parse_key

            try:
                operators = [parse_key(k, "operators[]") for k in cfg.operators]
            except GrantError as e:
                raise SwarmdError(ERR_BAD_REQUEST, str(e)) from None
            trust = Trust(operators, own_key=self.identity.public_key)
        self._stack = stack = await open_stack(
            self.identity,
            DhtConfig(host=cfg.dht_host, port=cfg.dht_port, bootstrap=[_hostport(b) for b in cfg.bootstrap],
                      mode="client", lookup_timeout=cfg.lookup_timeout),
            dht_identity=Identity.generate(),  # a client-mode DHT node: no routing-table entry to keep
            host=cfg.listen_host,
            swarm_config=SwarmConfig(secret=secret, announce_self=False, lookup_timeout=cfg.lookup_timeout,
                                     request_timeout=cfg.timeout),
            trust=trust,
            nat=cfg.traversal,
        )
        swarm = self._swarm = stack.swarm
        # No health loop of its own (a client is short-lived): failures and bans are what it learns.
        # A punched or relayed path takes longer to open than a direct dial: give it the call's time.
        dial = cfg.timeout if cfg.traversal else min(cfg.timeout, 5.0)
        self.fleet = Fleet(
            OrchestratorConfig(request_timeout=cfg.infer_timeout, connect_timeout=dial),
            self.identity, swarm=swarm, health_checks=False, lookup=self._lookup_records,
        )

    async def close(self) -> None:
        """Leave joined topics, close connections, stop the DHT node. Idempotent."""
        self._closed = True
        fleet, self.fleet = self.fleet, None
        if fleet is not None:
            with contextlib.suppress(Exception):
                await fleet.stop()
        stack, direct = self._stack, self._direct
        self._stack = self._swarm = self._direct = None
        if direct is not None:
            with contextlib.suppress(Exception):
                await direct.close()
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.stop()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._closed:
            raise Closed("the client is closed")
        if not self._started:
            await self.start()

    def _need_swarm(self, what: str) -> Any:
        if self._swarm is None:
            raise SwarmdError(ERR_UNAVAILABLE, f"{what} needs a started swarm client (bootstrap=...), not a single-peer one")
        return self._swarm

    async def _peer(self, public_key: bytes) -> Any:
        """A connected RpcPeer for public_key (streams need the peer itself, not swarm.request)."""
        if self._direct is not None:
            if public_key != self._direct.remote_public_key:
                raise SwarmdError(ERR_NOT_FOUND, f"this client talks to one peer only, not {public_key.hex()[:16]}…")
            return self._direct
        return await self._swarm.connect(public_key, self._records.get(public_key))

    async def _lookup_records(self, topic: str, seconds: float) -> list[Any]:
        """How the fleet finds workers: a lookup that settles soon after the first record."""
        return await self.lookup(topic, timeout=seconds, settle=self.config.settle)

    # -- topics and calls ------------------------------------------------------------

    @translated
    async def lookup(
        self,
        topic: str | bytes,
        timeout: float | None = None,  # noqa: ASYNC109
        *,
        first_only: bool = False,
        settle: float | None = None,
        admitted_only: bool = True,
    ) -> list[Any]:
        """Records (swarmd.dht.records.PeerRecord: public_key, addresses, payload, seq, expiry) of
        peers announcing topic, a name or a 32-byte topic hash.

        By default the whole lookup runs (bounded by timeout). first_only returns as soon as one
        record arrives; settle=S returns S seconds after the first one: an unresponsive DHT node
        costs a full crawl its timeout, and a person at a prompt waits on it.

        On a role's topic only records our operators admit are returned (all of them when the
        client names no operators); admitted_only=False returns every record, for a tool that
        shows each one's admission."""
        await self._ready()
        swarm = self._need_swarm("lookup")
        found: dict[bytes, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = settle_until = loop.time() + (timeout or self.config.lookup_timeout)
        async with contextlib.aclosing(swarm.lookup(topic, admit=admitted_only)) as it:
            while True:
                wait = deadline - loop.time()
                if found and settle is not None:
                    wait = min(wait, settle_until - loop.time())
                if wait <= 0:
                    break
                try:
                    rec = await within(anext(it), wait)
                except (StopAsyncIteration, TimeoutError):
                    break
                if not found and settle is not None:
                    settle_until = loop.time() + settle
                found[rec.public_key] = rec  # a lookup yields a peer again only with a newer seq
                if first_only:
                    break
        if admitted_only:  # records no admission checked are shown, never used to reach a peer
            for rec in found.values():
                self._records[rec.public_key] = rec
        return list(found.values())

    @translated
    async def connect(self, public_key: bytes | str) -> Any:
        """A pooled, Noise-authenticated RpcPeer to the peer with this key (for streams and many
        calls); the record from an earlier lookup is used when there is one, else the DHT is asked.
        The client owns the connection: it closes with the client."""
        await self._ready()
        return await self._peer(parse_public_key(public_key, "public_key"))

    @translated
    async def join(
        self,
        topic: str | bytes,
        *,
        payload: dict[str, Any] | None = None,
        announce: bool = True,
        lookup: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bytes:
        """Announce this client under topic (peers can then dial it) and/or connect to the peers
        announcing it; waits for the first round. Returns the 32-byte topic."""
        await self._ready()
        swarm = self._need_swarm("join")
        t = await swarm.join(topic, announce=announce, lookup=lookup, payload=payload)
        await swarm.flush(timeout or self.config.lookup_timeout * 2)
        return t

    @translated
    async def leave(self, topic: str | bytes) -> None:
        """Stop announcing and looking up topic; our record is withdrawn."""
        await self._ready()
        await self._need_swarm("leave").leave(topic)

    def connections(self) -> Any:
        """An async iterator of the swarm's connection events (swarmd.swarm.ConnectionEvent: kind
        "open"/"close", public_key, inbound, topics), subscribed now so none is missed; ends when
        the client closes. For a swarm client (after start())."""
        return self._need_swarm("connections()").connections()

    def connected_peers(self) -> list[bytes]:
        """Public keys of the peers this client holds a connection to."""
        if self._direct is not None:
            return [] if self._direct.is_closed else [self._direct.remote_public_key]
        if self._swarm is None:
            return []
        return [pk for pk, *_ in self._swarm.peers()]

    @translated
    async def call(
        self,
        public_key: bytes | str | None,
        method: str,
        params: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Call method on the peer with public_key (found on the DHT by its key); None means the
        single peer of a for_peer() client. Raises the exception class of the peer's error code."""
        await self._ready()
        t = timeout or self.config.timeout
        if self._direct is not None:  # the one peer (a key given must be its key)
            peer = self._direct if public_key is None else await self._peer(parse_public_key(public_key, "public_key"))
            return await peer.call(method, params, timeout=t)
        if public_key is None:
            raise SwarmdError(ERR_BAD_REQUEST, "public_key is required on a swarm client")
        return await self._swarm.request(parse_public_key(public_key, "public_key"), method, params, timeout=t)

    # -- inference ---------------------------------------------------------------------

    @translated
    async def infer_detailed(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | None = None,
        *,
        outputs: list[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Inference:
        """Like infer(), also saying which model version and which worker answered."""
        await self._ready()
        if not isinstance(inputs, Mapping) or not inputs:
            raise SwarmdError(ERR_BAD_REQUEST, "inputs must be a non-empty map of input name to array")
        params: dict[str, Any] = {"model": model, "inputs": {str(k): np.asarray(v) for k, v in inputs.items()}}
        if version is not None:
            params["version"] = version
        if outputs is not None:
            params["outputs"] = list(outputs)
        if request_id is not None:
            params["request_id"] = request_id
        budget = timeout or self.config.infer_timeout
        worker: bytes | None = None
        if self._direct is not None:
            try:
                res = await self._direct.call("runInference", params, timeout=budget)
                worker = self._direct.remote_public_key
            except SwarmdError as e:  # the one peer is an orchestrator, not a worker
                if e.code != ERR_UNKNOWN_METHOD:
                    raise
                res = await self._direct.call("routeInferenceRequest", params, timeout=budget)
        else:
            fleet = self.fleet
            assert fleet is not None
            if time.monotonic() - fleet.discovered_at > self.config.discovery_ttl:
                await fleet.discover_once(self.config.lookup_timeout)
            res, lease = await fleet.route("runInference", params, model=model, budget=budget)
            worker = bytes.fromhex(lease.public_key)
        return InferResult.from_wire(res, model, worker.hex() if worker else None)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | None = None,
        *,
        outputs: list[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, np.ndarray]:
        """Run model (latest version unless given) on inputs {name: array}; returns {name: array}.

        A worker that fails in a way another may not (closed, timeout, overloaded, still
        loading) is replaced by another within the timeout; a bad input fails at once (BadRequest).
        """
        res = await self.infer_detailed(model, inputs, version, outputs=outputs, timeout=timeout)
        return res.outputs

    # -- stores ----------------------------------------------------------------------------

    async def _store_keys(self, topic: str) -> list[bytes]:
        if self._direct is not None:
            return [self._direct.remote_public_key]
        records = await self.lookup(topic, settle=self.config.settle)
        # a store whose live record stopped being refreshed (most likely dead, its record not
        # expired yet) is asked last, as the routers do with such workers
        now, stale = time.time(), OrchestratorConfig.stale_after
        return [r.public_key for r in sorted(records, key=lambda r: missed_refreshes(r, now, stale))]


__all__ = ["Client", "ClientConfig", "Inference", "Models", "PeerAddress"]
