"""Requests of a Swarm: call a peer by key, or one (or every) peer announcing a topic.

A topic request prefers connected peers and, on a failure another peer may
not share (`swarmd.errors.retryable`), re-resolves the topic and tries another.
`Calls` is a mixin of `Swarm`.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from swarmd.dht.records import PeerRecord
from swarmd.errors import (
    ERR_CLOSED,
    ERR_UNAVAILABLE,
    SwarmdError,
    retryable,
)
from swarmd.rpc.registry import ConnectionRegistry
from swarmd.swarm.config import SwarmConfig


class Calls:
    """request / request_topic / request_all_topic."""

    public_key: bytes
    config: SwarmConfig
    _registry: ConnectionRegistry
    _seen: dict[bytes, dict[bytes, PeerRecord]]

    async def request(
        self, public_key: bytes, method: str, params: Any = None, timeout: float | None = None
    ) -> Any:  # noqa: ASYNC109
        """Call method on the peer with this key (our own key: the local peer, no socket).
        A connection that closes under the call is re-dialled once."""
        t = timeout or self.config.request_timeout
        if public_key == self.public_key:
            return await self.local_peer().call(method, params, timeout=t)
        for attempt in (0, 1):
            peer = self._registry.get(public_key) or await self.connect(
                public_key, self._latest_record(public_key)
            )
            try:
                return await peer.call(method, params, timeout=t)
            except SwarmdError as e:
                if e.code != ERR_CLOSED or attempt:
                    raise
        raise SwarmdError(ERR_CLOSED, "unreachable")  # pragma: no cover

    async def request_topic(
        self,
        topic: bytes | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Call method on one peer announcing topic (connected peers first);
        on a retryable failure re-resolve the topic and try another peer."""
        t = self.topic(topic)
        role = self.role_of(topic)
        tried: set[bytes] = set()
        last: SwarmdError | None = None
        for _ in range(self.config.request_retries + 1):
            recs = [
                r
                for r in await self._candidates(t, fresh=bool(tried), role=role)
                if r.public_key not in tried
            ]
            if not recs:
                break
            recs.sort(
                key=lambda r: (
                    r.public_key != self.public_key and self._registry.get(r.public_key) is None,
                    random.random(),
                )
            )
            rec = recs[0]
            tried.add(rec.public_key)
            try:
                return await self.request(rec.public_key, method, params, timeout)
            except SwarmdError as e:
                if not retryable(e):
                    raise
                last = e
        if last is not None:
            raise last
        raise SwarmdError(ERR_UNAVAILABLE, "no peer announces this topic")

    async def _candidates(self, topic: bytes, fresh: bool, role: str | None = None) -> list[PeerRecord]:
        now_ms = int(time.time() * 1000)
        cached = [r for r in self._seen.get(topic, {}).values() if r.expiry_ms > now_ms]
        if cached and not fresh:
            return cached
        return await self.lookup_all(topic, role=role)

    async def request_all_topic(
        self,
        topic: bytes | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[bytes, Any]:
        """Call method on every peer announcing topic; maps each public key to
        its result or to the SwarmdError it failed with."""
        recs = await self.lookup_all(self.topic(topic), role=self.role_of(topic))

        async def one(rec: PeerRecord) -> Any:
            try:
                if rec.public_key != self.public_key and self._registry.get(rec.public_key) is None:
                    await self.connect(rec.public_key, rec)
                return await self.request(rec.public_key, method, params, timeout)
            except SwarmdError as e:
                return e

        results = await asyncio.gather(*(one(r) for r in recs))
        return {r.public_key: res for r, res in zip(recs, results, strict=True)}
