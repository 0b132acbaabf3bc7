"""NAT traversal for one node's swarm: detection, signalling, punching, relays.

When the swarm cannot dial a peer's advertised addresses (Swarm._dial tries
them first, or skips them when the peer's record says it is behind NAT), the
first byte goes out at once on the first path that works and the better paths
keep trying behind it (the iroh / libp2p-DCUtR model):

- punched-tcp: TCP simultaneous open (swarmd/net/tcppunch.py) when neither side
  is symmetric: each side learns its TCP mapping from a relay's PONG, the two
  swap them through a signal peer and connect() at each other;
- punched-udp: a UDP punch (swarmd/net/udppunch.py; birthday punching when one
  side is symmetric) carrying QUIC on the punched socket (swarmd/net/quic.py),
  unless both sides are symmetric;
- relayed: pick a relay from the RELAYS topic by round trip, hand the target a
  token through its signal peer, meet it at the relay. It starts after a short
  head start of the TCP punch (RELAY_HEAD_START), or at once when no TCP punch
  can work, so a relay circuit is spent only where a punch is slow or fails.

The first path to finish carries the first call. When that is the relay, the
punches keep running (and are retried over the relayed connection every
repunch_interval); the swarm moves new calls to a punched connection the
moment it is established (its registry ranks paths: Swarm._register), while
calls in flight on the relayed one finish there before it is closed. Every
choice and upgrade is logged ("path_chosen", "path_upgraded"), kept per peer in
`paths` and counted in the swarm's PathMetrics (`nat.status`, `swarmd status`).

A node behind NAT keeps connections to 1-3 public peers (relays, which are
public by construction) and lists them, with its NAT type, in the payload of
its own peer-topic record. Those peers forward connection requests
("nat.signal"), rate-limited per caller key. Every path carries the same Noise
handshake (IK against the target's key) and the same RPC, so identity and
encryption do not depend on the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from swarmd import topics
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_FORBIDDEN,
    ERR_NOT_FOUND,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.net.connection import SecureConnection
from swarmd.net.nat import CONE, PUBLIC, SYMMETRIC, UDP_BLOCKED, UNKNOWN, NatConfig, NatReport, detect_nat
from swarmd.net.punch import PathAttempt, PathInfo, warm_up
from swarmd.net.relayio import new_token, pick_relay, relay_transport
from swarmd.net.signal import (
    KIND_RELAY,
    KIND_TCP,
    KIND_UDP,
    SignalLimiter,
    SignalRequest,
    parse_address,
    parse_request,
)
from swarmd.net.tcppunch import Rendezvous, close_quietly, rendezvous, simultaneous_open
from swarmd.net.udppunch import PunchOffer, UdpPuncher, parse_offer
from swarmd.rpc import CallContext, RpcPeer
from swarmd.topics import peer_topic

if TYPE_CHECKING:
    from swarmd.dht.records import PeerRecord
    from swarmd.swarm.swarm import Swarm

Address = tuple[str, int]
DIRECT, PUNCHED_TCP, PUNCHED_UDP, MAPPED, RELAYED = "direct", "punched-tcp", "punched-udp", "mapped", "relayed"
PATHS = (DIRECT, PUNCHED_TCP, PUNCHED_UDP, MAPPED, RELAYED)
# the registry keeps the higher (rpc/registry.py); a better path replaces a worse one (an upgrade)
PATH_RANK = {RELAYED: 0, PUNCHED_UDP: 1, DIRECT: 2, PUNCHED_TCP: 2, MAPPED: 2}
RELAY_HEAD_START = 0.03  # s the TCP punch (~10 ms in the lab) runs alone before a relay circuit is spent
TCP_PUNCH_TIMEOUT = 3.0  # a simultaneous open that has not completed by then will not
RELAYS_TTL = 60.0  # s a RELAYS lookup is reused for rendezvous and relay picks
REPUNCH_ROUNDS = 3
MAX_WATCH = 120.0  # s nat.probe may keep calling across path changes
WATCH_AFTER = 0.5  # s nat.probe keeps calling on the final path before it stops
WATCH_STREAM = 64 * 1024  # bytes per stream while watching
WATCH_STREAM_GAP = 0.01  # s between those streams (the sink's budget is sink_rate/s after its burst)
STREAM_CHUNK = 256 * 1024
SIGNAL_CHECK_INTERVAL = 10.0
MAX_PUNCHING = 8
MAX_SINK_CALLERS = 1024  # per-caller byte buckets kept for nat.sink; the stalest is dropped beyond this


def path_of(peer: RpcPeer) -> str:
    """The path a pooled connection runs on ("direct" unless we built it)."""
    info = getattr(peer.conn, "path_info", None)
    return info.path if isinstance(info, PathInfo) and info.path else DIRECT


def path_rank(peer: RpcPeer) -> int:
    return int(getattr(peer.conn, "path_rank", None) or PATH_RANK.get(path_of(peer), 2))


@dataclass
class PathMetrics:
    """Counters of the paths connections take, in one place (nat.status, swarmd status,
    and a metrics endpoint later): opened by path, punch attempts, upgrades and
    their time, bytes received over relays."""

    opened: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    attempts: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> {"ok": n, "failed": n}
    first_path: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))  # what carried a dial's first call
    upgrades: int = 0
    upgrade_ms: deque[float] = field(default_factory=lambda: deque(maxlen=256))  # dial start -> better path
    relay_bytes_in: int = 0

    def attempt(self, path: str, ok: bool) -> None:
        a = self.attempts.setdefault(path, {"ok": 0, "failed": 0})
        a["ok" if ok else "failed"] += 1

    def to_dict(self) -> dict[str, Any]:
        ms = sorted(self.upgrade_ms)
        return {
            "opened": dict(self.opened),
            "first_path": dict(self.first_path),
            "attempts": {k: dict(v) for k, v in self.attempts.items()},
            "upgrades": self.upgrades,
            "upgrade_ms_p50": round(ms[len(ms) // 2], 1) if ms else None,
            "upgrade_ms_last": round(self.upgrade_ms[-1], 1) if ms else None,
            "relay_bytes_in": self.relay_bytes_in,
        }


class _CountingConnection(SecureConnection):
    """A relayed connection: counts what arrives through the relay (PathMetrics.relay_bytes_in)."""

    metrics: PathMetrics | None = None

    def buffer_updated(self, nbytes: int) -> None:
        if self.metrics is not None:
            self.metrics.relay_bytes_in += nbytes
        super().buffer_updated(nbytes)


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
        self._repunching: set[bytes] = set()
        self._punching = 0  # punch attempts answering callers right now
        self._sinking = 0  # nat.sink streams being received right now
        self._sink_budget: dict[bytes, tuple[float, float]] = {}  # caller key -> (bytes available, stamp)
        self.sink_refused = 0
        self._detected = asyncio.Event()
        self.metrics: PathMetrics = swarm.path_metrics
        self._relays_cache: tuple[float, list[Address]] = (0.0, [])
        self._best_relay: Address | None = None
        self._warmed = False
        self.log = logger.bind(component="nat", node=swarm.identity.public_hex[:16])

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        m = self.swarm.methods
        m.register("nat.signal", self._rpc_signal, op="r")
        m.register("nat.connect", self._rpc_connect, op="r")
        m.register("nat.status", self._rpc_status, op="r")
        m.register("nat.retire", self._rpc_retire, op="r")
        m.register("nat.probe", self._rpc_probe, op="w")
        m.register_stream("nat.sink", self._rpc_sink, op="r")
        self.swarm.traversal = self
        self._spawn(self._detect_loop())
        self._spawn(self._signal_keepalive())

    async def stop(self) -> None:
        self.swarm.traversal = None
        for name in ("nat.signal", "nat.connect", "nat.status", "nat.retire", "nat.probe", "nat.sink"):
            self.swarm.methods.unregister(name)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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

    # -- path test: what `swarmd nat probe` runs ----------------------------------------

    def _sink_take(self, caller: bytes, n: int, now: float) -> bool:
        """Charge n bytes to the caller's bucket (sink_rate per second, probe_max_bytes deep)."""
        cap = float(self.config.probe_max_bytes)
        avail, stamp = self._sink_budget.get(caller, (cap, now))
        avail = min(cap, avail + (now - stamp) * self.config.sink_rate)
        if caller not in self._sink_budget and len(self._sink_budget) >= MAX_SINK_CALLERS:
            del self._sink_budget[min(self._sink_budget, key=lambda k: self._sink_budget[k][1])]
        ok = avail >= n
        self._sink_budget[caller] = (avail - n if ok else avail, now)
        return ok

    async def _rpc_sink(self, ctx: CallContext, params: Any, stream: Any) -> Any:
        """Count and hash what a peer streams to us (bounded): the receiving end of a path test.

        Any admitted peer may call it, so it is bounded three ways: [nat] sink can turn it
        off, each caller key has a byte budget (sink_rate/s, probe_max_bytes deep), and at
        most sink_concurrency streams run at once; each chunk must arrive within request_timeout.
        """
        if not self.config.sink:
            raise SwarmdError(ERR_FORBIDDEN, "nat.sink is disabled on this node ([nat] sink = false)")
        if self._sinking >= self.config.sink_concurrency:
            self.sink_refused += 1
            raise SwarmdError(ERR_OVERLOADED, f"nat.sink is serving {self._sinking} streams; try again later")
        self._sinking += 1
        try:
            digest = hashlib.sha256()
            n = 0
            while True:
                try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the caller's cancel
                    async with asyncio.timeout(self.swarm.config.request_timeout):
                        chunk = await stream.recv()
                except TimeoutError:
                    raise SwarmdError(ERR_TIMEOUT, "nat.sink stream stalled") from None
                if chunk is None:
                    break
                n += len(chunk)
                if n > self.config.probe_max_bytes:
                    raise SwarmdError(ERR_TOO_LARGE, f"nat.sink takes at most {self.config.probe_max_bytes} bytes")
                if not self._sink_take(ctx.peer, len(chunk), time.monotonic()):
                    self.sink_refused += 1
                    raise SwarmdError(ERR_OVERLOADED, f"nat.sink budget spent for this key ({self.config.sink_rate} B/s)")
                digest.update(chunk)
            return {"bytes": n, "sha256": digest.hexdigest()}
        finally:
            self._sinking -= 1

    async def _rpc_probe(self, ctx: CallContext, params: Any) -> Any:
        """Operator's path test, for this node's own key only: connect to a peer
        (path order applies), one RPC round trip; with `watch` seconds, keep calling
        and streaming through the swarm (whichever connection it hands out) until the
        path is final (not relayed) or the time is up, counting every failure; then
        stream `bytes` to it on the path it ended on."""
        if ctx.peer != self.swarm.public_key:
            raise SwarmdError(ERR_FORBIDDEN, "nat.probe runs only for this node's own key (swarmd nat probe)")
        if not isinstance(params, dict) or not isinstance(params.get("target"), str):
            raise SwarmdError(ERR_BAD_REQUEST, "nat.probe params must be {target: hex key, bytes: int, watch: s}")
        try:
            target = bytes.fromhex(params["target"])
        except ValueError:
            raise SwarmdError(ERR_BAD_REQUEST, "nat.probe target must be a hex public key") from None
        size = params.get("bytes", 0)
        if not isinstance(size, int) or not 0 <= size <= self.config.probe_max_bytes:
            raise SwarmdError(ERR_BAD_REQUEST, f"nat.probe bytes must be 0..{self.config.probe_max_bytes}")
        watch = params.get("watch", 0)
        if not isinstance(watch, (int, float)) or isinstance(watch, bool) or not 0 <= watch <= MAX_WATCH:
            raise SwarmdError(ERR_BAD_REQUEST, f"nat.probe watch must be 0..{MAX_WATCH} seconds")
        if params.get("fresh") is True:  # measure a dial: drop a pooled connection first
            pooled = self.swarm._registry.get(target)
            if pooled is not None:
                await pooled.close()
        t0 = time.monotonic()
        peer = await self.swarm.connect(target)
        connect_s = time.monotonic() - t0
        t1 = time.monotonic()
        # through the swarm, as any caller: it takes whatever connection is current
        remote = await self.swarm.request(target, "nat.status", None, timeout=self.swarm.config.request_timeout)
        rtt = time.monotonic() - t1
        out: dict[str, Any] = {
            "path": path_of(peer),
            "first_path": path_of(peer),
            "connect_ms": round(connect_s * 1000, 2),
            "rtt_ms": round(rtt * 1000, 3),
            "first_rpc_ms": round((time.monotonic() - t0) * 1000, 2),
            "connection": (self.paths[target].to_dict() if target in self.paths else {"path": path_of(peer)}),
            "remote_nat": remote.get("nat") if isinstance(remote, dict) else None,
        }
        if watch:
            out["watch"] = await self._watch(target, float(watch), t0)
            peer = self.swarm._registry.get(target) or await self.swarm.connect(target)
            out["connection"] = self.paths[target].to_dict() if target in self.paths else {"path": path_of(peer)}
        if size:
            out["stream"] = await self._stream_to(peer, size, hashlib.shake_256(target).digest(STREAM_CHUNK))
        out["path"] = path_of(peer)  # the stream may have moved to a punched path meanwhile
        return out

    async def _stream_to(self, peer: RpcPeer, size: int, block: bytes) -> dict[str, Any]:
        digest = hashlib.sha256()
        t2 = time.monotonic()
        stream = await peer.open_stream("nat.sink", None, timeout=self.swarm.config.request_timeout * 4)
        sent = 0
        while sent < size:
            chunk = block[: min(len(block), size - sent)]
            await stream.send(chunk)
            digest.update(chunk)
            sent += len(chunk)
        await stream.close()
        got = await stream.result()
        took = time.monotonic() - t2
        return {
            "bytes": got.get("bytes"),
            "ok": got.get("bytes") == size and got.get("sha256") == digest.hexdigest(),
            "seconds": round(took, 3),
            "mib_s": round(size / took / (1 << 20), 2) if took > 0 else None,
        }

    async def _watch(self, target: bytes, seconds: float, t0: float) -> dict[str, Any]:
        """Calls (one after another) and small streams (one after another) through the
        swarm while the path may change under them; stops WATCH_AFTER after the path is
        final, or at `seconds`. Every failure is counted with its code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        final_at: list[float] = []
        changes: list[dict[str, Any]] = []
        tally = {"calls_ok": 0, "calls_failed": 0, "streams_ok": 0, "streams_failed": 0}
        errors: list[str] = []
        block = hashlib.shake_256(b"watch").digest(WATCH_STREAM)

        def note(peer: RpcPeer) -> None:
            path = path_of(peer)
            if not changes or changes[-1]["path"] != path:
                changes.append({"path": path, "ms": round((time.monotonic() - t0) * 1000, 1)})
            if path != RELAYED and not final_at:
                final_at.append(loop.time())

        def running() -> bool:
            return loop.time() < deadline and not (final_at and loop.time() - final_at[0] >= WATCH_AFTER)

        async def calls() -> None:
            while running():
                peer = self.swarm._registry.get(target)
                if peer is not None:
                    note(peer)
                try:
                    await self.swarm.request(target, "ping", None, timeout=self.swarm.config.request_timeout)
                    tally["calls_ok"] += 1
                except SwarmdError as e:
                    tally["calls_failed"] += 1
                    errors.append(f"call: {e.code}: {e.message}"[:200])

        async def streams() -> None:
            while running():
                try:
                    peer = self.swarm._registry.get(target) or await self.swarm.connect(target)
                    res = await self._stream_to(peer, len(block), block)
                    tally["streams_ok" if res["ok"] else "streams_failed"] += 1
                except SwarmdError as e:
                    tally["streams_failed"] += 1
                    errors.append(f"stream: {e.code}: {e.message}"[:200])
                await asyncio.sleep(WATCH_STREAM_GAP)  # stay inside the sink's byte budget

        async with asyncio.timeout(seconds + self.swarm.config.request_timeout * 2):
            await asyncio.gather(calls(), streams())
        peer = self.swarm._registry.get(target)
        if peer is not None:
            note(peer)
        return {
            **tally,
            "errors": errors[:10],
            "paths": changes,
            "final_path": changes[-1]["path"] if changes else None,
            "final_ms": changes[-1]["ms"] if changes else None,
        }

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
            if self.config.punch and self.nat_type != PUBLIC and not self._warmed:
                self._warmed = True
                await warm_up()  # off the loop: importing it inside a punch stalls every path for ~0.2-1 s
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
        # "direct": whether dialling our advertised addresses can work at all (public, or
        # the operator forwarded a port and set swarm.announce_addresses)
        # (only a seen translation says no: "unknown" or "udp_blocked" prove nothing about TCP)
        direct = self.nat_type not in (CONE, SYMMETRIC) or bool(self.swarm.config.announce_addresses)
        payload = {"nat": self.nat_type, "direct": direct, "signal": [k.hex() for k in chosen]}
        if self.swarm.config.announce_self:
            await self.swarm.update(peer_topic(self.swarm.identity.public_hex), payload)
        self.log.bind(event="signal_peers", nat=self.nat_type, peers=[k.hex()[:16] for k in chosen]).info(
            "signal peers updated"
        )

    # -- target side: a connection request forwarded to us -----------------------------

    async def _rpc_signal(self, ctx: CallContext, params: Any) -> Any:
        """On a public peer: forward a caller's request to a target that keeps a connection to us."""
        self.limiter.check(ctx.peer, time.monotonic())
        if not isinstance(params, dict):
            raise SwarmdError(ERR_BAD_REQUEST, "nat.signal params must be a map")
        req = parse_request({**params, "source": ctx.peer})  # the source is whoever holds the Noise key
        target = self.swarm._registry.get(req.target)
        if target is None:
            raise SwarmdError(ERR_NOT_FOUND, f"peer {req.target.hex()[:16]}… keeps no connection to this node")
        return await target.call("nat.connect", req.to_wire(), timeout=self.config.punch_timeout)

    async def _rpc_connect(self, ctx: CallContext, params: Any) -> Any:
        """On the target: a caller wants a connection (through a signal peer or over a relayed one)."""
        if not isinstance(params, dict):
            raise SwarmdError(ERR_BAD_REQUEST, "nat.connect params must be a map")
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
            self._spawn(self._accepting(PUNCHED_TCP, req.source, self._accept_tcp_punched(req.source, rv, req.addr)))
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
        cls = _CountingConnection if info.path == RELAYED else SecureConnection
        conn = cls(self.swarm.identity, initiator=initiator, remote_public_key=remote, config=server.config.net)
        if isinstance(conn, _CountingConnection):
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

    async def _accept_tcp_punched(self, source: bytes, rv: Rendezvous, addr: Address) -> None:
        t0 = time.monotonic()
        try:
            sock = await simultaneous_open(rv.port, addr, min(self.config.punch_timeout, TCP_PUNCH_TIMEOUT))
        except SwarmdError as e:
            self.metrics.attempt(PUNCHED_TCP, False)
            self.log.bind(event="punch_failed", path=PUNCHED_TCP, peer=source.hex()[:16], reason=e.message).info(
                "TCP simultaneous open failed"
            )
            return
        finally:
            rv.close()
            self._punching -= 1
        info = PathInfo(PUNCHED_TCP, time.monotonic() - t0, detail={"punch": _tcp_detail(rv, addr)})
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

    # -- caller side ------------------------------------------------------------------------

    async def own_record(self, public_key: bytes, record: PeerRecord | None, bound: float) -> PeerRecord | None:
        """The peer's own-topic record (NAT type, signal peers), or None when not found in time."""
        if record is not None and isinstance(record.payload, dict) and "signal" in record.payload:
            return record
        try:
            return await self.newest_own_record(public_key, bound)
        except (SwarmdError, TimeoutError):
            return None

    async def newest_own_record(self, public_key: bytes, bound: float) -> PeerRecord | None:
        """The highest-seq record the peer published on its own topic. A lookup may
        meet a holder that missed the latest announce (NAT type and signal peers
        change after start), so the first answer is not good enough."""
        best: PeerRecord | None = None
        for rec in await self.swarm.lookup_all(peer_topic(public_key.hex()), timeout=bound):
            if rec.public_key == public_key and (best is None or rec.seq > best.seq):
                best = rec
        return best

    async def skip_direct(self, public_key: bytes, record: PeerRecord | None) -> PeerRecord | None:
        """The peer's own record when it says its addresses cannot be dialled (behind
        NAT, no forwarded port): then the swarm skips the direct attempt, which
        would only wait for its timeout."""
        # a short bound: when the lookup is slow, trying the addresses is the better bet
        own = await self.own_record(public_key, record, min(1.0, self.swarm.config.lookup_timeout))
        if own is not None and isinstance(own.payload, dict) and own.payload.get("direct") is False:
            return own
        return None

    async def dial(
        self, public_key: bytes, record: PeerRecord | None, direct: PathAttempt, own: PeerRecord | None = None
    ) -> RpcPeer:
        """Reach a peer whose advertised addresses did not answer (or cannot): the first
        path that works carries the first call; better ones keep trying behind it."""
        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.stun_timeout * 2):
                await self._detected.wait()
        if own is None:
            own = await self.newest_own_record(public_key, self.swarm.config.lookup_timeout)
            if own is None:
                raise SwarmdError(ERR_UNAVAILABLE, f"no record for peer {public_key.hex()[:16]}… on the DHT")
        payload = own.payload if isinstance(own.payload, dict) else {}
        theirs = payload.get("nat") if isinstance(payload.get("nat"), str) else UNKNOWN
        signal = _keys(payload.get("signal"))
        if not signal:
            raise SwarmdError(ERR_UNAVAILABLE, f"peer {public_key.hex()[:16]}… is unreachable and lists no signal peer")
        first: asyncio.Future[RpcPeer] = asyncio.get_running_loop().create_future()
        race = self._spawn(self._race(public_key, signal, theirs, direct, t0, first))
        try:
            return await asyncio.shield(first)
        except asyncio.CancelledError:
            if not first.done():
                race.cancel()
            raise

    def _candidates(self, theirs: str) -> list[str]:
        """Punched paths worth trying between our NAT type and theirs, best first."""
        if not self.config.punch:
            return []
        mine = self.nat_type
        out = []
        if SYMMETRIC not in (mine, theirs):  # a symmetric NAT maps the connect() to a port the peer never saw
            out.append(PUNCHED_TCP)
        if not (mine == SYMMETRIC and theirs == SYMMETRIC) and UDP_BLOCKED not in (mine, theirs):
            out.append(PUNCHED_UDP)
        return out

    def _attempt(self, path: str, pk: bytes, signal: list[bytes] | None, via: RpcPeer | None = None) -> asyncio.Task[Any]:
        if path == PUNCHED_TCP:
            coro = self._punch_tcp(pk, signal, via)
        elif path == PUNCHED_UDP:
            coro = self._punch(pk, signal, via)
        else:
            assert signal is not None
            coro = self._relay(pk, signal)
        return asyncio.ensure_future(coro)

    async def _race(
        self, pk: bytes, signal: list[bytes], theirs: str, direct: PathAttempt, t0: float, first: asyncio.Future[RpcPeer]
    ) -> None:
        """Owned by the traversal (not the caller): runs the attempts, resolves `first`
        with the first connection, then upgrades to a punched one if the relay came first."""
        info = PathInfo(attempts=[direct])
        punches = self._candidates(theirs)
        tasks: dict[asyncio.Task[Any], tuple[str, float]] = {}
        # the TCP punch (a few ms) runs alone for a head start; the UDP punch and the relay
        # join it only when it has not finished by then (or at once when it cannot work)
        later = [p for p in punches if p != PUNCHED_TCP] + [RELAYED]
        if PUNCHED_TCP in punches:
            tasks[self._attempt(PUNCHED_TCP, pk, signal)] = (PUNCHED_TCP, time.monotonic())
        relay_at = time.monotonic() + (RELAY_HEAD_START if PUNCHED_TCP in punches else 0.0)
        relay_started = False
        current: RpcPeer | None = None
        last: SwarmdError = SwarmdError(ERR_UNAVAILABLE, "no path to the peer worked")
        try:
            while tasks or not relay_started:
                now = time.monotonic()
                if not relay_started and (now >= relay_at or not tasks):
                    relay_started = True
                    for path in later:
                        tasks[self._attempt(path, pk, signal)] = (path, now)
                wait = None if relay_started else max(0.0, relay_at - now)
                done, _ = await asyncio.wait(set(tasks), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    path, a0 = tasks.pop(task)
                    took = time.monotonic() - a0
                    exc = task.exception()
                    if exc is not None:
                        msg = exc.message if isinstance(exc, SwarmdError) else f"{type(exc).__name__}: {exc}"
                        info.attempts.append(PathAttempt(path, False, took, msg))
                        self.metrics.attempt(path, False)
                        if isinstance(exc, SwarmdError):
                            last = exc
                        continue
                    peer, pinfo = task.result()
                    self.metrics.attempt(path, True)
                    info.attempts.append(PathAttempt(path, True, took))
                    if current is not None and PATH_RANK[path] <= path_rank(current):
                        await peer.close()  # no better than what carries the calls already
                        continue
                    pinfo.attempts = list(info.attempts)
                    pinfo.setup_s = time.monotonic() - t0
                    kept = self._adopt(pk, peer, pinfo, inbound=False)
                    if current is None:
                        self.metrics.first_path[path] += 1
                        first.set_result(kept)
                    else:
                        self.metrics.upgrades += 1
                        self.metrics.upgrade_ms.append(pinfo.setup_s * 1000)
                    current = kept
                    if path != RELAYED:  # punched: nothing better to wait for
                        relay_started = True
                        await _cancel_all(tasks)
                        return
            if current is None:
                raise last
        except BaseException as e:
            await _cancel_all(tasks)
            if not first.done():
                first.set_exception(e if isinstance(e, SwarmdError) else SwarmdError(ERR_UNAVAILABLE, f"dial ended: {e!r}"))
                first.exception()  # retrieved: the dialler re-raises it
            if isinstance(e, SwarmdError):
                return
            raise
        if current is not None and path_of(current) == RELAYED and punches:
            await self._repunch(pk, current, punches, t0)

    async def _signal(self, signal: list[bytes], request: dict[str, Any]) -> Any:
        last: SwarmdError = SwarmdError(ERR_UNAVAILABLE, "no signal peer answered")
        for sp in signal:
            try:
                sp_peer = await self.swarm.connect(sp)
                return await sp_peer.call("nat.signal", request, timeout=self.config.punch_timeout)
            except SwarmdError as e:
                last = e
        raise last

    async def _ask(self, signal: list[bytes] | None, via: RpcPeer | None, request: dict[str, Any]) -> Any:
        """A connection request to the target: over a connection we hold to it, else through a signal peer."""
        if via is not None:
            return await via.call("nat.connect", request, timeout=self.config.punch_timeout)
        assert signal is not None
        return await self._signal(signal, request)

    async def _punch_tcp(self, pk: bytes, signal: list[bytes] | None, via: RpcPeer | None = None) -> tuple[RpcPeer, PathInfo]:
        """TCP simultaneous open: our mapping to the target, its mapping back, both connect()."""
        rv = await rendezvous(await self._rendezvous_relay(), timeout=self.config.stun_timeout)
        try:
            t1 = time.monotonic()
            req = SignalRequest(self.swarm.public_key, pk, KIND_TCP, addr=rv.observed).to_wire()
            answer = await self._ask(signal, via, req)
            if not isinstance(answer, dict):
                raise SwarmdError(ERR_BAD_REQUEST, "nat.connect answered a TCP punch without an address")
            addr = parse_address(answer.get("addr"), "addr")
            t2 = time.monotonic()
            sock = await simultaneous_open(rv.port, addr, min(self.config.punch_timeout, TCP_PUNCH_TIMEOUT))
        finally:
            rv.close()
        t3 = time.monotonic()
        detail = {**_tcp_detail(rv, addr), "signal_ms": round((t2 - t1) * 1000, 2), "open_ms": round((t3 - t2) * 1000, 2)}
        info = PathInfo(PUNCHED_TCP, detail={"punch": detail})
        peer = await self._over_socket(sock, True, pk, pk, info)
        detail["handshake_ms"] = round((time.monotonic() - t3) * 1000, 2)
        return peer, info

    async def _punch(self, pk: bytes, signal: list[bytes] | None, via: RpcPeer | None = None) -> tuple[RpcPeer, PathInfo]:
        """UDP: a punch offer through the target's signal peer (or over a connection we
        hold to it), then QUIC on the socket that got through. The answer's NAT type says
        whether we open many sockets (we are symmetric) or probe many ports (they are)."""
        servers = self.stun_servers()
        if not servers:
            raise SwarmdError(ERR_UNAVAILABLE, "no STUN server answered us: cannot punch")
        puncher = UdpPuncher(servers, self.nat_type, initiator=True)
        try:
            offer = await puncher.prepare()
            req = SignalRequest(self.swarm.public_key, pk, KIND_UDP, punch=offer).to_wire()
            answer = await self._ask(signal, via, req)
            if not isinstance(answer, dict) or "punch" not in answer:
                raise SwarmdError(ERR_BAD_REQUEST, "nat.connect answered without a punch offer")
            transport = await puncher.connect(parse_offer(answer["punch"]), self.config.punch_timeout)
        except BaseException:
            await puncher.close()
            raise
        info = PathInfo(PUNCHED_UDP, detail={"punch": puncher.result.to_dict()})
        conn, peer = self._new_conn(True, pk, info)
        transport.attach(conn)
        await self._established(conn, pk)
        return peer, info

    async def _relay(self, pk: bytes, signal: list[bytes]) -> tuple[RpcPeer, PathInfo]:
        relay, rtt = await pick_relay(await self.relays(), timeout=self.config.stun_timeout)
        self._best_relay = relay
        token = new_token()
        req = SignalRequest(self.swarm.public_key, pk, KIND_RELAY, relay=relay, token=token).to_wire()
        info = PathInfo(RELAYED, detail={"relay": f"{relay[0]}:{relay[1]}", "relay_rtt_ms": round(rtt * 1000, 2)})
        conn, peer = self._new_conn(True, pk, info)
        pending = asyncio.ensure_future(
            relay_transport(relay[0], relay[1], token, conn, timeout=self.config.relay_timeout)
        )
        try:
            await self._signal(signal, req)
            await pending
        except BaseException:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            conn.close(tell_peer=False)
            raise
        await self._established(conn, pk)
        return peer, info

    async def _repunch(self, pk: bytes, relayed: RpcPeer, punches: list[str], t0: float) -> None:
        """Keep trying the punches over the relayed connection; move to a punched path on success."""
        if pk in self._repunching:
            return
        self._repunching.add(pk)
        try:
            for attempt in range(REPUNCH_ROUNDS):
                await asyncio.sleep(self.config.repunch_interval)
                if relayed.is_closed or self.swarm._registry.get(pk) is not relayed:
                    return  # gone, or already on a better path (e.g. the peer dialled us)
                tasks = {self._attempt(p, pk, None, via=relayed): (p, time.monotonic()) for p in punches}
                try:
                    while tasks:
                        done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            path, a0 = tasks.pop(task)
                            if task.exception() is not None:
                                exc = task.exception()
                                self.metrics.attempt(path, False)
                                self.log.bind(event="repunch_failed", peer=pk.hex()[:16], path=path, attempt=attempt,
                                              reason=getattr(exc, "message", repr(exc))).info(
                                    "punching over the relayed connection failed; staying relayed"
                                )
                                continue
                            peer, info = task.result()
                            self.metrics.attempt(path, True)
                            info.setup_s = time.monotonic() - t0
                            info.attempts.append(PathAttempt(path, True, time.monotonic() - a0))
                            self.metrics.upgrades += 1
                            self.metrics.upgrade_ms.append(info.setup_s * 1000)
                            self._adopt(pk, peer, info, inbound=False)
                            return
                finally:
                    await _cancel_all(tasks)
        finally:
            self._repunching.discard(pk)


async def _cancel_all(tasks: dict[asyncio.Task[Any], Any]) -> None:
    """Cancel attempts still running; close any connection one finished with meanwhile."""
    pending = list(tasks)
    tasks.clear()
    for t in pending:
        t.cancel()
    for res in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(res, tuple) and res and isinstance(res[0], RpcPeer):
            await res[0].close()


def _tcp_detail(rv: Rendezvous, remote: Address) -> dict[str, Any]:
    return {"local": f"{rv.observed[0]}:{rv.observed[1]}", "remote": f"{remote[0]}:{remote[1]}",
            "rendezvous_ms": round(rv.seconds * 1000, 2)}


def _keys(value: Any) -> list[bytes]:
    out = []
    if isinstance(value, list):
        for v in value[:3]:
            if isinstance(v, str) and len(v) == 64:
                with contextlib.suppress(ValueError):
                    out.append(bytes.fromhex(v))
    return out


class TraversalPart:
    """Node part after the swarm: fills swarm.traversal and serves nat.* methods."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.traversal: Traversal | None = None

    async def start(self) -> None:
        if self.ctx.swarm is None:
            return
        self.traversal = Traversal(self.ctx.swarm, getattr(self.ctx.settings, "nat", None) or NatConfig())
        await self.traversal.start()

    async def stop(self) -> None:
        if self.traversal is not None:
            await self.traversal.stop()
