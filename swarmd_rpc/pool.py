"""Connections pooled per peer, calls with auto-retry, fan-out to many peers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from swarmd.errors import ERR_CLOSED, ERR_INTERNAL, SwarmdError
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcConfig, RpcPeer
from swarmd.rpc import connect as _connect


@dataclass(frozen=True)
class Target:
    """Where a peer listens and, ideally, who it must be."""

    host: str
    port: int
    public_key: bytes | None = None


@dataclass
class PoolConfig:
    """How long idle connections live, how often a call is retried on a fresh one, dial timeout."""

    idle_timeout: float = 60.0  # close a pooled connection unused for this long
    retries: int = 1  # extra attempts of a call whose connection closed under it
    connect_timeout: float = 10.0


class _Entry:
    __slots__ = ("peer", "last_used", "busy")

    def __init__(self, peer: RpcPeer, now: float) -> None:
        self.peer = peer
        self.last_used = now
        self.busy = 0


class Pool:
    """One connection per target, opened on first use, closed when idle.

    Concurrent first uses share one dial. A call that fails with ERR_CLOSED
    (the connection died under it) is retried on a fresh connection, up to
    `retries` times; any other error is the answer.
    """

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        config: PoolConfig | None = None,
        rpc_config: RpcConfig | None = None,
        methods: Methods | None = None,
    ) -> None:
        self.identity = identity or Identity.generate()
        self.config = config or PoolConfig()
        self.rpc_config = rpc_config
        self.methods = methods
        self._entries: dict[Target, _Entry] = {}
        self._dialing: dict[Target, asyncio.Task[RpcPeer]] = {}
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False

    async def get(self, target: Target) -> RpcPeer:
        """A live connection to target, dialled if needed."""
        if self._closed:
            raise SwarmdError(ERR_CLOSED, "pool is closed")
        loop = asyncio.get_running_loop()
        entry = self._entries.get(target)
        if entry is not None and not entry.peer.is_closed:
            entry.last_used = loop.time()
            return entry.peer
        task = self._dialing.get(target)
        if task is None:
            task = loop.create_task(self._dial(target))
            self._dialing[target] = task
            task.add_done_callback(lambda _t: self._dialing.pop(target, None))
        return await asyncio.shield(task)

    async def _dial(self, target: Target) -> RpcPeer:
        peer = await _connect(
            self.identity,
            target.host,
            target.port,
            remote_public_key=target.public_key,
            methods=self.methods,
            timeout=self.config.connect_timeout,
            config=self.rpc_config,
        )
        loop = asyncio.get_running_loop()
        if self._closed:
            await peer.close()
            raise SwarmdError(ERR_CLOSED, "pool is closed")
        self._entries[target] = _Entry(peer, loop.time())
        self._schedule_reaper(loop)
        return peer

    def _schedule_reaper(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._reaper is None and not self._closed:
            self._reaper = loop.call_later(max(self.config.idle_timeout / 4, 0.05), self._reap)

    def _reap(self) -> None:
        self._reaper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for target, entry in list(self._entries.items()):
            idle = now - entry.last_used >= self.config.idle_timeout
            if entry.peer.is_closed or (idle and entry.busy == 0 and not entry.peer._pending):
                del self._entries[target]
                if not entry.peer.is_closed:
                    logger.bind(component="pool", host=target.host, port=target.port).debug(
                        "closing idle connection"
                    )
                    entry.peer.conn.close(SwarmdError(ERR_CLOSED, "idle connection closed by the pool"))
        if self._entries:
            self._schedule_reaper(loop)

    async def call(
        self,
        target: Target,
        method: str,
        params: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - passed to the call's timer
        retries: int | None = None,
    ) -> Any:
        """Call with auto-retry when the channel closed under the call."""
        attempts = 1 + (self.config.retries if retries is None else retries)
        last: SwarmdError | None = None
        for _ in range(attempts):
            try:
                peer = await self.get(target)
            except SwarmdError as e:
                last = e
                continue
            entry = self._entries.get(target)
            if entry is not None:
                entry.busy += 1
            try:
                return await peer.call(method, params, timeout=timeout)
            except SwarmdError as e:
                if e.code != ERR_CLOSED:
                    raise
                last = e
            finally:
                if entry is not None:
                    entry.busy -= 1
                    entry.last_used = asyncio.get_running_loop().time()
        assert last is not None
        raise last

    async def fan_out(
        self,
        targets: Iterable[Target],
        method: str,
        params: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call
    ) -> dict[Target, Any]:
        """Call every target at once; each value is its result or its SwarmdError (never raises for one)."""
        targets = list(dict.fromkeys(targets))

        async def one(t: Target) -> Any:
            try:
                return await self.call(t, method, params, timeout=timeout)
            except SwarmdError as e:
                return e
            except Exception as e:  # noqa: BLE001 - one peer's failure is reported, not raised
                return SwarmdError(ERR_INTERNAL, f"{type(e).__name__}: {e}")

        results = await asyncio.gather(*(one(t) for t in targets))
        return dict(zip(targets, results, strict=True))

    async def close(self) -> None:
        """Cancel dials in progress and close every pooled connection; later calls raise ERR_CLOSED."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in list(self._dialing.values()):
            task.cancel()
        await asyncio.gather(*self._dialing.values(), return_exceptions=True)
        entries = list(self._entries.values())
        self._entries.clear()
        await asyncio.gather(*(e.peer.close() for e in entries), return_exceptions=True)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def fan_out(
    peers: Iterable[RpcPeer],
    method: str,
    params: Any = None,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - per call
) -> dict[bytes, Any]:
    """Call many connected peers at once: {remote public key: result or SwarmdError}."""
    plist = list(peers)

    async def one(p: RpcPeer) -> Any:
        try:
            return await p.call(method, params, timeout=timeout)
        except SwarmdError as e:
            return e

    results = await asyncio.gather(*(one(p) for p in plist))
    return {p.remote_public_key: r for p, r in zip(plist, results, strict=True)}
