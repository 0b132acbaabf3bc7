"""The lean HTTP/1.1 lane: the inference routes served without aiohttp's request machinery.

Measured here (issue 19): a bare aiohttp POST handler costs ~90 µs of CPU per
request on this box, a plain asyncio protocol reading the same request ~15 µs;
nearly every request a gateway serves is an inference. So each connection
starts in this lane, which serves only requests it fully understands:
`POST /v2/models/{model}[/versions/{version}]/infer HTTP/1.1` (the route
table's `fast` rows) with a Content-Length body within its limit, plain model
and version names, and none of Transfer-Encoding, Content-Encoding, Expect,
Upgrade or folded headers. On anything else — another route, a request it does
not fully understand, a body over its limit — it hands aiohttp the connection
with every byte of the request as it arrived, and aiohttp keeps it from then on:
every other route, error answer and corner of HTTP stays aiohttp's.

The policy is the middleware's own methods (request ids, CORS, the in-flight
bound, keys and rate limits, error bodies, metrics, access log) and the handler
is oip_routes' `_oip_answer`, so both lanes answer alike. The connection guard
(guard.py) still counts and caps connections and times every request's headers;
the lane times bodies (`body_timeout`: a 504, then the connection closes) and
idle keep-alive connections (`keepalive_timeout`). One request runs at a time
per connection; pipelined requests wait in order, bounded (reading pauses).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import orjson

from swarmd.errors import ERR_TIMEOUT, SwarmdError
from swarmd.gateway.guard import ConnectionGuard, GuardedProtocol
from swarmd.gateway.keys import ApiKey
from swarmd.gateway.middleware import MODEL, RID
from swarmd.gateway.routes import ROUTES
from swarmd.node.supervisor import finish_within

MAX_HEAD = 8192  # request line + headers the lane reads; a longer head goes to aiohttp (its limits apply)
MAX_HEADERS = 64
PREFIX = b"POST /v2/models/"
# names aiohttp would pass through unchanged (no percent-decoding): anything else goes to aiohttp
TARGET = re.compile(rb"/v2/models/([A-Za-z0-9._~:-]{1,256})/(?:versions/([A-Za-z0-9._~:-]{1,256})/)?infer")
HEADERS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t\x21-\x7e\x80-\xff]*\r\n)*")
FIELD = re.compile(rb"([^:]+):[ \t]*([^\r]*?)[ \t]*\r\n")
REFUSED = frozenset({"transfer-encoding", "content-encoding", "expect", "upgrade"})  # aiohttp's to handle
JSON = b"application/json"
OCTETS = b"application/octet-stream"
STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


@dataclass
class Head:
    """What the lane needs of one request's head."""

    route: str  # the route table's path: the metrics label
    path: str
    model: str
    version: str | None
    headers: dict[str, str]  # lower-case names; the trace carrier too
    length: int  # bytes of the head, blank line included
    content_length: int
    close: bool  # Connection: close


class FastLane:
    """One per gateway: the fast routes, their limits, the open lane connections."""

    def __init__(self, gateway: Any) -> None:
        self.gw = gateway
        cfg = gateway.config
        self.fast_routes = {r.path: r for r in ROUTES if r.fast}
        self.plain = "/v2/models/{model}/infer"
        self.versioned = "/v2/models/{model}/versions/{version}/infer"
        assert {self.plain, self.versioned} <= set(self.fast_routes)
        self.permission = gateway._permissions[(self.plain, "POST")]
        self.max_body = cfg.max_body_bytes
        self.max_json = min(cfg.max_json_bytes, cfg.max_body_bytes)  # aiohttp's client_max_size bounds both
        self.body_timeout = cfg.body_timeout
        self.keepalive_timeout = cfg.keepalive_timeout
        self.conns: set[FastProtocol] = set()
        self.served = 0  # requests this lane answered (the rest went to aiohttp)
        self.handed_off = 0  # connections handed to aiohttp
        self._date_sec = -1
        self._date = b""

    def protocol(self, guard: ConnectionGuard) -> FastProtocol:
        return FastProtocol(guard, self)

    def date(self) -> bytes:
        sec = int(time.time())
        if sec != self._date_sec:
            self._date_sec = sec
            self._date = formatdate(sec, usegmt=True).encode()
        return self._date

    def parse_head(self, data: bytes, end: int) -> Head | None:
        """The head data[:end] (end: where its blank line starts), or None: hand it to aiohttp."""
        nl = data.find(b"\r\n", 0, end + 2)
        line = data[:nl]
        if len(line) > MAX_HEAD or not line.endswith(b" HTTP/1.1"):
            return None
        m = TARGET.fullmatch(line, 5, len(line) - 9)  # between "POST " and " HTTP/1.1"
        if m is None:
            return None
        block = data[nl + 2:end + 2]  # every header line with its CRLF
        if not HEADERS.fullmatch(block):  # one pass in C: tokens, no control bytes, no folded lines
            return None
        fields = FIELD.findall(block)
        if len(fields) > MAX_HEADERS:
            return None
        headers = {name.lower().decode(): value.decode("utf-8", "surrogateescape") for name, value in fields}  # as aiohttp
        if len(headers) != len(fields) or not REFUSED.isdisjoint(headers):
            return None  # a repeated header (aiohttp decides how they combine), or one aiohttp must handle
        cl = headers.get("content-length")
        if cl is None or not (cl.isascii() and cl.isdigit()) or len(cl) > 15:
            return None
        content_length = int(cl)
        limit = self.max_body if "inference-header-content-length" in headers else self.max_json
        if content_length > limit:
            return None  # aiohttp's path answers the 413, after the key check, as always
        conn = headers.get("connection", "keep-alive").lower()
        if conn not in ("keep-alive", "close"):
            return None
        model, version = m.group(1).decode(), m.group(2)
        return Head(
            route=self.plain if version is None else self.versioned,
            path=line[5:-9].decode(),
            model=model,
            version=None if version is None else version.decode(),
            headers=headers,
            length=end + 4,
            content_length=content_length,
            close=conn == "close",
        )

    async def close(self, timeout: float) -> None:
        """Gateway stop: let running requests finish within timeout, then close every lane connection."""
        await finish_within([c.task for c in self.conns if c.task is not None], timeout)
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        self.conns.clear()


class FastProtocol(GuardedProtocol):
    """One connection: served here until a request needs aiohttp, then forwarded (GuardedProtocol)."""

    def __init__(self, guard: ConnectionGuard, lane: FastLane) -> None:
        super().__init__(guard)
        self.lane = lane
        self.chunks: list[bytes] = []  # bytes from the start of the next unanswered request
        self.size = 0
        self.head: Head | None = None
        self.busy = False  # a request is being answered (its answer not yet written)
        self.task: asyncio.Task[Any] | None = None  # its Task
        self.body_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # loop time of the last answer while idle, None while not
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.eof = False
        self.closed = False

    # -- the transport's events ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.loop = asyncio.get_running_loop()  # once: each lookup is a getpid() syscall on Python 3.11
        if self._admit(transport):
            self._arm()  # the first request's headers: header_timeout from the connection's start
            self.lane.conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            super().data_received(data)  # aiohttp has the connection now
            return
        if self.closed:
            return
        self.idle_since = None  # not idle: a running idle timer finds this and stands down
        self.chunks.append(data)
        self.size += len(data)
        if not self.busy:
            self._next()
        elif self.size > self.lane.max_body + MAX_HEAD and not self.reading_paused:
            self.reading_paused = True  # pipelined requests pile up: wait until they are served
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return super().eof_received()
        if self.busy:
            self.eof = True  # answer the request under way, then close
            return True
        return False

    def pause_writing(self) -> None:
        if self.inner is not None:
            super().pause_writing()
        else:
            self.writing_paused = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            super().resume_writing()
            return
        if self.writing_paused:
            self.writing_paused = False
            if self.busy and not self.closed and self.task is None:
                self._after()  # the answer is out: on to the next request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timers()
        self.lane.conns.discard(self)
        super().connection_lost(exc)  # a running request finishes; its answer goes nowhere

    # -- requests ------------------------------------------------------------------

    def _next(self) -> None:
        """Start on the next request in the buffer: serve it, wait for more bytes, or hand over."""
        if not self.chunks:
            return
        head = self.head
        if head is not None and self.size < head.length + head.content_length:
            return  # more of the body to come: no join until it is all here (body_timeout runs)
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        data = self.chunks[0]
        if head is None:
            if not data.startswith(PREFIX[: len(data)]):
                self._hand_off()
                return
            end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                if len(data) >= MAX_HEAD + 4:
                    self._hand_off()
                elif self._timer is None:
                    self._arm()  # the first byte of a next request: its headers get header_timeout
                return
            head = self.lane.parse_head(data, end)
            if head is None:
                self._hand_off()
                return
            self.head = head
            if self._timer is not None:  # headers complete: the body has body_timeout from here
                self._timer.cancel()
                self._timer = None
        need = head.length + head.content_length
        if self.size < need:
            if self.body_timer is None:
                self.body_timer = asyncio.get_running_loop().call_later(self.lane.body_timeout, self._body_late)
            return
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        body = data[head.length:need]
        rest = data[need:]
        self.chunks = [rest] if rest else []
        self.size = len(rest)
        self.head = None
        self._start(head, body)

    def _body_late(self) -> None:
        """The body did not arrive within body_timeout: a 504 (after the key check), then the connection closes."""
        self.body_timer = None
        head, self.head = self.head, None
        self.chunks, self.size = [], 0
        if head is not None and not self.busy and not self.closed:
            head.close = True
            self._start(head, None)

    def _hand_off(self) -> None:
        """aiohttp takes the connection from this request on, with its bytes as they arrived."""
        data = b"".join(self.chunks)
        self.chunks, self.size, self.head = [], 0, None
        self._stop_timers()
        self.lane.conns.discard(self)
        self.lane.handed_off += 1
        if self._timer is None:
            self._arm()  # aiohttp's headers get header_timeout too; the guard stops it once they are parsed
        self._attach()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if data:
            super().data_received(data)

    def _start(self, head: Head, body: bytes | None) -> None:
        """Answer a request in a Task of its own (inference is bounded by asyncio.timeout, which
        wants one); the connection reads nothing else meanwhile."""
        self.busy = True
        self.task = self.loop.create_task(self._serve(head, body), name="gateway-fast-request")  # type: ignore[union-attr]

    async def _serve(self, head: Head, body: bytes | None) -> None:
        """The middleware's policy and oip_infer's work for one request, answered on the transport."""
        gw = self.lane.gw
        t0 = time.perf_counter()
        h = head.headers
        rid = gw._request_id(h.get("x-request-id"))
        state: dict[Any, Any] = {RID: rid}
        origin = h.get("origin")
        cors = origin if origin is not None and origin in gw._cors else None
        key: ApiKey | None = None
        ctype = JSON
        extra: Any = ()
        status = 200
        gw._in_flight += 1
        try:
            try:
                gw._admit()
                key = gw._check_key(h.get("x-api-key"), h.get("authorization"), self._address or "?",
                                    self.lane.permission)
                header_length = gw._oip_header_length(h.get("inference-header-content-length"))
                if body is None:
                    raise SwarmdError(ERR_TIMEOUT, f"request body did not arrive within {self.lane.body_timeout}s")
                out, json_length = await gw._oip_answer(state, h, head.model, head.version, body, header_length)
                if json_length is not None:
                    ctype = OCTETS
                    extra = (("Inference-Header-Content-Length", str(json_length)),)
            except SwarmdError as e:
                status, doc, headers = gw._error_reply(e, rid, head.path)
                out, extra = orjson.dumps(doc), headers.items()
            except (ConnectionResetError, asyncio.CancelledError):
                gw._count(head.route, "POST", head.path, 499, t0, key, state.get(MODEL, ""), rid, self._address)
                raise
            except Exception as e:
                status, doc, _ = gw._bug_reply(e, rid, "POST", head.path)
                out = orjson.dumps(doc)
        finally:
            gw._in_flight -= 1
        close = head.close or self.eof
        self.lane.served += 1
        self._respond(status, ctype, out, rid, extra, cors, close)
        # the answer is on its way first: at one connection the client reads it while the
        # metrics and the access log are written here (the latency they count ends at the write)
        gw._count(head.route, "POST", head.path, status, t0, key, state.get(MODEL, ""), rid, self._address)
        self.task = None
        if self.closed:
            return
        if close:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]
            return
        if not self.writing_paused:  # else resume_writing carries on, once the client has read it
            self._after()

    def _after(self) -> None:
        """The answer is written: read on, serve a pipelined request, or wait (keepalive_timeout)."""
        self.busy = False
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        loop = self.loop
        assert loop is not None
        if self.chunks:  # a pipelined request: on the next turn, so a run of them never recurses
            loop.call_soon(self._next)
        else:
            # keepalive_timeout from now; the timer is armed once and re-armed when it fires early,
            # not made and cancelled for every request of a busy connection
            self.idle_since = loop.time()
            if self.idle_timer is None:
                self.idle_timer = loop.call_later(self.lane.keepalive_timeout, self._idle_late)

    def _respond(self, status: int, ctype: bytes, body: bytes, rid: str, extra: Any, cors: str | None,
                 close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = STATUS[status] + b"Content-Type: %s\r\nContent-Length: %d\r\nX-Request-Id: %s\r\nDate: %s\r\n" % (
            ctype, len(body), rid.encode(), self.lane.date())
        parts = [head]
        for name, value in extra:
            parts += [name.encode(), b": ", value.encode("latin-1"), b"\r\n"]
        if cors is not None:
            for name, value in self.lane.gw._cors_headers(cors).items():
                parts += [name.encode(), b": ", value.encode("latin-1"), b"\r\n"]
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if len(body) < 1 << 16:
            parts.append(body)
            transport.write(b"".join(parts))
        else:  # a large binary answer: no copy to join it to its head
            transport.writelines((b"".join(parts), body))

    def _idle_late(self) -> None:
        self.idle_timer = None
        since = self.idle_since
        if since is None or self.busy or self.chunks or self.transport is None or self.closed:
            return  # in use since it was armed: the next answer arms it again
        left = since + self.lane.keepalive_timeout - self.loop.time()  # type: ignore[union-attr]
        if left > 0:  # answered again meanwhile: idle for less than keepalive_timeout so far
            self.idle_timer = self.loop.call_later(left, self._idle_late)  # type: ignore[union-attr]
            return
        self.closed = True
        self.transport.close()

    def _stop_timers(self) -> None:
        for name in ("body_timer", "idle_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
