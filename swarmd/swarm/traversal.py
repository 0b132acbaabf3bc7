"""NAT traversal for one node's swarm: detection, signalling, punching, relays.

Path order when the swarm cannot dial a peer's advertised addresses:

1. direct TCP (done by Swarm._dial before we are asked);
2. punched: when both sides' mappings are consistent (public or cone), send an
   ICE offer through one of the target's signal peers and run the Noise
   connection over the punched data channel;
3. relayed: pick a relay from the RELAYS topic by round trip, hand the target a
   token through its signal peer, meet it at the relay. When punching may still
   work (not symmetric x symmetric), a background task keeps trying ICE over
   the relayed connection itself and moves the peer to the punched path when it
   succeeds (the swarm's dedupe prefers the better path).

A node behind NAT keeps connections to 1-3 public peers (relays, which are
public by construction) and lists them, with its NAT type, in the payload of
its own peer-topic record. Those peers forward connection requests
("nat.signal"), rate-limited per caller key. Every path carries the same Noise
handshake (IK against the target's key) and the same RPC, so identity and
encryption do not depend on the path; which one won, and how long each attempt
took, is in `paths` (connection info), `status()` and the "path_chosen" logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
    ERR_TOO_LARGE,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.net.connection import SecureConnection
from swarmd.net.nat import CONE, PUBLIC, SYMMETRIC, UNKNOWN, NatConfig, NatReport, detect_nat
from swarmd.net.punch import PathAttempt, PathInfo, Puncher
from swarmd.net.relayio import new_token, pick_relay, relay_transport
from swarmd.net.signal import KIND_ICE, KIND_RELAY, SignalLimiter, SignalRequest, parse_request
from swarmd.node.deadline import within
from swarmd.rpc import CallContext, RpcPeer
from swarmd.topics import peer_topic

if TYPE_CHECKING:
    from swarmd.dht.records import PeerRecord
    from swarmd.swarm.swarm import Swarm

Address = tuple[str, int]
PATH_RANK = {"relayed": 0, "direct": 1, "punched": 1}  # the registry keeps the higher (rpc/registry.py)
STREAM_CHUNK = 256 * 1024
SIGNAL_CHECK_INTERVAL = 10.0
MAX_PUNCHING = 8
MAX_SINK_CALLERS = 1024  # per-caller byte buckets kept for nat.sink; the stalest is dropped beyond this


def path_of(peer: RpcPeer) -> str:
    """The path a pooled connection runs on ("direct" unless we built it)."""
    info = getattr(peer.conn, "path_info", None)
    return info.path if isinstance(info, PathInfo) and info.path else "direct"


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
        self._punching = 0  # ICE agents answering callers right now
        self._sinking = 0  # nat.sink streams being received right now
        self._sink_budget: dict[bytes, tuple[float, float]] = {}  # caller key -> (bytes available, stamp)
        self.sink_refused = 0
        self._detected = asyncio.Event()
        self.log = logger.bind(component="nat", node=swarm.identity.public_hex[:16])

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        m = self.swarm.methods
        m.register("nat.signal", self._rpc_signal, op="r")
        m.register("nat.connect", self._rpc_connect, op="r")
        m.register("nat.status", self._rpc_status, op="r")
        m.register("nat.probe", self._rpc_probe, op="w")
        m.register_stream("nat.sink", self._rpc_sink, op="r")
        self.swarm.traversal = self
        self._spawn(self._detect_loop())
        self._spawn(self._signal_keepalive())

    async def stop(self) -> None:
        self.swarm.traversal = None
        for name in ("nat.signal", "nat.connect", "nat.status", "nat.probe", "nat.sink"):
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
        }

    async def _rpc_status(self, ctx: CallContext, params: Any) -> Any:
        return self.status()

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
        (path order applies), one RPC round trip, then stream `bytes` to it."""
        if ctx.peer != self.swarm.public_key:
            raise SwarmdError(ERR_FORBIDDEN, "nat.probe runs only for this node's own key (swarmd nat probe)")
        if not isinstance(params, dict) or not isinstance(params.get("target"), str):
            raise SwarmdError(ERR_BAD_REQUEST, "nat.probe params must be {target: hex key, bytes: int}")
        try:
            target = bytes.fromhex(params["target"])
        except ValueError:
            raise SwarmdError(ERR_BAD_REQUEST, "nat.probe target must be a hex public key") from None
        size = params.get("bytes", 0)
        if not isinstance(size, int) or not 0 <= size <= self.config.probe_max_bytes:
            raise SwarmdError(ERR_BAD_REQUEST, f"nat.probe bytes must be 0..{self.config.probe_max_bytes}")
        t0 = time.monotonic()
        peer = await self.swarm.connect(target)
        connect_s = time.monotonic() - t0
        t1 = time.monotonic()
        remote = await peer.call("nat.status", None, timeout=self.swarm.config.request_timeout)
        rtt = time.monotonic() - t1
        out: dict[str, Any] = {
            "path": path_of(peer),
            "connect_ms": round(connect_s * 1000, 2),
            "rtt_ms": round(rtt * 1000, 3),
            "connection": (self.paths[target].to_dict() if target in self.paths else {"path": path_of(peer)}),
            "remote_nat": remote.get("nat") if isinstance(remote, dict) else None,
        }
        if size:
            block = hashlib.shake_256(target).digest(STREAM_CHUNK)
            digest = hashlib.sha256()
            t2 = time.monotonic()
            stream = await peer.open_stream("nat.sink", None, timeout=self.swarm.config.request_timeout * 4)
            sent = 0
            while sent < size:
                chunk = block[: min(STREAM_CHUNK, size - sent)]
                await stream.send(chunk)
                digest.update(chunk)
                sent += len(chunk)
            await stream.close()
            got = await stream.result()
            took = time.monotonic() - t2
            out["stream"] = {
                "bytes": got.get("bytes"),
                "ok": got.get("bytes") == size and got.get("sha256") == digest.hexdigest(),
                "seconds": round(took, 3),
                "mib_s": round(size / took / (1 << 20), 2) if took > 0 else None,
            }
        out["path"] = path_of(peer)  # the stream may have moved to a punched path meanwhile
        return out

    # -- NAT detection and signal peers ------------------------------------------------

    @property
    def nat_type(self) -> str:
        if self.config.assume:
            return self.config.assume
        return self.report.nat_type if self.report else "unknown"

    def stun_servers(self) -> list[Address]:
        """DHT nodes that answered our STUN: the only STUN servers ICE may use."""
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
            lambda server: dht.stun(server, self.config.stun_timeout), servers, local, config=self.config
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
        if self.nat_type != PUBLIC:
            for rec in await self.swarm.lookup_all(topics.RELAYS):
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
        if req.kind == KIND_ICE:
            servers = self.stun_servers()
            if not servers:
                raise SwarmdError(ERR_UNAVAILABLE, "no STUN server answered us: cannot punch")
            if self._punching >= MAX_PUNCHING:  # each attempt holds an ICE agent and sockets
                raise SwarmdError(ERR_OVERLOADED, f"{MAX_PUNCHING} punching attempts already running")
            puncher = Puncher(servers)
            answer = await puncher.answer(req.sdp)
            self._punching += 1
            self._spawn(self._accept_punched(req.source, puncher))
            return {"sdp": answer}
        assert req.relay is not None
        self._spawn(self._accept_relayed(req.source, req.relay, req.token))
        return {"ok": True}

    def _is_pooled(self, pk: bytes) -> bool:
        return self.swarm._registry.get(pk) is not None

    def _new_conn(self, initiator: bool, remote: bytes | None, info: PathInfo) -> tuple[SecureConnection, RpcPeer]:
        server = self.swarm.server
        conn = SecureConnection(
            self.swarm.identity, initiator=initiator, remote_public_key=remote, config=server.config.net
        )
        conn.path_info = info  # type: ignore[attr-defined]  # connection info: which path carries it
        conn.path_rank = PATH_RANK.get(info.path, 1)  # type: ignore[attr-defined]  # dedupe: better path wins
        peer = RpcPeer(conn, self.swarm.methods, firewall=server.firewall, config=server.config)
        return conn, peer

    async def _established(self, conn: SecureConnection, expected: bytes) -> None:
        try:
            await within(asyncio.shield(conn.established), self.config.relay_timeout)
        except TimeoutError:
            conn.close(SwarmdError(ERR_TIMEOUT, "handshake over the new path timed out"), tell_peer=False)
            raise SwarmdError(ERR_TIMEOUT, "handshake over the new path timed out") from None
        if conn.remote_public_key != expected:
            conn.close(SwarmdError(ERR_BAD_REQUEST, "peer on the new path is not the one who asked"))
            raise SwarmdError(ERR_BAD_REQUEST, "peer on the new path is not the one who asked")

    async def _accept_punched(self, source: bytes, puncher: Puncher) -> None:
        t0 = time.monotonic()
        try:
            transport = await puncher.connected(self.config.punch_timeout)
        finally:
            self._punching -= 1
        info = PathInfo("punched", time.monotonic() - t0, detail={"punch": _punch_detail(transport.info)})
        conn, peer = self._new_conn(False, None, info)
        transport.attach(conn)
        await self._established(conn, source)
        self._adopt(source, peer, info, inbound=True)

    async def _accept_relayed(self, source: bytes, relay: Address, token: bytes) -> None:
        t0 = time.monotonic()
        info = PathInfo("relayed")
        conn, peer = self._new_conn(False, None, info)
        rp = await relay_transport(relay[0], relay[1], token, conn, timeout=self.config.relay_timeout)
        await self._established(conn, source)
        info.setup_s = time.monotonic() - t0
        info.detail = {"relay": f"{rp.relay[0]}:{rp.relay[1]}"}
        self._adopt(source, peer, info, inbound=True)

    def _adopt(self, pk: bytes, peer: RpcPeer, info: PathInfo, *, inbound: bool) -> RpcPeer:
        kept = self.swarm._register(peer, inbound=inbound)
        if kept is peer:
            self.paths[pk] = info
            peer.closed.add_done_callback(lambda _f: self.paths.pop(pk, None) if self.paths.get(pk) is info else None)
        self.log.bind(event="path_chosen", peer=pk.hex()[:16], inbound=inbound, kept=kept is peer, **info.to_dict()).info(
            "connection over the {} path", info.path
        )
        return kept

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
        """Reach a peer whose advertised addresses did not answer (or cannot): punched or relayed."""
        t0 = time.monotonic()
        info = PathInfo(attempts=[direct])
        with contextlib.suppress(TimeoutError):
            await within(self._detected.wait(), self.config.stun_timeout * 2)
        if own is None:
            own = await self.newest_own_record(public_key, self.swarm.config.lookup_timeout)
            if own is None:
                raise SwarmdError(ERR_NOT_FOUND, f"no record for peer {public_key.hex()[:16]}… on the DHT")
        payload = own.payload if isinstance(own.payload, dict) else {}
        theirs = payload.get("nat") if isinstance(payload.get("nat"), str) else "unknown"
        signal = _keys(payload.get("signal"))
        if not signal:
            raise SwarmdError(ERR_UNAVAILABLE, f"peer {public_key.hex()[:16]}… is unreachable and lists no signal peer")
        mine = self.nat_type
        punch_first = self.config.punch and mine in (PUBLIC, CONE) and theirs in (PUBLIC, CONE)
        if punch_first:
            a0 = time.monotonic()
            try:
                peer = await self._punch(public_key, signal, info)
                info.attempts.append(PathAttempt("punched", True, time.monotonic() - a0))
                info.setup_s = time.monotonic() - t0
                return self._adopt(public_key, peer, info, inbound=False)
            except SwarmdError as e:
                info.attempts.append(PathAttempt("punched", False, time.monotonic() - a0, e.message))
        a0 = time.monotonic()
        peer = await self._relay(public_key, signal, info)
        info.attempts.append(PathAttempt("relayed", True, time.monotonic() - a0))
        info.setup_s = time.monotonic() - t0
        kept = self._adopt(public_key, peer, info, inbound=False)
        if self.config.punch and not punch_first and not (mine == SYMMETRIC and theirs == SYMMETRIC):
            self._spawn(self._repunch(public_key, kept))
        return kept

    async def _signal(self, signal: list[bytes], request: dict[str, Any]) -> Any:
        last: SwarmdError = SwarmdError(ERR_UNAVAILABLE, "no signal peer answered")
        for sp in signal:
            try:
                sp_peer = await self.swarm.connect(sp)
                return await sp_peer.call("nat.signal", request, timeout=self.config.punch_timeout)
            except SwarmdError as e:
                last = e
        raise last

    async def _punch(self, pk: bytes, signal: list[bytes] | None, info: PathInfo, via: RpcPeer | None = None) -> RpcPeer:
        servers = self.stun_servers()
        if not servers:
            raise SwarmdError(ERR_UNAVAILABLE, "no STUN server answered us: cannot punch")
        puncher = Puncher(servers)
        try:
            req = SignalRequest(self.swarm.public_key, pk, KIND_ICE, sdp=await puncher.offer()).to_wire()
            if via is not None:
                answer = await via.call("nat.connect", req, timeout=self.config.punch_timeout)
            else:
                assert signal is not None
                answer = await self._signal(signal, req)
            if not isinstance(answer, dict) or not isinstance(answer.get("sdp"), str):
                raise SwarmdError(ERR_BAD_REQUEST, "nat.connect answered without an ICE description")
            await puncher.accept_answer(answer["sdp"])
            transport = await puncher.connected(self.config.punch_timeout)
        except BaseException:
            await puncher.close()
            raise
        info.path = "punched"
        info.detail = {"punch": _punch_detail(transport.info)}
        conn, peer = self._new_conn(True, pk, info)
        transport.attach(conn)
        await self._established(conn, pk)
        return peer

    async def _relay(self, pk: bytes, signal: list[bytes], info: PathInfo) -> RpcPeer:
        relays: list[Address] = []
        for rec in await self.swarm.lookup_all(topics.RELAYS):
            port = rec.payload.get("relay_port") if isinstance(rec.payload, dict) else None
            if isinstance(port, int) and rec.addresses:
                relays += [(host, port) for host, _ in rec.addresses]
        relay, rtt = await pick_relay(relays, timeout=self.config.stun_timeout)
        token = new_token()
        req = SignalRequest(self.swarm.public_key, pk, KIND_RELAY, relay=relay, token=token).to_wire()
        info.path = "relayed"
        info.detail = {"relay": f"{relay[0]}:{relay[1]}", "relay_rtt_ms": round(rtt * 1000, 2)}
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
        return peer

    async def _repunch(self, pk: bytes, relayed: RpcPeer) -> None:
        """Keep trying ICE over the relayed connection; move to the punched path on success."""
        if pk in self._repunching:
            return
        self._repunching.add(pk)
        try:
            for attempt in range(3):
                if relayed.is_closed:
                    return
                a0 = time.monotonic()
                info = PathInfo()
                try:
                    peer = await self._punch(pk, None, info, via=relayed)
                except SwarmdError as e:
                    self.log.bind(event="repunch_failed", peer=pk.hex()[:16], attempt=attempt, reason=e.message).info(
                        "punching over the relayed connection failed; staying relayed"
                    )
                    await asyncio.sleep(self.config.repunch_interval)
                    continue
                info.setup_s = time.monotonic() - a0
                info.attempts.append(PathAttempt("punched", True, info.setup_s))
                self.log.bind(event="path_upgraded", peer=pk.hex()[:16], **info.to_dict()).info(
                    "relayed connection moved to a punched path"
                )
                self._adopt(pk, peer, info, inbound=False)
                return
        finally:
            self._repunching.discard(pk)


def _keys(value: Any) -> list[bytes]:
    out = []
    if isinstance(value, list):
        for v in value[:3]:
            if isinstance(v, str) and len(v) == 64:
                with contextlib.suppress(ValueError):
                    out.append(bytes.fromhex(v))
    return out


def _punch_detail(info: Any) -> dict[str, Any]:
    return {"local": info.local, "remote": info.remote, "remote_type": info.remote_type}


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
