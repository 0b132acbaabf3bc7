"""SyncClient: the async Client for scripts and notebooks, on a loop of its own.

The Client's connections, DHT node and timers live on an event loop in a
background thread owned by the SyncClient; each method submits a coroutine
there and blocks for its result (bounded by the call's own timeout plus a
margin). So plain synchronous code, or code already inside another event
loop (a notebook), can use the swarm without touching asyncio.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from swarmd.node.identity import Identity, parse_public_key
from swarmd.store.transfer import Progress
from swarmd_rpc.client import Client, ClientConfig, Inference, PeerAddress
from swarmd_rpc.errors import Closed, Timeout

T = TypeVar("T")
MARGIN = 30.0  # seconds past a call's own timeout before the calling thread gives up on the loop


class SyncClient:
    """Blocking twin of Client: same arguments, same methods, no `await`.

        with SyncClient(bootstrap=["10.0.0.1:7000"]) as c:
            print(c.infer("digits", {"input": x})["label"])
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarmd-client", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self.client: Client = self._run(self._make(bootstrap, identity, swarm_secret, config, peer), 10.0)
            self._run(self.client.start(), self.client.config.timeout)
        except BaseException:
            self.close()
            raise
        self.models = SyncModels(self)

    @staticmethod
    async def _make(
        bootstrap: list[str | tuple[str, int]] | None,
        identity: Identity | str | Path | None,
        swarm_secret: bytes | str | None,
        config: ClientConfig | None,
        peer: PeerAddress | None,
    ) -> Client:
        # built on the loop thread: the Client's asyncio primitives belong to that loop
        return Client(bootstrap, identity=identity, swarm_secret=swarm_secret, config=config, peer=peer)

    @classmethod
    def for_peer(
        cls,
        public_key: bytes | str,
        host: str,
        port: int,
        *,
        identity: Identity | str | Path | None = None,
        config: ClientConfig | None = None,
    ) -> SyncClient:
        """A blocking client of one peer (no DHT), like Client.for_peer()."""
        return cls(identity=identity, config=config, peer=PeerAddress(parse_public_key(public_key, "public_key"), host, int(port)))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:  # noqa: ASYNC109
        if self._closed:
            coro.close()
            raise Closed("the client is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(None if timeout is None else timeout + MARGIN)
        except TimeoutError:
            fut.cancel()
            raise Timeout("the client's event loop did not answer in time") from None

    def _t(self, timeout: float | None) -> float:
        return timeout or self.client.config.timeout

    def lookup(
        self,
        topic: str | bytes,
        timeout: float | None = None,  # noqa: ASYNC109
        *,
        first_only: bool = False,
        settle: float | None = None,
    ) -> list[Any]:
        """Records of peers announcing topic (see Client.lookup)."""
        coro = self.client.lookup(topic, timeout, first_only=first_only, settle=settle)
        return self._run(coro, timeout or self.client.config.lookup_timeout)

    def join(
        self,
        topic: str | bytes,
        *,
        payload: dict[str, Any] | None = None,
        announce: bool = True,
        lookup: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bytes:
        """Announce under and/or connect to topic (see Client.join)."""
        coro = self.client.join(topic, payload=payload, announce=announce, lookup=lookup, timeout=timeout)
        return self._run(coro, self._t(timeout))

    def leave(self, topic: str | bytes) -> None:
        """Stop announcing and looking up topic."""
        self._run(self.client.leave(topic), self.client.config.lookup_timeout)

    def connected_peers(self) -> list[bytes]:
        """Public keys of the peers this client holds a connection to."""

        async def peers() -> list[bytes]:
            return self.client.connected_peers()

        return self._run(peers(), 5.0)

    def call(
        self, public_key: bytes | str | None, method: str, params: Any = None, timeout: float | None = None  # noqa: ASYNC109
    ) -> Any:
        """Call method on the peer with public_key (see Client.call)."""
        return self._run(self.client.call(public_key, method, params, timeout), self._t(timeout))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | None = None,
        *,
        outputs: list[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, np.ndarray]:
        """Run model on inputs {name: array}; returns {name: array} (see Client.infer)."""
        return self.infer_detailed(model, inputs, version, outputs=outputs, timeout=timeout).outputs

    def infer_detailed(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | None = None,
        *,
        outputs: list[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Inference:
        """Like infer(), also naming the version and worker that answered."""
        coro = self.client.infer_detailed(model, inputs, version, outputs=outputs, timeout=timeout)
        return self._run(coro, timeout or self.client.config.infer_timeout)

    def close(self) -> None:
        """Close the client and stop its loop thread. Idempotent."""
        if self._closed:
            return
        client = getattr(self, "client", None)
        if client is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(client.close(), self._loop)
            try:
                fut.result(30.0)
            except Exception:  # noqa: BLE001 - closing must finish; the loop stops either way
                fut.cancel()
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncModels:
    """Blocking twin of Client.models."""

    def __init__(self, owner: SyncClient) -> None:
        self._owner = owner

    def push(
        self,
        path: str | Path,
        name: str,
        version: str | None = None,
        *,
        tags: list[str] | None = None,
        description: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Upload an ONNX file as name[:version]; progress(done, total) runs on the client's thread."""
        o = self._owner
        coro = o.client.models.push(path, name, version, tags=tags, description=description, progress=progress,
                                    timeout=timeout)
        return o._run(coro, None)

    def pull(
        self,
        name: str,
        version: str | None,
        path: str | Path,
        *,
        progress: Progress | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Download name[:version] to path, verified (see Models.pull)."""
        o = self._owner
        return o._run(o.client.models.pull(name, version, path, progress=progress, timeout=timeout), None)

    def list(self, name: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """Metadata of every version the reachable stores hold."""
        o = self._owner
        return o._run(o.client.models.list(name, tag), o.client.config.timeout * 2)

    def get(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Metadata of name[:version] (latest when None)."""
        o = self._owner
        return o._run(o.client.models.get(name, version), o.client.config.timeout * 2)

    def rm(self, name: str, version: str) -> int:
        """Delete name:version on every store that holds it; returns how many did (see Models.rm)."""
        o = self._owner
        return o._run(o.client.models.rm(name, version), o.client.config.timeout * 2)


__all__ = ["SyncClient", "SyncModels"]
