"""The gateway's HTTP server: lifecycle, the app built from the route table, and what
every front (HTTP, gRPC) shares (inference within its budget, key checks, metrics).

The pieces: routes.py (the one route table: path, handler, permission, summary),
middleware.py (auth, limits, request ids, CORS, errors, access log: the same for
every route), oip_routes.py and v1_routes.py (the handlers; each only parses its
input and calls the InferenceBackend). aiohttp carries HTTP/1.1; guard.py sits
between the sockets and aiohttp (slow clients, connection caps).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from loguru import logger

from swarmd import __version__
from swarmd.errors import ERR_NOT_FOUND, ERR_TIMEOUT, SwarmdError
from swarmd.gateway.accesslog import AccessLog
from swarmd.gateway.backend import InferenceBackend
from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.dashboard import Collect, Dashboard
from swarmd.gateway.deadlines import Deadlines
from swarmd.gateway.fastlane import FastLane
from swarmd.gateway.guard import ConnectionGuard, http_logger
from swarmd.gateway.keys import ApiKey, KeyStore
from swarmd.gateway.metrics import Counter, Gauge, Histogram, Registry
from swarmd.gateway.middleware import HTTP_STATUS, MODEL, RID, Middleware
from swarmd.gateway.oip_routes import OipRoutes, tensor_meta
from swarmd.gateway.routes import ROUTES, permission_of
from swarmd.gateway.v1_routes import V1Routes
from swarmd.names import ModelMeta
from swarmd.node import tracing
from swarmd.node.ratelimit import RateLimiter

__all__ = ["Gateway", "tensor_meta"]


class Gateway(Middleware, OipRoutes, V1Routes):
    """One HTTP listener in front of one InferenceBackend."""

    def __init__(
        self,
        config: GatewayConfig,
        backend: InferenceBackend,
        keys: KeyStore | None,
        *,
        data_dir: Path,
        status: Callable[[], dict[str, Any]] | None = None,
        name: str = "swarmd",
        collect: Collect | None = None,
    ) -> None:
        if config.auth and keys is None:
            raise ValueError("a gateway with auth on needs a KeyStore")
        self.config = config
        self.backend = backend
        self.keys = keys
        self.data_dir = Path(data_dir)
        self.name = name
        self._status = status
        self._cors = frozenset(config.cors_origins)
        self._limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst)
        self._in_flight = 0
        self._deadlines = Deadlines(config.infer_timeout)  # gateway.infer_timeout of every inference, one timer
        self._rid_prefix = os.urandom(4).hex()  # per process; request ids are prefix + counter, no syscall each
        self._rid_seq = 0
        self._started = time.time()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.guard: ConnectionGuard | None = None
        self.lane: FastLane | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.host = ""
        self.port = 0
        self.log = logger.bind(role="gateway")
        self.metrics = Registry()
        self.m_requests = Counter(
            "swarmd_gateway_requests_total", "HTTP requests by route, method and status", ("route", "method", "status")
        )
        self.m_latency = Histogram(
            "swarmd_gateway_request_duration_seconds",
            "HTTP request latency by route, model and status",
            ("route", "model", "status"),
        )
        self.m_rate_limited = Counter("swarmd_gateway_rate_limited_total", "requests refused with 429")
        for m in (self.m_requests, self.m_latency, self.m_rate_limited):
            self.metrics.add(m)
        self.metrics.add(Gauge("swarmd_gateway_in_flight", "requests being served now", lambda: self._in_flight))
        self.metrics.add(Gauge("swarmd_gateway_workers", "workers the backend can route to", backend.worker_count))
        self.dashboard = Dashboard(self.m_latency, collect)
        self.access_log = AccessLog() if config.access_log else None  # written in batches, off the request path
        self.grpc: Any = None  # the gRPC front, when gateway.grpc is set (start_grpc)
        self._permissions: dict[tuple[str, str], str] = {}  # (route path, method) -> permission (routes.py)
        self.app = self._build_app()

    # -- lifecycle ------------------------------------------------------------

    def _build_app(self) -> web.Application:
        """Every route of the table (routes.py), in its order, with the permission it needs here."""
        app = web.Application(middlewares=[self._middleware], client_max_size=self.config.max_body_bytes)
        add = {"GET": app.router.add_get, "POST": app.router.add_post, "DELETE": app.router.add_delete}
        for route in ROUTES:
            add[route.method](route.path, getattr(self, route.handler))
            perm = permission_of(route, self.config.metrics_public)
            self._permissions[(route.path, route.method)] = perm
            if route.method == "GET":
                self._permissions[(route.path, "HEAD")] = perm
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=5.0,
            keepalive_timeout=self.config.keepalive_timeout, max_line_size=8190, max_field_size=16384,
            logger=http_logger(),
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.guard = ConnectionGuard(self._runner.server, self.config.header_timeout, self.config.max_connections,
                                     self.config.max_connections_per_address)
        if self.config.fast_lane:  # the inference routes without aiohttp's machinery (fastlane.py)
            self.lane = FastLane(self)
            self.guard.protocol = self.lane.protocol
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                self.guard, host, port, reuse_address=True, backlog=1024)
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise SwarmdError("ERR_CONFIG", f"gateway cannot listen on {host}:{port}: {e.strerror}") from None
        sock = self._listener.sockets[0]
        self.host, self.port = host, sock.getsockname()[1]
        if self.keys is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="gateway-usage-flush")
        self.dashboard.start()
        return self.port

    async def start_grpc(self, host: str, port: int) -> int:
        """The OIP gRPC front (gateway.grpc) beside HTTP, on gateway.grpc_engine: the lean lane
        (grpc_lane.py) or grpcio (grpc_server.py; imported only then)."""
        if self.config.grpc_engine == "grpcio":
            from swarmd.gateway.grpc_server import GrpcFront

            front: Any = GrpcFront(self)
        else:
            from swarmd.gateway.grpc_lane import GrpcLane

            front = GrpcLane(self)
        bound = await front.start(host, port)
        self.grpc = front
        return bound

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        self._deadlines.close()
        await self.dashboard.stop()  # ends open feeds first, so the runner's cleanup does not wait on them
        if self.grpc is not None:
            await self.grpc.stop()
            self.grpc = None
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
            self._flusher = None
        if self._listener is not None:
            self._listener.close()  # stop accepting; the runner's cleanup closes open connections
            self._listener = None
        if self.lane is not None:
            await self.lane.close(5.0)  # the lane's own connections, like aiohttp's shutdown_timeout
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.keys is not None:
            self.keys.flush()
        if self.access_log is not None:
            self.access_log.flush()

    async def _flush_loop(self) -> None:
        assert self.keys is not None
        while True:
            await asyncio.sleep(self.config.usage_flush_interval)
            try:
                self.keys.flush()
            except Exception as e:  # a locked or full disk must not end the gateway; retried next tick
                self.log.bind(event="usage_flush_failed").warning("writing key usage failed: {!r}", e)

    async def _metadata(self, request: web.Request, model: str, version: str | None) -> ModelMeta:
        info = await self.backend.model_metadata(model, version)
        request[MODEL] = info.name
        return info

    async def _infer(
        self, state: MutableMapping[Any, Any], carrier: Any, model: str, version: str | None,
        inputs: dict[str, np.ndarray], outputs: list[str] | None,
    ) -> Any:
        """infer() for an HTTP request: `state` (the aiohttp request, or the lean lane's dict) holds
        its id and gets the model for the metrics; `carrier` (its headers) may name a trace."""
        rid = state[RID]
        try:
            if tracing.tracer is None:  # the one check tracing costs when off
                result = await self.infer(model, version, inputs, outputs, rid)
            else:
                result = await self.infer_traced(carrier, "http", model, version, inputs, outputs, rid)
        except SwarmdError as e:
            if e.code != ERR_NOT_FOUND:
                state[MODEL] = model
            raise
        state[MODEL] = result.model
        return result

    # -- what every front (HTTP here, gRPC in grpc_service.py) shares ------------------

    async def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                    outputs: list[str] | None, request_id: str | None) -> Any:
        """One inference through the backend, bounded by gateway.infer_timeout (deadlines.py)."""
        entry = self._deadlines.enter()
        try:
            return await self.backend.infer(model, version, inputs, outputs, request_id)
        except asyncio.CancelledError:
            if self._deadlines.expired(entry):
                raise self._timed_out() from None
            raise
        finally:
            self._deadlines.leave(entry)

    def _timed_out(self) -> SwarmdError:
        """The error of an inference gateway.infer_timeout cancelled (both infer paths)."""
        return SwarmdError(ERR_TIMEOUT, f"inference took longer than {self._deadlines.timeout}s")

    def can_infer_soon(self) -> bool:
        """Whether infer_soon() serves here: the backend queues requests and answers through a
        future (LocalBackend.submit); a backend without (the swarm's) is served by infer() in a Task."""
        return callable(getattr(self.backend, "submit", None))

    def infer_soon(self, model: str, version: str | None, inputs: dict[str, np.ndarray], outputs: list[str] | None,
                   request_id: str | None) -> tuple[asyncio.Future[Any], Any]:
        """infer() without a Task, where can_infer_soon(): (the backend's future, its deadline entry),
        for a done callback that calls infer_done(). Validation and routing errors raise SwarmdError
        now, as infer() would. One Task, its coroutine frames and a wake-up cost the loop ~8 µs a
        request (issue 20: the lean gRPC lane)."""
        future = self.backend.submit(model, version, inputs, outputs, request_id)  # type: ignore[attr-defined]
        return future, self._deadlines.enter(future)

    def infer_done(self, future: asyncio.Future[Any], entry: Any) -> Any:
        """The result of an infer_soon() future, in its done callback: the InferResult, or the
        backend's SwarmdError, ERR_TIMEOUT when gateway.infer_timeout cancelled it, or
        CancelledError when something else did (the call went away)."""
        expired = self._deadlines.expired(entry)
        self._deadlines.leave(entry)
        if future.cancelled():
            if expired:
                raise self._timed_out()
            raise asyncio.CancelledError
        return future.result()

    async def infer_traced(self, carrier: Any, front: str, model: str, version: str | None,
                           inputs: dict[str, np.ndarray], outputs: list[str] | None, request_id: str | None) -> Any:
        """infer() inside the gateway's server span (tracing on), continuing the trace a W3C
        `traceparent` in carrier (HTTP headers, gRPC metadata) names."""
        with tracing.span("gateway.infer", parent=tracing.extract(carrier), kind="SERVER",
                          attributes={"swarmd.front": front, "swarmd.model": model,
                                      "swarmd.request_id": request_id or ""}):
            return await self.infer(model, version, inputs, outputs, request_id)

    async def metadata(self, model: str, version: str | None) -> ModelMeta:
        return await self.backend.model_metadata(model, version)

    def authorize(self, token: str | None, authorization: str | None, remote: str, permission: str) -> ApiKey | None:
        """The key check and rate limit of every authenticated call, from its credentials."""
        return self._check_key(token, authorization, remote, permission)

    @staticmethod
    def http_status(code: str) -> int:
        return HTTP_STATUS.get(code, 502)

    def observe(self, route: str, method: str, status: str, elapsed: float, model: str) -> None:
        """Count one served call (HTTP here, gRPC in grpc_service.py) in the gateway's metrics."""
        self.m_requests.inc(route, method, status)
        self.m_latency.observe(elapsed, route, model, status)

    def _gateway_summary(self) -> dict[str, Any]:
        out = {"url": self.url, "version": __version__, "uptime": round(time.time() - self._started, 3),
               "in_flight": self._in_flight, "auth": self.config.auth}
        if self.lane is not None:  # how much of the traffic the lean lane answers (fastlane.py)
            out["fast_lane"] = {"served": self.lane.served, "handed_off": self.lane.handed_off,
                                "connections": len(self.lane.conns)}
        return out


