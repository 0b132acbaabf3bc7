"""The path test behind `swarmd nat probe`: nat.probe on the caller, nat.sink on the target.

An operator asks their own node to connect to a peer (the usual path order),
time the first RPC, keep calling and streaming while the path may move
(counting every failure: an upgrade must never fail a call), then stream a
payload on the final path. The target counts and hashes what arrives, within
a byte budget per caller. Diagnostics only: no other part of the node calls these.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import TYPE_CHECKING, Any

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_FORBIDDEN,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    SwarmdError,
)
from swarmd.node.ratelimit import RateLimiter
from swarmd.rpc import CallContext, RpcPeer
from swarmd.rpc.params import as_params, int_param, str_param
from swarmd.swarm.paths import RELAYED, path_of

if TYPE_CHECKING:
    from swarmd.swarm.traversal import Traversal

MAX_WATCH = 120.0  # s nat.probe may keep calling across path changes
WATCH_AFTER = 0.5  # s nat.probe keeps calling on the final path before it stops
WATCH_STREAM = 64 * 1024  # bytes per stream while watching
WATCH_STREAM_GAP = 0.01  # s between those streams (the sink's budget is sink_rate/s after its burst)
STREAM_CHUNK = 256 * 1024  # bytes per send of a probe stream, and the length of its repeating pattern
PATTERN_SEED_MAX = 32  # bytes of the seed a nat.sink caller names its pattern by
MAX_SINK_CALLERS = 1024  # per-caller byte buckets kept for nat.sink; the stalest is dropped beyond this


class PathProbe:
    """Serves nat.probe and nat.sink for one traversal (registered by it)."""

    def __init__(self, traversal: Traversal) -> None:
        self.traversal = traversal
        self.swarm = traversal.swarm
        self.config = traversal.config
        self._sinking = 0  # nat.sink streams being received right now
        # caller key -> bytes it may still send (sink_rate per second, probe_max_bytes deep)
        self._sink_budget = RateLimiter(self.config.sink_rate, self.config.probe_max_bytes, MAX_SINK_CALLERS)
        self.sink_refused = 0
        self._seed = os.urandom(16)  # this node's probe streams repeat pattern_block(seed)
        self._block = pattern_block(self._seed)
        self._sink_blocks: dict[bytes, bytes] = {}  # seed -> doubled pattern, the last few callers'

    def register(self) -> None:
        self.swarm.methods.register("nat.probe", self._rpc_probe, op="w")
        self.swarm.methods.register_stream("nat.sink", self._rpc_sink, op="r")

    def unregister(self) -> None:
        for name in ("nat.probe", "nat.sink"):
            self.swarm.methods.unregister(name)

    async def _rpc_sink(self, ctx: CallContext, params: Any, stream: Any) -> Any:
        """Count and check what a peer streams to us (bounded): the receiving end of a path test.

        With params `{"pattern": seed}` the stream must repeat pattern_block(seed) and is
        compared with it as it arrives (a memcmp in place, ~40 us per MiB: the check
        costs the figure next to nothing); the answer is `{bytes, match}`. Without, every byte is hashed
        (`{bytes, sha256}`, ~1 ms per MiB here, as much CPU as the decryption: older
        probes). Any admitted peer may call it, so it is bounded three ways: [nat] sink
        can turn it off, each caller key has a byte budget (sink_rate/s, probe_max_bytes
        deep), and at most sink_concurrency streams run at once; a stream that stalls for
        request_timeout fails.
        """
        if not self.config.sink:
            raise SwarmdError(ERR_FORBIDDEN, "nat.sink is disabled on this node ([nat] sink = false)")
        seed = params.get("pattern") if isinstance(params, dict) else None
        if seed is not None and (not isinstance(seed, bytes) or not 1 <= len(seed) <= PATTERN_SEED_MAX):
            raise SwarmdError(ERR_BAD_REQUEST, f"nat.sink pattern must be 1..{PATTERN_SEED_MAX} bytes (bin)")
        if self._sinking >= self.config.sink_concurrency:
            self.sink_refused += 1
            raise SwarmdError(ERR_OVERLOADED, f"nat.sink is serving {self._sinking} streams; try again later")
        self._sinking += 1
        try:
            digest = hashlib.sha256() if seed is None else None
            doubled = self._sink_pattern(seed) if seed is not None else b""
            match = True
            n = 0
            loop = asyncio.get_running_loop()
            stall = self.swarm.config.request_timeout
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the caller's cancel
                async with asyncio.timeout_at(loop.time() + stall) as watch:
                    renew_at = loop.time() + stall / 2
                    while True:
                        chunk = await stream.recv()
                        if chunk is None:
                            break
                        # a stream that stalls for request_timeout (half of it at the least) fails;
                        # the deadline moves once per half of it, not per chunk (a timer each)
                        now = loop.time()
                        if now >= renew_at:
                            watch.reschedule(now + stall)
                            renew_at = now + stall / 2
                        if n + len(chunk) > self.config.probe_max_bytes:
                            raise SwarmdError(
                                ERR_TOO_LARGE, f"nat.sink takes at most {self.config.probe_max_bytes} bytes"
                            )
                        if not self._sink_budget.take(ctx.peer, time.monotonic(), cost=len(chunk)) == 0.0:
                            self.sink_refused += 1
                            raise SwarmdError(
                                ERR_OVERLOADED, f"nat.sink budget spent for this key ({self.config.sink_rate} B/s)"
                            )
                        if digest is not None:
                            digest.update(chunk)
                        elif match:
                            at = n % STREAM_CHUNK  # a chunk is at most a mux frame (< STREAM_CHUNK)
                            match = len(chunk) <= STREAM_CHUNK and doubled.startswith(chunk, at)  # memcmp in place
                        n += len(chunk)
            except TimeoutError:
                raise SwarmdError(ERR_TIMEOUT, "nat.sink stream stalled") from None
            if digest is not None:
                return {"bytes": n, "sha256": digest.hexdigest()}
            return {"bytes": n, "match": match}
        finally:
            self._sinking -= 1

    def _sink_pattern(self, seed: bytes) -> bytes:
        doubled = self._sink_blocks.get(seed)
        if doubled is None:
            if len(self._sink_blocks) >= 4:  # at most sink_concurrency callers stream at once
                self._sink_blocks.pop(next(iter(self._sink_blocks)))
            block = pattern_block(seed)
            doubled = self._sink_blocks[seed] = block + block
        return doubled

    async def _rpc_probe(self, ctx: CallContext, params: Any) -> Any:
        """Operator's path test, for this node's own key only: connect to a peer
        (path order applies), one RPC round trip; with `watch` seconds, keep calling
        and streaming through the swarm (whichever connection it hands out) until the
        path is final (not relayed) or the time is up, counting every failure; then
        stream `bytes` to it on the path it ended on."""
        if ctx.peer != self.swarm.public_key:
            raise SwarmdError(ERR_FORBIDDEN, "nat.probe runs only for this node's own key (swarmd nat probe)")
        params = as_params(params, "nat.probe", required=("target",))
        try:
            target = bytes.fromhex(str_param(params, "target", "nat.probe", 64) or "-")
        except ValueError:
            raise SwarmdError(ERR_BAD_REQUEST, "nat.probe target must be a hex public key") from None
        size = int_param(params, "bytes", "nat.probe", 0, 0, self.config.probe_max_bytes)
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
            "connection": (self.traversal.paths[target].to_dict() if target in self.traversal.paths else {"path": path_of(peer)}),
            "remote_nat": remote.get("nat") if isinstance(remote, dict) else None,
        }
        if watch:
            # the history starts with the path the first call took: a punch can win while
            # that call is under way, before the watch's own first call
            out["watch"] = await self._watch(target, float(watch), t0, {"path": out["first_path"], "ms": out["connect_ms"]})
            peer = self.swarm._registry.get(target) or await self.swarm.connect(target)
            out["connection"] = self.traversal.paths[target].to_dict() if target in self.traversal.paths else {"path": path_of(peer)}
        if size:
            out["stream"] = await self._stream_to(peer, size)
        out["path"] = path_of(peer)  # the stream may have moved to a punched path meanwhile
        return out

    async def _stream_to(self, peer: RpcPeer, size: int) -> dict[str, Any]:
        """Stream `size` bytes of this node's pattern to nat.sink and time it; `ok` when the
        sink saw exactly them (compared as they arrived, or by sha256 on a sink without
        pattern checks, computed here after the clock stopped)."""
        block = self._block
        t2 = time.monotonic()
        stream = await peer.open_stream(
            "nat.sink", {"pattern": self._seed}, timeout=self.swarm.config.request_timeout * 4
        )
        sent = 0
        while sent < size:
            chunk = block if size - sent >= len(block) else block[: size - sent]
            await stream.send(chunk)
            sent += len(chunk)
        await stream.close()
        got = await stream.result()
        took = time.monotonic() - t2
        if not isinstance(got, dict):
            got = {}
        if "match" in got:
            ok = got.get("bytes") == size and got["match"] is True
        else:  # an older sink hashes what it received
            ok = got.get("bytes") == size and got.get("sha256") == pattern_sha256(block, size)
        session = getattr(getattr(peer, "conn", None), "session", None)
        return {
            "bytes": got.get("bytes"),
            "ok": ok,
            "cipher": getattr(session, "cipher_send", None),  # ChaChaPoly, or AESGCM after the upgrade
            "seconds": round(took, 3),
            "mib_s": round(size / took / (1 << 20), 2) if took > 0 else None,
        }

    async def _watch(self, target: bytes, seconds: float, t0: float, first: dict[str, Any]) -> dict[str, Any]:
        """Calls (one after another) and small streams (one after another) through the
        swarm while the path may change under them; stops WATCH_AFTER after the path is
        final, or at `seconds`. Every failure is counted with its code. `paths` lists each
        change of path from `first` (the first call's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        final_at: list[float] = []
        changes: list[dict[str, Any]] = [first]
        tally = {"calls_ok": 0, "calls_failed": 0, "streams_ok": 0, "streams_failed": 0}
        errors: list[str] = []

        def note(peer: RpcPeer) -> None:
            path = path_of(peer)
            if not changes or changes[-1]["path"] != path:
                changes.append({"path": path, "ms": round((time.monotonic() - t0) * 1000, 1)})
            # final: not relayed, and no dial is still trying a better path (a UDP punch
            # may be followed by a TCP birthday punch)
            if path != RELAYED and not final_at and target not in self.traversal.dialer.racing:
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
                    res = await self._stream_to(peer, WATCH_STREAM)
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


def pattern_block(seed: bytes) -> bytes:
    """The STREAM_CHUNK bytes a probe stream repeats: byte i of the stream is block[i % STREAM_CHUNK]."""
    return hashlib.shake_256(b"swarmd nat.sink pattern\x00" + seed).digest(STREAM_CHUNK)


def pattern_sha256(block: bytes, size: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(size, len(block))
    for _ in range(full):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()
