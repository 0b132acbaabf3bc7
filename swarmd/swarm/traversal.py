"""NAT traversal for one node's swarm: detection, signal peers, the target's side of a punch.

A node behind NAT keeps connections to 1-3 public peers (relays, which are
public by construction) and lists them, with its NAT type, in the payload of
its own peer-topic record. Those peers forward connection requests
("nat.signal"), rate-limited per caller key, to the target ("nat.connect"),
which answers with its half of a TCP punch, a UDP punch or a relay meeting and
runs that half here. The caller's half (racing the paths, first byte at once,
upgrade behind it) is swarmd/swarm/dialer.py; the path test (nat.probe,
nat.sink) is swarmd/swarm/pathprobe.py. Every path carries the same Noise
handshake (IK against the target's key) and the same RPC, so identity and
encryption do not depend on the path. Every choice and upgrade is logged
("path_chosen", "path_upgraded"), kept per peer in `paths` and counted in the
swarm's PathMetrics (`nat.status`, `swarmd status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from loguru import logger

from swarmd import topics
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_FORBIDDEN,
    ERR_NOT_FOUND,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.net.connection import SecureConnection
from swarmd.net.nat import CONE, PUBLIC, SYMMETRIC, UNKNOWN, NatConfig, NatReport, detect_nat
from swarmd.net.punch import PathInfo
from swarmd.net.relayio import relay_transport
from swarmd.net.signal import (
    KIND_TCP,
    KIND_UDP,
    SignalLimiter,
    parse_request,
)
from swarmd.net.tcppunch import (
    BIRTHDAY_TIMEOUT,
    Rendezvous,
    close_quietly,
    is_birthday,
    punch_open,
    rendezvous,
)
from swarmd.net.udppunch import PunchOffer, UdpPuncher
from swarmd.rpc import CallContext, RpcPeer
from swarmd.rpc.params import as_params
from swarmd.swarm.dialer import TCP_PUNCH_TIMEOUT, Dialer
from swarmd.swarm.mapping import PortMapping
from swarmd.swarm.pathprobe import PathProbe
from swarmd.swarm.paths import (
    PATH_RANK,
    PUNCHED_TCP,
    PUNCHED_UDP,
    RELAYED,
    CountingConnection,
    PathMetrics,
    path_of,
    path_rank,
)
from swarmd.topics import peer_topic

if TYPE_CHECKING:
    from swarmd.dht.records import PeerRecord
    from swarmd.swarm.swarm import Swarm

Address = tuple[str, int]
RELAYS_TTL = 60.0  # s a RELAYS lookup is reused for rendezvous and relay picks
SIGNAL_CHECK_INTERVAL = 10.0
MAX_PUNCHING = 8


class Traversal:
    """Owned by the swarm (swarm.traversal); started after it, stopped before it."""

    def __init__(self, swarm: Swarm, config: NatConfig | None = None) -> None:
        self.swarm = swarm
        self.config = config or NatConfig()
        self.report: NatReport | None = None
        self.limiter = SignalLimiter(rate=self.config.signal_rate, burst=self.config.signal_burst)
        self.signal_peers: list[bytes] = []
        self.paths: dict[bytes, PathInfo] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._punching = 0  # punch attempts answering callers right now
        self._detected = asyncio.Event()
        self.metrics: PathMetrics = swarm.path_metrics
        self._relays_cache: tuple[float, list[Address]] = (0.0, [])
        self._best_relay: Address | None = None
        self.log = logger.bind(component="nat", node=swarm.identity.public_hex[:16])
        self.dialer = Dialer(self)
        self.probe = PathProbe(self)
        self.dial = self.dialer.dial  # what the swarm calls when direct dialling failed or cannot work
        self.skip_direct = self.dialer.skip_direct
        self.label_direct = self.dialer.label_direct  # the swarm's direct dial reached a mapped port?
        self.portmap = PortMapping(self) if self.config.portmap else None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        m = self.swarm.methods
        m.register("nat.signal", self._rpc_signal, op="r")
        m.register("nat.connect", self._rpc_connect, op="r")
        m.register("nat.status", self._rpc_status, op="r")
        m.register("nat.retire", self._rpc_retire, op="r")
        self.probe.register()
        self.swarm.traversal = self
        self._spawn(self._detect_loop())
        self._spawn(self._signal_keepalive())
        if self.portmap is not None:
            self._spawn(self.portmap.run())

    async def stop(self) -> None:
        self.swarm.traversal = None
        for name in ("nat.signal", "nat.connect", "nat.status", "nat.retire"):
            self.swarm.methods.unregister(name)
        self.probe.unregister()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.portmap is not None:
            await self.portmap.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.bind(event="nat_task_failed", error=f"{type(exc).__name__}: {exc}").warning(
                "nat background task failed"
            )

    def status(self) -> dict[str, Any]:
        return {
            "nat": self.report.to_dict() if self.report else {"type": "detecting"},
            "signal_peers": [k.hex() for k in self.signal_peers],
            "paths": {k.hex(): v.to_dict() for k, v in self.paths.items()},
            "signal_refused": self.limiter.refused,
            "metrics": self.metrics.to_dict(),
            **({"portmap": self.portmap.status()} if self.portmap is not None else {}),
        }

    async def _rpc_status(self, ctx: CallContext, params: Any) -> Any:
        return self.status()

    async def _rpc_retire(self, ctx: CallContext, params: Any) -> Any:
        """The dialler of the connection this call came over moved to a better path:
        answered once we stopped using this one (Swarm._retire closes it then)."""
        if ctx.peer_conn.conn.initiator:
            raise SwarmdError(ERR_BAD_REQUEST, "nat.retire is asked by the side that dialled the connection")
        await self.swarm.retire_asked(ctx.peer_conn)
        return True

    # -- NAT detection and signal peers ------------------------------------------------

    @property
    def nat_type(self) -> str:
        if self.config.assume:
            return self.config.assume
        return self.report.nat_type if self.report else "unknown"

    def stun_servers(self) -> list[Address]:
        """DHT nodes that answered our STUN: the only STUN servers a punch may use."""
        if self.report is None:
            return []
        return [o.server for o in self.report.observations if o.mapped is not None]

    async def detect(self) -> NatReport:
        dht = self.swarm.dht
        servers = [(ip, port) for _nid, ip, port in dht.contacts()]
        servers += [tuple(b) for b in dht.config.bootstrap if tuple(b) not in servers]
        port = dht.address[1]
        local = [(dht.address[0], port)] if dht.address[0] not in ("0.0.0.0", "", "::") else []
        if servers:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
                s.connect(servers[0])
                local.append((s.getsockname()[0], port))
        report = await detect_nat(
            lambda server: dht.stun(server, self.config.stun_timeout),
            servers,
            local,
            config=self.config,
            alternate=dht.stun_alternate,
        )
        self.report = report
        self.log.bind(event="nat_detected", **report.to_dict()).info("nat detected: {}", report.nat_type)
        return report

    async def _detect_loop(self) -> None:
        quick = 0
        while True:
            report = None
            try:
                report = await self.detect()
                await self._keep_signal_peers()
            except SwarmdError as e:
                self.log.bind(event="nat_round_failed", code=e.code).warning("nat round failed: {}", e.message)
            # one answer cannot tell cone from symmetric: ask again soon, once the
            # routing table knows more DHT nodes (a fresh node knows only its bootstrap)
            if report is not None and report.nat_type == UNKNOWN and quick < 10:
                quick += 1
                await asyncio.sleep(1.0)
                continue
            self._detected.set()
            await asyncio.sleep(self.config.redetect_interval)

    async def _signal_keepalive(self) -> None:
        """Re-dial a signal peer whose connection dropped: callers reach us through it."""
        while True:
            await asyncio.sleep(SIGNAL_CHECK_INTERVAL)
            for pk in list(self.signal_peers):
                if self._is_pooled(pk):
                    continue
                try:
                    await self.swarm.connect(pk)
                except SwarmdError as e:
                    self.log.bind(event="signal_peer_lost", peer=pk.hex()[:16], code=e.code).info(
                        "signal peer unreachable; choosing again"
                    )
                    with contextlib.suppress(SwarmdError):
                        await self._keep_signal_peers()
                    break

    async def _keep_signal_peers(self) -> None:
        """Behind NAT: stay connected to a few public peers and list them in our record."""
        me = self.swarm.public_key
        chosen: list[bytes] = []
        found = await self.swarm.lookup_all(topics.RELAYS)
        relays = self._relay_addresses(found)
        if relays:
            self._relays_cache = (time.monotonic(), relays)
        if self.nat_type != PUBLIC:
            for rec in found:
                if rec.public_key == me or len(chosen) >= max(1, min(3, self.config.signal_peers)):
                    continue
                try:
                    await self.swarm.connect(rec.public_key, rec)
                    chosen.append(rec.public_key)
                except SwarmdError as e:
                    self.log.bind(event="signal_peer_failed", peer=rec.public_key.hex()[:16], code=e.code).info(
                        "could not keep a connection to a signal peer"
                    )
        self.signal_peers = chosen
        # "direct": whether dialling our advertised addresses can work at all (public, the
        # router forwards a port to us, or the operator forwarded one and set
        # swarm.announce_addresses); only a seen translation says no: "unknown" or
        # "udp_blocked" prove nothing about TCP
        mapped = self.portmap.mapped_addresses() if self.portmap is not None else []
        direct = self.nat_type not in (CONE, SYMMETRIC) or bool(self.swarm.config.announce_addresses) or bool(mapped)
        payload: dict[str, Any] = {"nat": self.nat_type, "direct": direct, "signal": [k.hex() for k in chosen]}
        if mapped:
            payload["mapped"] = [f"{h}:{p}" for h, p in mapped]
        if self.swarm.config.announce_self:
            await self.swarm.update(peer_topic(self.swarm.identity.public_hex), payload)
        self.log.bind(event="signal_peers", nat=self.nat_type, peers=[k.hex()[:16] for k in chosen]).info(
            "signal peers updated"
        )

    # -- target side: a connection request forwarded to us -----------------------------

    async def _rpc_signal(self, ctx: CallContext, params: Any) -> Any:
        """On a public peer: forward a caller's request to a target that keeps a connection to us."""
        self.limiter.check(ctx.peer, time.monotonic())
        req = parse_request({**as_params(params, "nat.signal"), "source": ctx.peer})  # the source is whoever holds the Noise key
        target = self.swarm._registry.get(req.target)
        if target is None:
            raise SwarmdError(ERR_NOT_FOUND, f"peer {req.target.hex()[:16]}… keeps no connection to this node")
        return await target.call("nat.connect", req.to_wire(), timeout=self.config.punch_timeout)

    async def _rpc_connect(self, ctx: CallContext, params: Any) -> Any:
        """On the target: a caller wants a connection (through a signal peer or over a relayed one)."""
        params = as_params(params, "nat.connect")
        if ctx.peer in self.signal_peers and isinstance(params.get("source"), bytes):
            source = params["source"]  # forwarded: the signal peer vouches for the caller's Noise key
        elif self._is_pooled(ctx.peer):
            source = ctx.peer  # straight from a connected caller (e.g. over a relayed connection)
        else:
            raise SwarmdError(ERR_FORBIDDEN, "nat.connect is only accepted from signal peers and connected peers")
        req = parse_request({**params, "source": source, "target": self.swarm.public_key})
        self.limiter.check(req.source, time.monotonic())
        if req.kind in (KIND_UDP, KIND_TCP) and self._punching >= MAX_PUNCHING:
            # each attempt holds UDP sockets (256 when birthday punching), or a bound port and a relay connection
            raise SwarmdError(ERR_OVERLOADED, f"{MAX_PUNCHING} punching attempts already running")
        if req.kind == KIND_TCP:
            assert req.addr is not None
            rv = await rendezvous(await self._rendezvous_relay(), timeout=self.config.stun_timeout)
            self._punching += 1
            self._spawn(self._accepting(PUNCHED_TCP, req.source,
                                        self._accept_tcp_punched(req.source, rv, req.addr, req.nat or UNKNOWN)))
            return {"addr": [rv.observed[0], rv.observed[1]]}
        if req.kind == KIND_UDP:
            assert req.punch is not None
            servers = self.stun_servers()
            if not servers:
                raise SwarmdError(ERR_UNAVAILABLE, "no STUN server answered us: cannot punch")
            puncher = UdpPuncher(
                servers, self.nat_type, initiator=False, punch_id=req.punch.punch_id, peer_nat=req.punch.nat
            )
            self._punching += 1
            try:
                answer = await puncher.prepare(req.punch)
            except BaseException:
                self._punching -= 1
                await puncher.close()
                raise
            self._spawn(self._accepting(PUNCHED_UDP, req.source, self._accept_punched(req.source, puncher, req.punch)))
            return {"punch": answer.to_wire()}
        assert req.relay is not None
        self._spawn(self._accepting(RELAYED, req.source, self._accept_relayed(req.source, req.relay, req.token)))
        return {"ok": True}

    async def _accepting(self, path: str, source: bytes, attempt: Coroutine[Any, Any, None]) -> None:
        """The target's half of an attempt. One the caller gave up on (another path won
        first) ends here as an expected failure: one info line, not a warning."""
        try:
            await attempt
        except SwarmdError as e:
            self.log.bind(event="accept_failed", path=path, peer=source.hex()[:16], code=e.code).info(
                "the {} attempt a peer asked for did not complete: {}", path, e.message
            )

    def _is_pooled(self, pk: bytes) -> bool:
        return self.swarm._registry.get(pk) is not None

    def _new_conn(self, initiator: bool, remote: bytes | None, info: PathInfo) -> tuple[SecureConnection, RpcPeer]:
        server = self.swarm.server
        cls = CountingConnection if info.path == RELAYED else SecureConnection
        conn = cls(self.swarm.identity, initiator=initiator, remote_public_key=remote, config=server.config.net)
        if isinstance(conn, CountingConnection):
            conn.metrics = self.metrics
        conn.path_info = info  # type: ignore[attr-defined]  # connection info: which path carries it
        conn.path_rank = PATH_RANK.get(info.path, 1)  # type: ignore[attr-defined]  # dedupe: better path wins
        peer = RpcPeer(conn, self.swarm.methods, firewall=server.firewall, config=server.config)
        if not initiator and self.swarm.firewall is not None:
            peer.hold()  # a peer that reached us: nothing it sends is dispatched before the firewall answers
        return conn, peer

    async def _established(self, conn: SecureConnection, expected: bytes) -> None:
        try:
            async with asyncio.timeout(self.config.relay_timeout):
                await asyncio.shield(conn.established)
        except TimeoutError:
            conn.close(SwarmdError(ERR_TIMEOUT, "handshake over the new path timed out"), tell_peer=False)
            raise SwarmdError(ERR_TIMEOUT, "handshake over the new path timed out") from None
        except BaseException:
            conn.close(tell_peer=False)
            raise
        if conn.remote_public_key != expected:
            conn.close(SwarmdError(ERR_BAD_REQUEST, "peer on the new path is not the one who asked"))
            raise SwarmdError(ERR_BAD_REQUEST, "peer on the new path is not the one who asked")

    async def _over_socket(self, sock: socket.socket, initiator: bool, remote: bytes | None,
                           expected: bytes, info: PathInfo) -> RpcPeer:
        """Run the Noise connection on a connected (punched) TCP socket, as on a dialled one."""
        conn, peer = self._new_conn(initiator, remote, info)
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, sock=sock)
        except BaseException:
            close_quietly(sock)
            conn.close(tell_peer=False)
            raise
        await self._established(conn, expected)
        return peer

    async def _accept_tcp_punched(self, source: bytes, rv: Rendezvous, addr: Address, theirs: str) -> None:
        t0 = time.monotonic()
        bound = BIRTHDAY_TIMEOUT if is_birthday(self.nat_type, theirs) else TCP_PUNCH_TIMEOUT
        try:
            sock = await punch_open(rv, addr, self.nat_type, theirs, min(self.config.punch_timeout, bound))
        except SwarmdError as e:
            self.metrics.attempt(PUNCHED_TCP, False)
            self.log.bind(event="punch_failed", path=PUNCHED_TCP, peer=source.hex()[:16], reason=e.message).info(
                "TCP simultaneous open failed"
            )
            return
        finally:
            rv.close()
            self._punching -= 1
        info = PathInfo(PUNCHED_TCP, time.monotonic() - t0,
                        detail={"punch": {**rv.detail(addr), "birthday": is_birthday(self.nat_type, theirs)}})
        peer = await self._over_socket(sock, False, None, source, info)
        self.metrics.attempt(PUNCHED_TCP, True)
        await self._adopt_inbound(source, peer, info)

    async def _accept_punched(self, source: bytes, puncher: UdpPuncher, offer: PunchOffer) -> None:
        t0 = time.monotonic()
        try:
            transport = await puncher.connect(offer, self.config.punch_timeout)
        finally:
            self._punching -= 1
        info = PathInfo(PUNCHED_UDP, time.monotonic() - t0, detail={"punch": puncher.result.to_dict()})
        conn, peer = self._new_conn(False, None, info)
        transport.attach(conn)
        await self._established(conn, source)
        await self._adopt_inbound(source, peer, info)

    async def _accept_relayed(self, source: bytes, relay: Address, token: bytes) -> None:
        t0 = time.monotonic()
        info = PathInfo(RELAYED)
        conn, peer = self._new_conn(False, None, info)
        rp = await relay_transport(relay[0], relay[1], token, conn, timeout=self.config.relay_timeout)
        await self._established(conn, source)
        info.setup_s = time.monotonic() - t0
        info.detail = {"relay": f"{rp.relay[0]}:{rp.relay[1]}"}
        await self._adopt_inbound(source, peer, info)

    async def _adopt_inbound(self, pk: bytes, peer: RpcPeer, info: PathInfo) -> None:
        """A connection a peer made to us over a punched or relayed path: admitted like a direct
        one (the swarm's firewall, the same gate), then pooled, then its held calls run."""
        if not await self.swarm.admitted(peer):
            return
        self._adopt(pk, peer, info, inbound=True)
        if not peer.is_closed:
            peer.release()

    def _adopt(self, pk: bytes, peer: RpcPeer, info: PathInfo, *, inbound: bool) -> RpcPeer:
        before = self.swarm._registry.get(pk)
        kept = self.swarm._register(peer, inbound=inbound)
        if kept is peer:
            self.paths[pk] = info
            peer.closed.add_done_callback(lambda _f: self.paths.pop(pk, None) if self.paths.get(pk) is info else None)
        upgraded = kept is peer and before is not None and before is not peer and path_rank(peer) > path_rank(before)
        if upgraded:
            info.detail["upgraded_from"] = path_of(before)
            self.log.bind(event="path_upgraded", peer=pk.hex()[:16], inbound=inbound, **info.to_dict()).info(
                "{} connection moved to the {} path", path_of(before), info.path
            )
        self.log.bind(event="path_chosen", peer=pk.hex()[:16], inbound=inbound, kept=kept is peer, **info.to_dict()).info(
            "connection over the {} path", info.path
        )
        return kept

    # -- relays: rendezvous for TCP punching, and the relayed path ----------------------------

    async def relays(self) -> list[Address]:
        """Relay listener addresses from the RELAYS topic (cached RELAYS_TTL seconds)."""
        stamp, cached = self._relays_cache
        if cached and time.monotonic() - stamp < RELAYS_TTL:
            return cached
        out = self._relay_addresses(await self.swarm.lookup_all(topics.RELAYS, timeout=self.swarm.config.lookup_timeout))
        self._relays_cache = (time.monotonic(), out)
        return out

    def _relay_addresses(self, records: list[PeerRecord]) -> list[Address]:
        out: list[Address] = []
        for rec in records:
            port = rec.payload.get("relay_port") if isinstance(rec.payload, dict) else None
            if isinstance(port, int):  # our own relay too: a public relay node may meet a NATed peer there
                out += [(host, port) for host, _ in rec.addresses]
        return out

    async def _rendezvous_relay(self) -> Address:
        """The relay whose PONG tells us our TCP mapping (the fastest one last picked, else any)."""
        if self._best_relay is not None:
            return self._best_relay
        relays = await self.relays()
        if not relays:
            raise SwarmdError(ERR_UNAVAILABLE, "no relay announced: nobody to learn our TCP mapping from")
        return relays[0]
