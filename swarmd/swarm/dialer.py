"""The caller's side of NAT traversal: race the paths to a peer, keep the first, upgrade.

When the swarm cannot dial a peer's advertised addresses (Swarm._dial tries
them first, or skips them when the peer's record says it is behind NAT), the
first byte goes out at once on the first path that works and the better paths
keep trying behind it (the iroh / libp2p-DCUtR model):

- punched-tcp: TCP simultaneous open (swarmd/net/tcppunch.py) when neither side
  is symmetric: each side learns its TCP mapping from a relay's PONG, the two
  swap them through a signal peer and connect() at each other;
- punched-udp: a UDP punch (swarmd/net/udppunch.py; birthday punching when one
  side is symmetric) carrying UDX on the punched socket (swarmd/net/udx.py),
  unless both sides are symmetric;
- relayed: pick a relay from the RELAYS topic by round trip, hand the target a
  token through its signal peer, meet it at the relay. It starts after a short
  head start of the TCP punch (RELAY_HEAD_START), or at once when no TCP punch
  can work, so a relay circuit is spent only where a punch is slow or fails.

The first path to finish carries the first call. When that is the relay, the
punches keep running (and are retried over the relayed connection every
repunch_interval); the swarm moves new calls to a punched connection the
moment it is established (its registry ranks paths: Swarm._register), while
calls in flight on the relayed one finish there before it is closed. The
target's half of each attempt is in swarmd/swarm/traversal.py (nat.connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.nat import SYMMETRIC, UDP_BLOCKED, UNKNOWN
from swarmd.net.punch import PathAttempt, PathInfo
from swarmd.net.relayio import new_token, pick_relay, relay_transport
from swarmd.net.signal import KIND_RELAY, KIND_TCP, KIND_UDP, SignalRequest
from swarmd.net.tcppunch import BIRTHDAY_TIMEOUT, is_birthday, punch_open, rendezvous
from swarmd.net.udppunch import UdpPuncher, parse_offer
from swarmd.node.address import parse_address
from swarmd.rpc import RpcPeer
from swarmd.swarm.paths import MAPPED, PATH_RANK, PUNCHED_TCP, PUNCHED_UDP, RELAYED, path_of, path_rank
from swarmd.topics import peer_topic

if TYPE_CHECKING:
    from swarmd.dht.records import PeerRecord
    from swarmd.swarm.traversal import Traversal

Address = tuple[str, int]
RELAY_HEAD_START = 0.03  # s the TCP punch (~10 ms in the lab) runs alone before a relay circuit is spent
TCP_PUNCH_TIMEOUT = 3.0  # a simultaneous open that has not completed by then will not
REPUNCH_ROUNDS = 3
MAX_MAPPED_PEERS = 4096  # peers whose mapped addresses we remember (the oldest is dropped beyond)


class Dialer:
    """One per traversal (traversal.dialer): reaches peers the swarm could not dial."""

    def __init__(self, traversal: Traversal) -> None:
        self.traversal = traversal
        self.swarm = traversal.swarm
        self.config = traversal.config
        self.metrics = traversal.metrics
        self.log = traversal.log
        self._repunching: set[bytes] = set()
        self.racing: dict[bytes, int] = {}  # peer key -> dials still trying paths to it
        self._mapped: dict[bytes, list[str]] = {}  # peer key -> "ip:port" its own record lists as mapped

    def mapped_of(self, public_key: bytes, record: PeerRecord | None) -> list[str]:
        """The mapped addresses the peer's own record lists (this record, else the last one read)."""
        if record is not None and record.public_key == public_key and isinstance(record.payload, dict) \
                and "signal" in record.payload:
            self._note_mapped(record)
        return self._mapped.get(public_key, [])

    def label_direct(self, peer: RpcPeer, record: PeerRecord | None, address: Address) -> None:
        """A dialled TCP connection reached a port the peer's router forwards (its own
        record lists the address as "mapped"): label it `mapped` before the pool counts it."""
        listed = self.mapped_of(peer.remote_public_key, record)
        if f"{address[0]}:{address[1]}" in listed:
            info = PathInfo(MAPPED, detail={"mapped": f"{address[0]}:{address[1]}"})
            peer.conn.path_info = info  # type: ignore[attr-defined]
            peer.conn.path_rank = PATH_RANK[MAPPED]  # type: ignore[attr-defined]
            pk = peer.remote_public_key
            self.traversal.paths[pk] = info
            peer.closed.add_done_callback(lambda _f: self.traversal.paths.pop(pk, None) if self.traversal.paths.get(pk) is info else None)

    def _note_mapped(self, record: PeerRecord) -> None:
        listed = record.payload.get("mapped") if isinstance(record.payload, dict) else None
        if isinstance(listed, list) and listed:
            if len(self._mapped) >= MAX_MAPPED_PEERS and record.public_key not in self._mapped:
                self._mapped.pop(next(iter(self._mapped)))
            self._mapped[record.public_key] = [a for a in listed[:4] if isinstance(a, str) and len(a) <= 64]
        else:
            self._mapped.pop(record.public_key, None)

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
        if best is not None:
            self._note_mapped(best)
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
                await self.traversal._detected.wait()
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
        race = self.traversal._spawn(self._race(public_key, signal, theirs, direct, t0, first))
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
        mine = self.traversal.nat_type
        out = []
        # a symmetric NAT maps the connect() to a port the peer never saw: with a cone peer
        # that takes the birthday search (swarmd/net/tcppunch.py), two symmetric ones never meet
        if self.config.punch_tcp and (SYMMETRIC not in (mine, theirs) or is_birthday(mine, theirs)):
            out.append(PUNCHED_TCP)
        if not (mine == SYMMETRIC and theirs == SYMMETRIC) and UDP_BLOCKED not in (mine, theirs):
            out.append(PUNCHED_UDP)
        return out

    def _attempt(self, path: str, pk: bytes, signal: list[bytes] | None, via: RpcPeer | None = None,
                 theirs: str = UNKNOWN) -> asyncio.Task[Any]:
        if path == PUNCHED_TCP:
            coro = self._punch_tcp(pk, signal, via, theirs)
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
        with the first connection, then upgrades to a punched one if the relay came first.
        While it runs, the peer is in `racing`: a better path may still come."""
        self.racing[pk] = self.racing.get(pk, 0) + 1
        try:
            await self._run_race(pk, signal, theirs, direct, t0, first)
        finally:
            self.racing[pk] -= 1
            if not self.racing[pk]:
                del self.racing[pk]

    async def _run_race(
        self, pk: bytes, signal: list[bytes], theirs: str, direct: PathAttempt, t0: float, first: asyncio.Future[RpcPeer]
    ) -> None:
        info = PathInfo(attempts=[direct])
        punches = self._candidates(theirs)
        tasks: dict[asyncio.Task[Any], tuple[str, float]] = {}
        # the TCP punch (a few ms) runs alone for a head start; the UDP punch and the relay
        # join it only when it has not finished by then (or at once when it cannot work)
        later = [p for p in punches if p != PUNCHED_TCP] + [RELAYED]
        if PUNCHED_TCP in punches:
            tasks[self._attempt(PUNCHED_TCP, pk, signal, theirs=theirs)] = (PUNCHED_TCP, time.monotonic())
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
                        tasks[self._attempt(path, pk, signal, theirs=theirs)] = (path, now)
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
                    kept = self.traversal._adopt(pk, peer, pinfo, inbound=False)
                    if current is None:
                        self.metrics.first_path[path] += 1
                        first.set_result(kept)
                    else:
                        self.metrics.upgrades += 1
                        self.metrics.upgrade_ms.append(pinfo.setup_s * 1000)
                    current = kept
                    if path != RELAYED:  # punched: only a better-ranked punch is still worth waiting for
                        relay_started = True  # (a UDP punch that won keeps the TCP punch running behind it)
                        await _cancel_all(tasks, up_to_rank=PATH_RANK[path])
                        if not tasks:
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
            await self._repunch(pk, current, punches, t0, theirs)

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

    async def _punch_tcp(self, pk: bytes, signal: list[bytes] | None, via: RpcPeer | None = None,
                         theirs: str = UNKNOWN) -> tuple[RpcPeer, PathInfo]:
        """TCP simultaneous open: our mapping to the target, its mapping back, both connect()
        (a birthday search when one side is symmetric, see swarmd/net/tcppunch.py)."""
        mine = self.traversal.nat_type
        birthday = is_birthday(mine, theirs)
        rv = await rendezvous(await self.traversal._rendezvous_relay(), timeout=self.config.stun_timeout)
        try:
            t1 = time.monotonic()
            req = SignalRequest(self.swarm.public_key, pk, KIND_TCP, addr=rv.observed, nat=mine).to_wire()
            answer = await self._ask(signal, via, req)
            if not isinstance(answer, dict):
                raise SwarmdError(ERR_BAD_REQUEST, "nat.connect answered a TCP punch without an address")
            addr = parse_address(answer.get("addr"), "nat.connect answer 'addr'")
            t2 = time.monotonic()
            bound = BIRTHDAY_TIMEOUT if birthday else TCP_PUNCH_TIMEOUT
            sock = await punch_open(rv, addr, mine, theirs, min(self.config.punch_timeout, bound))
        finally:
            rv.close()
        t3 = time.monotonic()
        detail = {**rv.detail(addr), "signal_ms": round((t2 - t1) * 1000, 2), "open_ms": round((t3 - t2) * 1000, 2),
                  "birthday": birthday}
        info = PathInfo(PUNCHED_TCP, detail={"punch": detail})
        peer = await self.traversal._over_socket(sock, True, pk, pk, info)
        detail["handshake_ms"] = round((time.monotonic() - t3) * 1000, 2)
        return peer, info

    async def _punch(self, pk: bytes, signal: list[bytes] | None, via: RpcPeer | None = None) -> tuple[RpcPeer, PathInfo]:
        """UDP: a punch offer through the target's signal peer (or over a connection we
        hold to it), then UDX on the socket that got through. The answer's NAT type says
        whether we open many sockets (we are symmetric) or probe many ports (they are)."""
        servers = self.traversal.stun_servers()
        if not servers:
            raise SwarmdError(ERR_UNAVAILABLE, "no STUN server answered us: cannot punch")
        puncher = UdpPuncher(servers, self.traversal.nat_type, initiator=True)
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
        conn, peer = self.traversal._new_conn(True, pk, info)
        transport.attach(conn)
        await self.traversal._established(conn, pk)
        return peer, info

    async def _relay(self, pk: bytes, signal: list[bytes]) -> tuple[RpcPeer, PathInfo]:
        relay, rtt = await pick_relay(await self.traversal.relays(), timeout=self.config.stun_timeout)
        self.traversal._best_relay = relay
        token = new_token()
        req = SignalRequest(self.swarm.public_key, pk, KIND_RELAY, relay=relay, token=token).to_wire()
        info = PathInfo(RELAYED, detail={"relay": f"{relay[0]}:{relay[1]}", "relay_rtt_ms": round(rtt * 1000, 2)})
        conn, peer = self.traversal._new_conn(True, pk, info)
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
        await self.traversal._established(conn, pk)
        return peer, info

    async def _repunch(self, pk: bytes, relayed: RpcPeer, punches: list[str], t0: float, theirs: str) -> None:
        """Keep trying the punches over the relayed connection; move to a punched path on success."""
        if pk in self._repunching:
            return
        self._repunching.add(pk)
        try:
            for attempt in range(REPUNCH_ROUNDS):
                await asyncio.sleep(self.config.repunch_interval)
                if relayed.is_closed or self.swarm._registry.get(pk) is not relayed:
                    return  # gone, or already on a better path (e.g. the peer dialled us)
                tasks = {self._attempt(p, pk, None, via=relayed, theirs=theirs): (p, time.monotonic()) for p in punches}
                moved = False
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
                            self.traversal._adopt(pk, peer, info, inbound=False)
                            moved = True  # a better-ranked punch still running may follow (UDP won, TCP later)
                            await _cancel_all(tasks, up_to_rank=PATH_RANK[path])
                    if moved:
                        return
                finally:
                    await _cancel_all(tasks)
        finally:
            self._repunching.discard(pk)


async def _cancel_all(tasks: dict[asyncio.Task[Any], Any], up_to_rank: int | None = None) -> None:
    """Cancel attempts still running (only those whose path ranks at most `up_to_rank`, when
    given); close any connection one finished with meanwhile."""
    pending = [t for t, (path, _) in tasks.items() if up_to_rank is None or PATH_RANK[path] <= up_to_rank]
    for t in pending:
        del tasks[t]
    for t in pending:
        t.cancel()
    for res in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(res, tuple) and res and isinstance(res[0], RpcPeer):
            await res[0].close()


def _keys(value: Any) -> list[bytes]:
    out = []
    if isinstance(value, list):
        for v in value[:3]:
            if isinstance(v, str) and len(v) == 64:
                with contextlib.suppress(ValueError):
                    out.append(bytes.fromhex(v))
    return out
