"""The gateway's auth/limits middleware: what is the same for every HTTP route.

Request ids, CORS, the in-flight bound, API keys and permissions (from the route
table, swarmd/gateway/routes.py), per-key rate limits, bounded body reads, JSON
errors with stable codes, metrics and the access log. A mixin of Gateway
(swarmd/gateway/server.py); the lean HTTP lane (fastlane.py) calls the same
pieces, so both paths apply one policy.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_FORBIDDEN,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNAUTHORIZED,
    GATEWAY_STATUS,
    SwarmdError,
)
from swarmd.gateway.keys import ApiKey
from swarmd.gateway.routes import PUBLIC

RID = web.RequestKey("rid", str)  # the request id, echoed in X-Request-Id
MODEL = web.RequestKey("model", str)  # metrics label, set once the model is known to exist
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_STATUS: dict[str, int] = {code: http for code, (http, _) in GATEWAY_STATUS.items()}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ALLOWED_HEADERS = "authorization, content-type, x-api-key, x-request-id, inference-header-content-length"
EXPOSED_HEADERS = "x-request-id, inference-header-content-length, retry-after"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def bad(message: str) -> SwarmdError:
    return SwarmdError(ERR_BAD_REQUEST, message)


class Middleware:
    """Gateway's request policy (a mixin: the attributes are Gateway's)."""

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request[RID] = self._request_id(request.headers.get("X-Request-Id"))
        origin = request.headers.get("Origin")
        cors_ok = origin is not None and origin in self._cors
        key: ApiKey | None = None
        self._in_flight += 1
        try:
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                resp = self._preflight(cors_ok)
            else:
                self._admit()
                info = request.match_info.route.resource
                permission = None if info is None else self._permissions.get((info.canonical, request.method))
                if permission is not None and permission != PUBLIC:
                    key = self._authorize(request, permission)
                resp = await handler(request)
        except SwarmdError as e:
            status, doc, headers = self._error_reply(e, rid, request.path)
            resp = json_response(doc, status=status, headers=headers)
        except web.HTTPException as e:
            resp = json_response({"error": e.text or e.reason, "code": _code_for_status(e.status), "request_id": rid},
                                 status=e.status)
            if e.status == 405 and "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
        except (ConnectionResetError, asyncio.CancelledError):
            self._observe(request, 499, t0, key)  # client went away; nothing to send
            raise
        except Exception as e:
            status, doc, _ = self._bug_reply(e, rid, request.method, request.path)
            resp = json_response(doc, status=status)
        finally:
            self._in_flight -= 1
        resp.headers["X-Request-Id"] = rid
        if cors_ok:
            resp.headers.update(self._cors_headers(origin))  # type: ignore[arg-type]
        self._observe(request, resp.status, t0, key)
        return resp

    # -- the pieces the middleware and the lean lane (fastlane.py) share ----------

    def _request_id(self, sent: str | None) -> str:
        """The client's X-Request-Id when it is well formed, else prefix + counter (no syscall)."""
        if sent is not None and REQUEST_ID_RE.match(sent):
            return sent
        self._rid_seq += 1
        return f"{self._rid_prefix}{self._rid_seq:08x}"

    def _admit(self) -> None:
        """The in-flight bound; the caller has counted this request in."""
        if self._in_flight > self.config.max_in_flight:
            raise SwarmdError(ERR_OVERLOADED, f"gateway is serving {self.config.max_in_flight} requests; retry")

    @staticmethod
    def _cors_headers(origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED_HEADERS,
                "Vary": "Origin"}

    def _error_reply(self, e: SwarmdError, rid: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, headers) of a SwarmdError; 5xx ones go to the dashboard's error list."""
        status = HTTP_STATUS.get(e.code, 502)
        headers: dict[str, str] = {}
        if e.code == ERR_RATE_LIMITED and isinstance(e.data, dict):
            headers["Retry-After"] = str(e.data.get("retry_after", 1))
        if e.code == ERR_UNAUTHORIZED:
            headers["WWW-Authenticate"] = 'Bearer realm="swarmd"'
        if status >= 500:
            self.dashboard.note_error(path, status, e.code, e.message)
        return status, {"error": e.message, "code": e.code, "request_id": rid}, headers

    def _bug_reply(self, e: Exception, rid: str, method: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """A handler raised what it should not have: logged with its traceback, a 500 to the client."""
        self.log.opt(exception=e).bind(event="http_bug", request_id=rid, path=path).error(
            "unhandled error serving {} {}", method, path)
        message = f"internal error (request id {rid})"
        self.dashboard.note_error(path, 500, ERR_INTERNAL, message)
        return 500, {"error": message, "code": ERR_INTERNAL, "request_id": rid}, {}

    def _observe(self, request: web.Request, status: int, t0: float, key: ApiKey | None) -> None:
        info = request.match_info.route.resource
        self._count(info.canonical if info is not None else "unmatched", request.method, request.path, status, t0,
                    key, request.get(MODEL, ""), request[RID], request.remote)

    def _count(self, route: str, method: str, path: str, status: int, t0: float, key: ApiKey | None, model: str,
               rid: str, remote: str | None) -> None:
        """Metrics and the access log of one served request."""
        elapsed = time.perf_counter() - t0
        self.observe(route, method if method in KNOWN_METHODS else "OTHER", str(status), elapsed, model)
        if self.access_log is not None:  # the method as sent: the log is not a bounded label set
            self.access_log.note(rid, method, path, status, round(elapsed * 1000, 3), key.id if key else None, remote)

    def _preflight(self, cors_ok: bool) -> web.Response:
        if not cors_ok:
            return json_response({"error": "origin is not in gateway.cors_origins", "code": ERR_FORBIDDEN}, status=403)
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        })

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
            if request.content.is_eof():  # all here already (the usual small body): no timer to arm
                body = await request.read()
            else:
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


def _code_for_status(status: int) -> str:
    return {
        400: ERR_BAD_REQUEST, 401: ERR_UNAUTHORIZED, 403: ERR_FORBIDDEN, 404: ERR_NOT_FOUND,
        405: ERR_BAD_REQUEST, 413: ERR_TOO_LARGE, 429: ERR_RATE_LIMITED, 503: ERR_NOT_READY,
    }.get(status, ERR_INTERNAL if status >= 500 else ERR_BAD_REQUEST)
