"""The gateway role: the HTTP front door inside the daemon's event loop.

Picks the backend (onnxruntime in-process when gateway.local_models_dir is
set, else the swarm: orchestrators, workers, stores), opens the key database
in the data dir, listens on node.http, and only then, once serving, creates
and prints a first admin key if there is none (a start that fails earlier
leaves no key behind that nobody saw). The HTTP port is also checked before
the node creates its identity or joins the swarm (preflight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from loguru import logger

from swarmd.gateway.backend import InferenceBackend
from swarmd.gateway.dashboard import Collect, collect_swarm
from swarmd.gateway.keys import KeyStore
from swarmd.gateway.server import Gateway
from swarmd.node.address import parse_hostport
from swarmd.roles.base import NodeContext, Role, check_can_listen

DEFAULT_HTTP = "127.0.0.1:8080"


class GatewayRole(Role):
    name: ClassVar[str] = "gateway"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.gateway: Gateway | None = None
        self.backend: InferenceBackend | None = None
        self.keys: KeyStore | None = None
        self.first_admin_key: str | None = None  # set only on the start that created it
        self.log = logger.bind(role="gateway")

    def _backend(self) -> InferenceBackend:
        cfg = self.ctx.settings.gateway
        if cfg.local_models_dir:
            from swarmd.gateway.local import LocalBackend

            return LocalBackend(Path(cfg.local_models_dir).expanduser())
        from swarmd.gateway.swarm import SwarmBackend

        return SwarmBackend(self.ctx, cfg)

    @classmethod
    def preflight(cls, settings: Any, data_dir: Path) -> None:
        host, port = parse_hostport(settings.node.http or DEFAULT_HTTP, what="node.http", listen=True)
        check_can_listen(host, port, what="gateway cannot listen on ")
        if settings.gateway.grpc:
            ghost, gport = parse_hostport(settings.gateway.grpc, what="gateway.grpc", listen=True)
            check_can_listen(ghost, gport, what="gateway cannot listen for gRPC on ")

    async def start(self) -> None:
        cfg = self.ctx.settings.gateway
        host, port = parse_hostport(self.ctx.settings.node.http or DEFAULT_HTTP, what="node.http", listen=True)
        self.keys = KeyStore(self.ctx.data_dir / "gateway" / "keys.sqlite")
        self.backend = self._backend()
        await self.backend.start()
        try:
            self.gateway = Gateway(cfg, self.backend, self.keys, data_dir=self.ctx.data_dir, status=self._node_status,
                                   collect=self._dashboard_collector())
            self.ctx.ports["http"] = await self.gateway.start(host, port)
            if cfg.grpc:
                ghost, gport = parse_hostport(cfg.grpc, what="gateway.grpc", listen=True)
                self.ctx.ports["grpc"] = await self.gateway.start_grpc(ghost, gport)
        except BaseException:
            if self.gateway is not None:
                await self.gateway.stop()
            await self.backend.stop()
            self.keys.close()
            raise
        self.ctx.metrics.add_text(self.gateway.metrics.render)  # its registry, also on its HTTP /metrics
        if self.keys.count_active() == 0:
            key, token = self.keys.create("admin", ["admin"])
            self.first_admin_key = token
            self.log.bind(event="admin_key_created", key=key.id).warning(
                "created the first admin API key (id {}); it is printed once on stdout", key.id
            )
            if cfg.print_admin_key:
                print(f"swarmd gateway: first admin API key (shown once, store it now): {token}", flush=True)
        self.log.bind(event="gateway_listening", url=self.gateway.url).info("gateway listening on {}", self.gateway.url)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.keys is not None:
            self.keys.close()

    def _dashboard_collector(self) -> Collect | None:
        """What the dashboard crawls: the swarm as this node sees it (none without a swarm)."""
        swarm = self.ctx.swarm
        if swarm is None:
            return None
        infos: dict[bytes, dict[str, Any]] = {}  # node.info answers kept across rounds (last seen)

        async def collect() -> dict[str, Any]:
            return await collect_swarm(swarm, self.ctx.info(), self.backend, infos)

        return collect

    def _node_status(self) -> dict[str, Any]:
        ctx = self.ctx
        peers: list[Any] = []
        if ctx.swarm is not None and hasattr(ctx.swarm, "peers"):
            peers = [pk.hex() for pk, *_ in ctx.swarm.peers()]
        return {
            "public_key": ctx.identity.public_hex,
            "roles": list(ctx.roles),
            "ports": dict(ctx.ports),
            "peers": peers,
        }

    def status(self) -> dict[str, Any]:
        if self.gateway is None:
            return {}
        return {"url": self.gateway.url, "backend": self.backend.status() if self.backend else {}}


ROLE = GatewayRole

