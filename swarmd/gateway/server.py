"""The gateway's HTTP server: Open Inference Protocol v2, the seed's /api/v1
routes, API keys, rate limits, CORS, request ids, access log and metrics.

aiohttp carries HTTP/1.1 (measured choice, see docs/gateway.md); one
middleware does everything that is the same for every route, so a handler
only parses its input and calls the InferenceBackend. Every route declares
the permission it needs; the middleware enforces it before the handler runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import BodyPartReader, web
from loguru import logger

from swarmd import __version__
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_FORBIDDEN,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_NOT_IMPLEMENTED,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNAUTHORIZED,
    SwarmdError,
)
from swarmd.gateway.accesslog import AccessLog
from swarmd.gateway.backend import InferenceBackend, ModelInfo, UploadedModel
from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.dashboard import Collect, Dashboard
from swarmd.gateway.guard import ConnectionGuard, http_logger
from swarmd.gateway.keys import ApiKey, KeyStore
from swarmd.gateway.metrics import Counter, Gauge, Histogram, Registry
from swarmd.gateway.oip import (
    OIP_TO_NUMPY,
    OipError,
    decode_infer_request,
    encode_infer_response,
    oip_datatype,
)
from swarmd.gateway.openapi import docs_page, openapi_document
from swarmd.gateway.ratelimit import RateLimiter
from swarmd.node import tracing

PUBLIC = "public"
# a key with either may read a model's metadata, config and readiness: Triton's usual flow is "read
# the metadata, then infer", so a key that may infer may also look at what it infers with
READ_OR_INFER = "models:read|infer"
RID = web.RequestKey("rid", str)  # the request id, echoed in X-Request-Id
MODEL = web.RequestKey("model", str)  # metrics label, set once the model is known to exist
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_STATUS: dict[str, int] = {
    ERR_BAD_REQUEST: 400,
    "ERR_INVALID_MODEL": 400,
    ERR_UNAUTHORIZED: 401,
    ERR_FORBIDDEN: 403,
    ERR_NOT_FOUND: 404,
    "ERR_CONFLICT": 409,
    ERR_TOO_LARGE: 413,
    ERR_RATE_LIMITED: 429,
    ERR_INTERNAL: 500,
    "ERR_CORRUPT": 502,
    "ERR_PROTOCOL": 502,
    ERR_OVERLOADED: 503,
    ERR_NOT_READY: 503,
    "ERR_UNAVAILABLE": 503,
    "ERR_CLOSED": 503,
    ERR_TIMEOUT: 504,
    "ERR_NOT_IMPLEMENTED": 501,
}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ALLOWED_HEADERS = "authorization, content-type, x-api-key, x-request-id, inference-header-content-length"
EXPOSED_HEADERS = "x-request-id, inference-header-content-length, retry-after"
UPLOAD_CHUNK = 1 << 20
UPLOAD_FORM_FIELDS = ("name", "version", "tags", "description", "sha256")  # a multipart upload's other parts
UPLOAD_FIELD_MAX = 4096  # bytes of one such field
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BYTES": "TYPE_STRING",
}


def requires(permission: str) -> Callable[[Handler], Handler]:
    """Mark the permission a route needs; the middleware checks it before the handler runs."""

    def mark(fn: Handler) -> Handler:
        fn.permission = permission  # type: ignore[attr-defined]
        return fn

    return mark


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def bad(message: str) -> SwarmdError:
    return SwarmdError(ERR_BAD_REQUEST, message)


def tensor_meta(info: ModelInfo, which: str) -> list[dict[str, Any]]:
    specs = info.inputs if which == "inputs" else info.outputs
    return [{"name": t.name, "datatype": oip_datatype(t.dtype), "shape": list(t.shape)} for t in specs]



def _v1_output(value: np.ndarray, json_texts: bool) -> Any:
    """An output for /api/v1: numbers as they are; string tensors as lists (parsed when JSON texts)."""
    if value.dtype != object and value.dtype.kind not in "SU":
        return np.ascontiguousarray(value)
    items = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in value.ravel().tolist()]
    if json_texts:
        try:
            items = [orjson.loads(x) for x in items]
        except orjson.JSONDecodeError:
            pass  # not the JSON a worker makes of a sequence or map: leave the texts as they are
    if not value.ndim:
        return items[0]
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):  # one by one: a JSON list must stay one element, not grow a dim
        arr[i] = x
    return arr.reshape(value.shape).tolist()

class Gateway:
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
        self._rid_prefix = os.urandom(4).hex()  # per process; request ids are prefix + counter, no syscall each
        self._rid_seq = 0
        self._started = time.time()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.guard: ConnectionGuard | None = None
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
        self.app = self._build_app()

    # -- lifecycle ------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.config.max_body_bytes)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_get("/v2/models/{model}", self.model_metadata)
        r.add_get("/v2/models/{model}/versions/{version}", self.model_metadata)
        r.add_get("/v2/models/{model}/config", self.model_config)
        r.add_get("/v2/models/{model}/versions/{version}/config", self.model_config)
        r.add_get("/v2/models/{model}/ready", self.model_ready)
        r.add_get("/v2/models/{model}/versions/{version}/ready", self.model_ready)
        r.add_get("/v2/models/stats", self.model_stats)
        r.add_get("/v2/models/{model}/stats", self.model_stats)
        r.add_get("/v2/models/{model}/versions/{version}/stats", self.model_stats)
        r.add_post("/v2/repository/models/{model}/load", self.model_control)
        r.add_post("/v2/repository/models/{model}/unload", self.model_control)
        for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting", "/v2/logging"):
            r.add_route("GET", path, self.triton_unsupported)
            r.add_route("POST", path, self.triton_unsupported)
        for kind in ("systemsharedmemory", "cudasharedmemory"):
            for path in (f"/v2/{kind}/status", f"/v2/{kind}/region/{{region}}/status"):
                r.add_get(path, self.triton_unsupported)
            for path in (f"/v2/{kind}/unregister", f"/v2/{kind}/region/{{region}}/register",
                         f"/v2/{kind}/region/{{region}}/unregister"):
                r.add_post(path, self.triton_unsupported)
        r.add_post("/v2/models/{model}/infer", self.oip_infer)
        r.add_post("/v2/models/{model}/versions/{version}/infer", self.oip_infer)
        r.add_post("/api/v1/inference/{model}", self.v1_infer)
        r.add_get("/api/v1/models", self.v1_models)
        r.add_get("/api/v1/models/{model}", self.v1_model)
        r.add_post("/api/v1/models", self.v1_upload)
        r.add_get("/api/v1/status", self.v1_status)
        r.add_get("/api/v1/keys", self.keys_list)
        r.add_post("/api/v1/keys", self.keys_create)
        r.add_get("/api/v1/keys/{id}", self.keys_get)
        r.add_delete("/api/v1/keys/{id}", self.keys_revoke)
        r.add_get("/metrics", self.metrics_public if self.config.metrics_public else self.metrics_route)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/docs", self.docs)
        r.add_get("/dashboard", self.dashboard_page)
        r.add_get("/dashboard/{asset}", self.dashboard_page)
        r.add_get("/api/v1/dashboard/feed", self.dashboard_feed)
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
        """The OIP gRPC front (gateway.grpc) beside HTTP; grpcio is imported only here."""
        from swarmd.gateway.grpc_server import GrpcFront

        front = GrpcFront(self)
        bound = await front.start(host, port)
        self.grpc = front
        return bound

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
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

    # -- the one middleware ----------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request.headers.get("X-Request-Id")
        if rid is None or not REQUEST_ID_RE.match(rid):
            self._rid_seq += 1
            rid = f"{self._rid_prefix}{self._rid_seq:08x}"
        request[RID] = rid
        origin = request.headers.get("Origin")
        cors_ok = origin is not None and origin in self._cors
        key: ApiKey | None = None
        self._in_flight += 1
        try:
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                resp = self._preflight(cors_ok)
            else:
                if self._in_flight > self.config.max_in_flight:
                    raise SwarmdError(ERR_OVERLOADED, f"gateway is serving {self.config.max_in_flight} requests; retry")
                permission = getattr(request.match_info.handler, "permission", None)
                if permission is not None and permission != PUBLIC:
                    key = self._authorize(request, permission)
                resp = await handler(request)
        except SwarmdError as e:
            resp = self._error_response(e, rid)
            if resp.status >= 500:
                self.dashboard.note_error(request.path, resp.status, e.code, e.message)
        except web.HTTPException as e:
            resp = json_response({"error": e.text or e.reason, "code": _code_for_status(e.status), "request_id": rid},
                                 status=e.status)
            if e.status == 405 and "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
        except (ConnectionResetError, asyncio.CancelledError):
            self._observe(request, 499, t0, key)  # client went away; nothing to send
            raise
        except Exception as e:
            self.log.opt(exception=e).bind(event="http_bug", request_id=rid, path=request.path).error(
                "unhandled error serving {} {}", request.method, request.path
            )
            resp = json_response({"error": f"internal error (request id {rid})", "code": ERR_INTERNAL,
                                  "request_id": rid}, status=500)
            self.dashboard.note_error(request.path, 500, ERR_INTERNAL, f"internal error (request id {rid})")
        finally:
            self._in_flight -= 1
        resp.headers["X-Request-Id"] = rid
        if cors_ok:
            resp.headers["Access-Control-Allow-Origin"] = origin  # type: ignore[assignment]
            resp.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            resp.headers["Vary"] = "Origin"
        self._observe(request, resp.status, t0, key)
        return resp

    def _observe(self, request: web.Request, status: int, t0: float, key: ApiKey | None) -> None:
        elapsed = time.perf_counter() - t0
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        s = str(status)
        method = request.method if request.method in KNOWN_METHODS else "OTHER"  # client-chosen: bounded
        self.observe(route, method, s, elapsed, request.get(MODEL, ""))
        if self.access_log is not None:
            self.access_log.note(request[RID], request.method, request.path, status, round(elapsed * 1000, 3),
                                 key.id if key else None, request.remote)

    def _preflight(self, cors_ok: bool) -> web.Response:
        if not cors_ok:
            return json_response({"error": "origin is not in gateway.cors_origins", "code": ERR_FORBIDDEN}, status=403)
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        })

    def _error_response(self, e: SwarmdError, rid: str) -> web.Response:
        status = HTTP_STATUS.get(e.code, 502)
        headers: dict[str, str] = {}
        if e.code == ERR_RATE_LIMITED and isinstance(e.data, dict):
            headers["Retry-After"] = str(e.data.get("retry_after", 1))
        if e.code == ERR_UNAUTHORIZED:
            headers["WWW-Authenticate"] = 'Bearer realm="swarmd"'
        return json_response({"error": e.message, "code": e.code, "request_id": rid}, status=status, headers=headers)

    def _authorize(self, request: web.Request, permission: str) -> ApiKey | None:
        return self._check_key(request.headers.get("x-api-key"), request.headers.get("Authorization"),
                               request.remote or "?", permission)

    def _check_key(self, token: str | None, auth: str | None, remote: str, permission: str) -> ApiKey | None:
        if token is None:
            if auth is not None:
                scheme, _, cred = auth.strip().partition(" ")
                if scheme.lower() != "bearer" or not cred.strip():
                    raise SwarmdError(ERR_UNAUTHORIZED, "Authorization header must read 'Bearer <api key>'")
                token = cred.strip()
        now = time.monotonic()
        if token is None:
            if not self.config.auth:
                self._limit(remote, now, None, None)
                return None
            raise SwarmdError(
                ERR_UNAUTHORIZED, "missing API key: send it as 'x-api-key: <key>' or 'Authorization: Bearer <key>'"
            )
        key = self.keys.authenticate(token) if self.keys is not None else None
        if key is None:
            raise SwarmdError(ERR_UNAUTHORIZED, "unknown or revoked API key")
        wanted = permission.split("|")  # "a|b": either permission will do
        if self.config.auth and not any(key.allows(p) for p in wanted):
            need = " or ".join(repr(p) for p in wanted)
            raise SwarmdError(
                ERR_FORBIDDEN, f"API key {key.id} lacks permission {need} (it has {', '.join(sorted(key.permissions))})"
            )
        try:
            self._limit(key.id, now, key.rate_rps, key.rate_burst)
        except SwarmdError:
            self.keys.record(key.id, denied=True)  # type: ignore[union-attr]
            raise
        self.keys.record(key.id)  # type: ignore[union-attr]
        return key

    def _limit(self, who: str, now: float, rate: float | None, burst: float | None) -> None:
        wait = self._limiter.take(who, now, rate, burst)
        if wait > 0:
            self.m_rate_limited.inc()
            retry = max(1, math.ceil(wait))
            raise SwarmdError(ERR_RATE_LIMITED, f"rate limit exceeded; retry in {retry}s", {"retry_after": retry})

    # -- helpers --------------------------------------------------------------

    async def _body(self, request: web.Request, limit: int | None = None, what: str = "request body") -> bytes:
        """The whole body, refused with 413 (ERR_TOO_LARGE) over `limit` (default max_body_bytes)."""
        if limit is None:
            limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:  # refuse before reading
            raise SwarmdError(ERR_TOO_LARGE, f"{what} is {request.content_length} bytes; the limit is {limit}")
        try:
            async with asyncio.timeout(self.config.body_timeout):
                body = await request.read()  # aiohttp stops at client_max_size (max_body_bytes) when chunked
        except TimeoutError:
            raise SwarmdError(ERR_TIMEOUT, f"request body did not arrive within {self.config.body_timeout}s") from None
        if len(body) > limit:
            raise SwarmdError(ERR_TOO_LARGE, f"{what} is {len(body)} bytes; the limit is {limit}")
        return body

    JSON_BODY = "JSON body (limit: gateway.max_json_bytes; send large tensors in the binary extension)"

    async def _json_body(self, request: web.Request, limit: int | None = None) -> dict[str, Any]:
        if limit is None:
            body = await self._body(request, self.config.max_json_bytes, self.JSON_BODY)
        else:
            body = await self._body(request, limit)
        if not body:
            raise bad("request body is empty; expected a JSON object")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise bad(f"request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise bad(f"request body must be a JSON object, got {type(doc).__name__}")
        return doc

    async def _metadata(self, request: web.Request, model: str, version: str | None) -> ModelInfo:
        info = await self.backend.model_metadata(model, version)
        request[MODEL] = info.name
        return info

    async def _infer(
        self, request: web.Request, model: str, version: str | None, inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
    ) -> Any:
        try:
            if tracing.tracer is None:  # the one check tracing costs when off
                result = await self.infer(model, version, inputs, outputs, request[RID])
            else:
                result = await self.infer_traced(request.headers, "http", model, version, inputs, outputs,
                                                 request[RID])
        except SwarmdError as e:
            if e.code != ERR_NOT_FOUND:
                request[MODEL] = model
            raise
        request[MODEL] = result.model
        return result

    # -- what every front (HTTP here, gRPC in grpc_server.py) shares ------------------

    async def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                    outputs: list[str] | None, request_id: str | None) -> Any:
        """One inference through the backend, bounded by gateway.infer_timeout."""
        try:
            async with asyncio.timeout(self.config.infer_timeout):
                return await self.backend.infer(model, version, inputs, outputs, request_id)
        except TimeoutError:
            raise SwarmdError(ERR_TIMEOUT, f"inference took longer than {self.config.infer_timeout}s") from None

    async def infer_traced(self, carrier: Any, front: str, model: str, version: str | None,
                           inputs: dict[str, np.ndarray], outputs: list[str] | None, request_id: str | None) -> Any:
        """infer() inside the gateway's server span (tracing on), continuing the trace a W3C
        `traceparent` in carrier (HTTP headers, gRPC metadata) names."""
        with tracing.span("gateway.infer", parent=tracing.extract(carrier), kind="SERVER",
                          attributes={"swarmd.front": front, "swarmd.model": model,
                                      "swarmd.request_id": request_id or ""}):
            return await self.infer(model, version, inputs, outputs, request_id)

    async def metadata(self, model: str, version: str | None) -> ModelInfo:
        return await self.backend.model_metadata(model, version)

    def authorize(self, token: str | None, authorization: str | None, remote: str, permission: str) -> ApiKey | None:
        """The key check and rate limit of every authenticated call, from its credentials."""
        return self._check_key(token, authorization, remote, permission)

    @staticmethod
    def http_status(code: str) -> int:
        return HTTP_STATUS.get(code, 502)

    def observe(self, route: str, method: str, status: str, elapsed: float, model: str) -> None:
        """Count one served call (HTTP here, gRPC in grpc_server.py) in the gateway's metrics."""
        self.m_requests.inc(route, method, status)
        self.m_latency.observe(elapsed, route, model, status)

    # -- health and server metadata --------------------------------------------

    @requires(PUBLIC)
    async def health(self, request: web.Request) -> web.Response:
        workers = self.backend.worker_count()
        return json_response({
            "status": "ok" if workers > 0 else "degraded",
            "version": __version__,
            "uptime": round(time.time() - self._started, 3),
            "workers": workers,
        })

    @requires(PUBLIC)
    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    @requires(PUBLIC)
    async def ready(self, request: web.Request) -> web.Response:
        if self.backend.worker_count() == 0:
            raise SwarmdError(ERR_NOT_READY, "no worker is available to serve inference yet")
        return json_response({"ready": True})

    @requires("models:read")
    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({
            "name": self.name,
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_repository"],
        })

    @requires("models:read")
    async def repository_index(self, request: web.Request) -> web.Response:
        """Triton's repository index; body {"ready": true} (optional) lists only READY versions."""
        ready = False
        body = await self._body(request, self.config.max_json_bytes, self.JSON_BODY)
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise bad(f"request body is not valid JSON: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
                raise bad('repository index body must be a JSON object, {"ready": true|false}')
            ready = doc.get("ready", False)
        return json_response(self._index_rows(await self.backend.repository_index(), ready))

    @staticmethod
    def _index_rows(rows: list[dict[str, str]], ready: bool) -> list[dict[str, str]]:
        """Rows in Triton's shape (no empty reason), only READY ones when asked."""
        return [{k: v for k, v in r.items() if k != "reason" or v} for r in rows if not ready or r["state"] == "READY"]

    async def model_control_call(self, action: str, model: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """A repository load or unload, as both fronts take it: parameters that would change the
        model (a config override, model files) are refused: swarmd models come from the stores."""
        if action == "load":
            extra = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
            if extra:
                raise SwarmdError(
                    ERR_NOT_IMPLEMENTED,
                    f"model loading with {', '.join(extra)} is not supported: a swarmd model is an ONNX file in "
                    "the stores; push it (POST /api/v1/models or `swarmd model push`), then load it by name",
                )
            out = await self.backend.load_model(model)
        else:
            out = await self.backend.unload_model(model)  # unload_dependents: no ensembles, nothing depends
        self.log.bind(event=f"model_{action}", model=model).info("repository {} of {}", action, model)
        return out

    # -- Open Inference Protocol v2 ------------------------------------------------

    @requires(READ_OR_INFER)
    async def model_metadata(self, request: web.Request) -> web.Response:
        info = await self._metadata(request, request.match_info["model"], request.match_info.get("version"))
        return json_response({
            "name": info.name,
            "versions": list(info.versions or [info.version]),
            "platform": info.platform,
            "inputs": tensor_meta(info, "inputs"),
            "outputs": tensor_meta(info, "outputs"),
        })

    @requires(READ_OR_INFER)
    async def model_config(self, request: web.Request) -> web.Response:
        info = await self._metadata(request, request.match_info["model"], request.match_info.get("version"))

        def cfg(t: dict[str, Any]) -> dict[str, Any]:
            return {"name": t["name"], "data_type": TRITON_TYPES.get(t["datatype"], t["datatype"]), "dims": t["shape"]}

        return json_response({
            "name": info.name,
            "platform": info.platform,
            "backend": "onnxruntime",
            "max_batch_size": 0,
            "input": [cfg(t) for t in tensor_meta(info, "inputs")],
            "output": [cfg(t) for t in tensor_meta(info, "outputs")],
        })

    @requires(READ_OR_INFER)
    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version")
        info = await self._metadata(request, model, version)
        if not await self.backend.ready(info.name, version):
            raise SwarmdError(ERR_NOT_READY, f"model {model!r} has no ready worker yet")
        return json_response({"name": info.name, "ready": True})

    @requires("models:read")
    async def model_stats(self, request: web.Request) -> web.Response:
        """Triton's statistics extension: {"model_stats": [...]} summed over the workers."""
        model, version = request.match_info.get("model"), request.match_info.get("version")
        if model is not None:
            await self._metadata(request, model, version)  # an unknown model or version is a 404
        return json_response({"model_stats": await self.backend.model_statistics(model, version)})

    @requires("models:write")
    async def model_control(self, request: web.Request) -> web.Response:
        """Triton's repository load/unload: {"parameters": {...}} (optional) as tritonclient sends it."""
        action = request.path.rsplit("/", 1)[-1]
        model = request.match_info["model"]
        request[MODEL] = model
        params: dict[str, Any] = {}
        body = await self._body(request, self.config.max_json_bytes, self.JSON_BODY)
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise bad(f"request body is not valid JSON: {e}") from None
            p = doc.get("parameters", {}) if isinstance(doc, dict) else None
            if not isinstance(p, dict):
                raise bad(f'{action} body must be a JSON object, {{"parameters": {{...}}}}')
            params = p
        return json_response(await self.model_control_call(action, model, params))

    UNSUPPORTED = {
        "trace": "trace settings: swarmd traces with OpenTelemetry, configured per node in [tracing] (docs/triton.md)",
        "logging": "log settings: set node.log_level in the node's configuration",
        "systemsharedmemory": "system shared memory: tensors travel in the request (binary tensor extension)",
        "cudasharedmemory": "CUDA shared memory: tensors travel in the request (binary tensor extension)",
    }

    @requires(PUBLIC)
    async def triton_unsupported(self, request: web.Request) -> web.Response:
        """Triton routes swarmd has no equivalent for: 501 naming the feature, not a bare 404."""
        parts = request.path.split("/")
        feature = "trace" if "trace" in parts else parts[2]
        raise SwarmdError(ERR_NOT_IMPLEMENTED, f"swarmd gateway does not implement {self.UNSUPPORTED[feature]}")

    @requires("infer")
    async def oip_infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version")
        hl = request.headers.get("Inference-Header-Content-Length")
        header_length: int | None = None
        if hl is not None:
            hl = hl.strip()
            if not hl.isdigit() or len(hl) > 15:
                raise bad(f"Inference-Header-Content-Length must be a decimal byte count, got {hl!r:.40}")
            header_length = int(hl)
            if header_length > self.config.max_json_bytes:
                raise SwarmdError(ERR_TOO_LARGE, f"the {self.JSON_BODY} is {header_length} bytes; "
                                                 f"the limit is {self.config.max_json_bytes}")
            body = await self._body(request)
        else:
            body = await self._body(request, self.config.max_json_bytes, self.JSON_BODY)
        try:
            req = decode_infer_request(body, header_length)
        except OipError as e:
            raise bad(str(e)) from None
        names = None if req.outputs is None else [o.name for o in req.outputs]
        result = await self._infer(request, model, version, req.inputs, names)
        if names is not None:
            missing = [n for n in names if n not in result.outputs]
            if missing:
                raise SwarmdError(ERR_INTERNAL, f"backend returned no output {missing[0]!r}")
        out, header_len = encode_infer_response(result.model, result.version, result.outputs, req)
        if header_len is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(
            body=out, content_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_len)},
        )

    # -- the seed's /api/v1 routes -------------------------------------------------

    @requires("infer")
    async def v1_infer(self, request: web.Request) -> web.Response:
        """Friendly JSON: {"inputs": {name: nested list | {data, shape?, dtype?}}} or {"input": nested list}."""
        model = request.match_info["model"]
        doc = await self._json_body(request)
        version = doc.get("version", request.query.get("version"))
        if version is not None and not isinstance(version, str):
            raise bad("version must be a string")
        outputs = doc.get("outputs")
        if outputs is not None and (not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)):
            raise bad("outputs must be a list of output names")
        info = await self._metadata(request, model, version)
        raw = doc.get("inputs")
        if raw is None and "input" in doc:
            if len(info.inputs) != 1:
                raise bad(f"model {model!r} has {len(info.inputs)} inputs; send them by name under \"inputs\"")
            raw = {info.inputs[0].name: doc["input"]}
        if not isinstance(raw, dict) or not raw:
            raise bad('body must hold "inputs": {name: values} or, for a one-input model, "input": values')
        specs = {t.name: t for t in info.inputs}
        inputs: dict[str, np.ndarray] = {}
        for name, value in raw.items():
            spec = specs.get(name)
            dtype = spec.dtype if spec is not None else "float32"
            shape = None
            if isinstance(value, dict):
                dtype = value.get("dtype", dtype)
                shape = value.get("shape")
                value = value.get("data")
                if dtype not in OIP_TO_NUMPY.values():
                    raise bad(f"input {name!r}: dtype {dtype!r:.40} is not one of {', '.join(OIP_TO_NUMPY.values())}")
            try:
                arr = np.array(value, dtype=np.dtype(dtype))
                if shape is not None:
                    arr = arr.reshape(shape)
            except (ValueError, TypeError, OverflowError) as e:
                raise bad(f"input {name!r} cannot be read as {dtype}: {e}") from None
            if arr.dtype == object:
                raise bad(f"input {name!r} must be numbers")
            if spec is not None and len(spec.shape) == arr.ndim + 1 and spec.shape[0] in (-1, 1):
                arr = arr[None, ...]  # one sample sent without the batch dimension
            inputs[name] = arr
        result = await self._infer(request, model, version, inputs, outputs)
        # Non-tensor outputs (a ZipMap classifier's sequence of maps) arrive as JSON texts:
        # here they are JSON values again; other string tensors are lists of strings.
        texts = {t.name for t in info.outputs if t.dtype == "object"}
        doc_out: dict[str, Any] = {
            "model": result.model,
            "version": result.version,
            "outputs": {k: _v1_output(v, k in texts) for k, v in result.outputs.items()},
            "request_id": request[RID],
        }
        if result.worker:
            doc_out["worker"] = result.worker
        return json_response(doc_out)

    @requires("models:read")
    async def v1_models(self, request: web.Request) -> web.Response:
        models = await self.backend.list_models()
        return json_response({"models": [m.to_dict() for m in models]})

    @requires("models:read")
    async def v1_model(self, request: web.Request) -> web.Response:
        info = await self._metadata(request, request.match_info["model"], request.query.get("version"))
        return json_response(info.to_dict())

    @requires("models:write")
    async def v1_upload(self, request: web.Request) -> web.Response:
        """JSON {"name", "version"?, "data": base64, ...} or a raw body streamed to disk (?name=...)."""
        uploads = self.data_dir / "gateway" / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=uploads, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                if request.content_type == "application/json":
                    upload = await self._upload_json(request, f, tmp)
                elif request.content_type == "multipart/form-data":
                    upload = await self._upload_multipart(request, f, tmp)
                else:
                    upload = await self._upload_stream(request, f, tmp)
            info = await self.backend.put_model(upload)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        request[MODEL] = info.name
        return json_response(info.to_dict(), status=201)

    @staticmethod
    def _upload_fields(src: Any, tags: Any) -> tuple[str, str | None, str, list[str]]:
        name = src.get("name")
        if not isinstance(name, str) or not name:
            raise bad("model name is required (\"name\" in the JSON body, or ?name= for a raw upload)")
        version = src.get("version")
        if version is not None and not isinstance(version, str):
            raise bad("version must be a string")
        description = src.get("description") or ""
        if not isinstance(description, str):
            raise bad("description must be a string")
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split(",") if t.strip()]
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise bad("tags must be a list of strings")
        return name, version, description, tags

    async def _upload_json(self, request: web.Request, f: Any, tmp: Path) -> UploadedModel:
        doc = await self._json_body(request, self.config.max_body_bytes)  # one base64 string: costs ~its size
        name, version, description, tags = self._upload_fields(doc, doc.get("tags"))
        data = doc.get("data")
        if not isinstance(data, str) or not data:
            raise bad("\"data\" must hold the model file as a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"\"data\" is not valid base64: {e}") from None
        f.write(raw)
        digest = hashlib.sha256(raw).hexdigest()
        self._check_sha(doc.get("sha256"), digest)
        return UploadedModel(name, version, tmp, len(raw), digest, tags, description)

    async def _upload_stream(self, request: web.Request, f: Any, tmp: Path) -> UploadedModel:
        q = request.query
        name, version, description, tags = self._upload_fields(q, q.get("tags"))
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise SwarmdError(ERR_TOO_LARGE, f"model is {request.content_length} bytes; the limit is {limit}")
        size, digest = await self._copy_upload(request.content.read, f)
        if size == 0:
            raise bad("upload body is empty; send the model file as the request body")
        self._check_sha(q.get("sha256") or request.headers.get("X-Model-Sha256"), digest)
        return UploadedModel(name, version, tmp, size, digest, tags, description)

    async def _upload_multipart(self, request: web.Request, f: Any, tmp: Path) -> UploadedModel:
        """`curl -F model=@m.onnx -F name=m`: the file part streamed to disk like a raw body, the
        other fields (name, version, tags, description, sha256) as form fields or in the query."""
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit + 64 * 1024:
            raise SwarmdError(ERR_TOO_LARGE, f"model is {request.content_length} bytes; the limit is {limit}")
        reader = await request.multipart()
        fields: dict[str, str] = {}
        got: tuple[int, str] | None = None
        for _ in range(len(UPLOAD_FORM_FIELDS) + 2):  # the file and each field once, plus the end
            async with asyncio.timeout(self.config.body_timeout):
                part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise bad("nested multipart bodies are not accepted; send the model file as one part")
            if part.filename is not None or part.name == "model":
                if got is not None:
                    raise bad("a multipart upload carries one model file (one part with a filename)")
                got = await self._copy_upload(part.read_chunk, f)
                continue
            if part.name not in UPLOAD_FORM_FIELDS or part.name in fields:
                raise bad(f"unexpected form field {part.name!r}: expected one file part (model=@FILE) and "
                          f"at most one each of {', '.join(UPLOAD_FORM_FIELDS)}")
            async with asyncio.timeout(self.config.body_timeout):
                raw = await part.read_chunk(UPLOAD_FIELD_MAX + 1)
            if len(raw) > UPLOAD_FIELD_MAX or await part.read_chunk(1):
                raise bad(f"form field {part.name!r} is over {UPLOAD_FIELD_MAX} bytes")
            fields[part.name] = raw.decode("utf-8", errors="replace")
        else:
            raise bad("too many parts in the multipart upload")
        if got is None or got[0] == 0:
            raise bad("multipart upload without a model file: send it as a part with a filename (-F model=@FILE)")
        src = {**request.query, **fields}
        name, version, description, tags = self._upload_fields(src, src.get("tags"))
        size, digest = got
        self._check_sha(src.get("sha256") or request.headers.get("X-Model-Sha256"), digest)
        return UploadedModel(name, version, tmp, size, digest, tags, description)

    async def _copy_upload(self, read: Callable[[int], Awaitable[bytes]], f: Any) -> tuple[int, str]:
        """Copy an upload body to f in chunks, each within body_timeout, bounded by max_upload_bytes;
        returns (size, sha256 hex)."""
        limit = self.config.max_upload_bytes
        h = hashlib.sha256()
        size = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.config.body_timeout):
                    chunk = await read(UPLOAD_CHUNK)
            except TimeoutError:
                raise SwarmdError(ERR_TIMEOUT, f"upload stalled for {self.config.body_timeout}s") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise SwarmdError(ERR_TOO_LARGE, f"model is over the upload limit of {limit} bytes")
            h.update(chunk)
            await loop.run_in_executor(None, f.write, chunk)
        return size, h.hexdigest()

    @staticmethod
    def _check_sha(claimed: Any, digest: str) -> None:
        if claimed is not None and claimed != digest:
            raise SwarmdError("ERR_CORRUPT" if isinstance(claimed, str) else ERR_BAD_REQUEST,
                              f"body sha256 is {digest}, the request claimed {claimed!r:.80}")

    @requires("admin")
    async def v1_status(self, request: web.Request) -> web.Response:
        """Roles, peers, workers, models, orchestrators: what an operator asks first."""
        try:
            async with asyncio.timeout(5.0):
                models: Any = [f"{m.name}:{m.version}" for m in await self.backend.list_models()]
        except (SwarmdError, TimeoutError) as e:
            models = {"error": getattr(e, "message", "listing models timed out after 5s")}
        return json_response({
            "models": models,
            "gateway": self._gateway_summary(),
            "node": self._status() if self._status is not None else {},
            "backend": self.backend.status(),
        })

    # -- API keys (admin) ----------------------------------------------------------

    def _keystore(self) -> KeyStore:
        if self.keys is None:
            raise SwarmdError(ERR_NOT_FOUND, "this gateway has no key database")
        return self.keys

    @requires("admin")
    async def keys_list(self, request: web.Request) -> web.Response:
        return json_response({"keys": [k.public() for k in self._keystore().list()]})

    @requires("admin")
    async def keys_create(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        key, token = self._keystore().create(
            doc.get("name"), doc.get("permissions"),
            rate_rps=doc.get("rate_limit_rps"), rate_burst=doc.get("rate_limit_burst"),
        )
        self.log.bind(event="key_created", key=key.id, permissions=sorted(key.permissions)).info("API key created")
        return json_response({**key.public(), "key": token}, status=201)

    @requires("admin")
    async def keys_get(self, request: web.Request) -> web.Response:
        return json_response(self._keystore().get(request.match_info["id"]).public())

    @requires("admin")
    async def keys_revoke(self, request: web.Request) -> web.Response:
        key = self._keystore().revoke(request.match_info["id"])
        self.log.bind(event="key_revoked", key=key.id).info("API key revoked")
        return json_response({"revoked": key.public()})

    # -- metrics and docs -----------------------------------------------------------

    @requires("admin")
    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    @requires(PUBLIC)
    async def metrics_public(self, request: web.Request) -> web.Response:
        """/metrics when gateway.metrics_public is set (a scraper without a key)."""
        return await self.metrics_route(request)

    @requires(PUBLIC)
    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document(__version__))

    @requires(PUBLIC)
    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=docs_page(openapi_document(__version__)), content_type="text/html")

    # -- the operator dashboard (swarmd/gateway/dashboard.py) ------------------------

    @requires(PUBLIC)
    async def dashboard_page(self, request: web.Request) -> web.Response:
        return await self.dashboard.page(request)  # static: no data, the feed needs a key

    @requires("models:read")
    async def dashboard_feed(self, request: web.Request) -> web.StreamResponse:
        return await self.dashboard.feed(request, self._gateway_summary)

    def _gateway_summary(self) -> dict[str, Any]:
        return {"url": self.url, "version": __version__, "uptime": round(time.time() - self._started, 3),
                "in_flight": self._in_flight, "auth": self.config.auth}


def _code_for_status(status: int) -> str:
    return {
        400: ERR_BAD_REQUEST, 401: ERR_UNAUTHORIZED, 403: ERR_FORBIDDEN, 404: ERR_NOT_FOUND,
        405: ERR_BAD_REQUEST, 413: ERR_TOO_LARGE, 429: ERR_RATE_LIMITED, 503: ERR_NOT_READY,
    }.get(status, ERR_INTERNAL if status >= 500 else ERR_BAD_REQUEST)
