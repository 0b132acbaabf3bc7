"""One RPC connection per worker, dialled on demand and replaced when it closes.

The Router and the health monitor call workers through `call(lease, ...)`;
this is the only place that knows how a lease becomes a connection: its
registered addresses first (a worker registered by hand with host/port), the
swarm's connect-by-key otherwise (a worker found on the DHT).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError, Unreached
from swarmd.node.identity import Identity
from swarmd.orchestrator.registry import WorkerLease
from swarmd.rpc import RpcPeer, connect


class WorkerConnections:
    def __init__(
        self,
        identity: Identity | None,
        *,
        swarm: Any = None,
        connect_timeout: float = 2.0,
        records: dict[str, Any] | None = None,
    ) -> None:
        """`records`: the newest DHT record per worker (hex key), so the swarm dials its
        addresses at once instead of looking the worker up by key first."""
        self.identity = identity or Identity.generate()
        self.swarm = swarm
        self.records = records if records is not None else {}
        self.connect_timeout = connect_timeout
        self._peers: dict[str, RpcPeer] = {}
        self._dialling: dict[str, asyncio.Future[RpcPeer]] = {}
        self._owned: set[str] = set()  # workers whose connection we dialled ourselves (not the swarm's)
        self._closing = False

    async def call(self, lease: WorkerLease, method: str, params: Any, seconds: float) -> Any:
        """Call `method` on the worker; every failure is a SwarmdError with a stable code, and
        Unreached when no connection could be made (the call never left)."""
        peer = self._peers.get(lease.public_key)
        if peer is None or peer.is_closed:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            try:
                peer = await self.peer(lease, min(self.connect_timeout, seconds))
            except Unreached:
                raise
            except SwarmdError as e:
                raise Unreached(e.code, e.message, e.data) from None
            seconds = deadline - loop.time()
            if seconds <= 0.0:
                raise SwarmdError(ERR_TIMEOUT, f"no time left to call {method!r} after connecting")
        return await peer.call(method, params, timeout=seconds)

    async def peer(self, lease: WorkerLease, seconds: float) -> RpcPeer:
        """The live connection to this worker, dialling once however many calls wait for it."""
        key = lease.public_key
        peer = self._peers.get(key)
        if peer is not None and not peer.is_closed:
            return peer
        if self._closing:
            raise SwarmdError(ERR_CLOSED, "orchestrator is stopping")
        pending = self._dialling.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._dial(lease, seconds))
            self._dialling[key] = pending
            pending.add_done_callback(lambda f, k=key: self._dial_done(k, f))
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(pending)  # other callers may still wait on this dial
        except TimeoutError:
            raise SwarmdError(ERR_TIMEOUT, f"connecting to worker {key[:16]} took over {seconds:g} s") from None

    def _dial_done(self, key: str, fut: asyncio.Future[RpcPeer]) -> None:
        if self._dialling.get(key) is fut:
            del self._dialling[key]
        if fut.cancelled() or fut.exception() is not None:
            return
        peer = fut.result()
        if self._closing:
            peer.conn.close(SwarmdError(ERR_CLOSED, "orchestrator is stopping"))
            return
        old = self._peers.get(key)
        if old is not None and old is not peer and not old.is_closed and key in self._owned:
            old.conn.close(SwarmdError(ERR_CLOSED, "replaced by a newer connection"))
        self._peers[key] = peer

    async def _dial(self, lease: WorkerLease, seconds: float) -> RpcPeer:
        """A worker found on the DHT is reached through the swarm (pooled, deduplicated, any
        path the swarm knows, our own key in-process); one registered by hand at its
        host/port directly, then through the swarm."""
        remote = bytes.fromhex(lease.public_key)
        errors: list[str] = []
        if self.swarm is None or "dht" not in lease.sources:
            for host, port in lease.addresses:
                try:
                    peer = await connect(self.identity, host, port, remote_public_key=remote, timeout=seconds)
                except SwarmdError as e:
                    errors.append(f"{host}:{port}: {e.code}")
                    continue
                self._owned.add(lease.public_key)
                return peer
        if self.swarm is not None:
            peer = await self._via_swarm(remote, seconds, errors)
            if peer is not None:
                self._owned.discard(lease.public_key)
                return peer
        if not errors:
            raise SwarmdError(
                ERR_UNAVAILABLE, f"worker {lease.public_key[:16]} has no address and no swarm to find it"
            )
        raise SwarmdError(
            ERR_UNAVAILABLE, f"cannot reach worker {lease.public_key[:16]}: {'; '.join(errors)}"
        )

    async def _via_swarm(self, remote: bytes, seconds: float, errors: list[str]) -> RpcPeer | None:
        try:
            async with asyncio.timeout(seconds):  # _dial always runs in its own Task
                return await self.swarm.connect(remote, self.records.get(remote.hex()))
        except TimeoutError:
            errors.append(f"swarm: {ERR_TIMEOUT}")
        except SwarmdError as e:
            errors.append(f"swarm: {e.code}")
        return None

    def drop(self, public_key: str) -> None:
        """Close the connection to a worker that left (unregistered or lease expired)."""
        peer = self._peers.pop(public_key, None)
        if peer is not None and public_key in self._owned:  # the swarm's connections are the swarm's
            self._owned.discard(public_key)
            peer.conn.close(SwarmdError(ERR_CLOSED, "worker left the registry"))

    async def close(self) -> None:
        self._closing = True
        for fut in list(self._dialling.values()):
            fut.cancel()
        peers = [p for k, p in self._peers.items() if k in self._owned]  # the swarm's are the swarm's to close
        self._peers.clear()
        self._owned.clear()
        for p in peers:
            p.conn.close(SwarmdError(ERR_CLOSED, "orchestrator stopping"))
        with contextlib.suppress(Exception):
            await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
