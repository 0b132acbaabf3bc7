"""The lean gRPC lane: grpc_wire.GrpcConnection on asyncio sockets, calls served by
grpc_service.OipService (gateway.grpc_engine = "lean", the default).

Measured here (issue 20): grpcio's asyncio server spends ~310 µs of CPU per call before
any work of ours; this lane's whole HTTP/2 + gRPC framing is a few tens of µs (figures in
docs/gateway.md). Each connection is one protocol object around the sans-IO core. A
ModelInfer whose request is complete is parsed, checked and queued at once and answered
from the backend future's done callback, with no Task (OipService.infer_soon: a Task,
its coroutine frames and its wake-up were ~8 µs of a ~75 µs call on the loop); other
unary calls, and a ModelInfer with a grpc-timeout, while tracing is on or on a backend
without futures (the swarm's), run in a Task of their own, bounded by the call's
grpc-timeout when it sent one. ModelStreamInfer streams run one Task per stream,
answering in order.

Limits (gateway config): connections (max_connections, per address), open streams per
connection (SETTINGS_MAX_CONCURRENT_STREAMS), message size (max_body_bytes), header
size; time: a connection's preface and any frame or header block must complete within
header_timeout, a unary request message within body_timeout, an idle connection closes
after keepalive_timeout (GOAWAY first). A client that stops reading its answers stops
being read (transport flow control), so no buffer grows without bound.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from swarmd.errors import SwarmdError
from swarmd.gateway.grpc_http2 import GRPC_STATUS
from swarmd.gateway.grpc_service import SERVICE, GrpcAbort, OipService, Served, Stream, unimplemented
from swarmd.gateway.grpc_wire import (
    Cancelled,
    GrpcConnection,
    HalfClosed,
    Limits,
    Message,
    Request,
    Terminated,
)
from swarmd.gateway.h2frames import ENHANCE_YOUR_CALM, NO_ERROR
from swarmd.gateway.proto import oip_pb2 as pb
from swarmd.node.supervisor import finish_within

if TYPE_CHECKING:
    from swarmd.gateway.server import Gateway

TICK = 1.0  # seconds between the lane's checks of its connections' timers
STREAM_BACKLOG = 128  # ModelStreamInfer requests a client may send ahead of their answers
DEADLINE = GRPC_STATUS["DEADLINE_EXCEEDED"]
INTERNAL = GRPC_STATUS["INTERNAL"]
PREFIX = f"/{SERVICE}/"


@dataclass
class Call:
    """One call on a connection, from its headers to its answer."""

    name: str
    metadata: dict[str, str]
    timeout: float | None
    started: float
    message: bytes | None = None
    task: asyncio.Future[Any] | None = None  # what serves it: its Task, or the backend's future (infer_soon)
    queue: asyncio.Queue[bytes | None] | None = None  # ModelStreamInfer: requests in order, None at the end
    held: int = 0  # bytes of its request messages the connection holds (LaneProtocol.held)


class GrpcLane:
    """One listener speaking gRPC's HTTP/2 in front of a Gateway, with OipService's methods."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.service = OipService(gateway)
        cfg = gateway.config
        self.limits = Limits(max_message=cfg.max_body_bytes)
        # request bytes one connection may hold (whole messages waiting or being served, and messages
        # still arriving) before it stops reading: the client's TCP window then holds the rest
        self.max_held = 2 * cfg.max_body_bytes + (1 << 20)
        self.header_timeout = cfg.header_timeout
        self.body_timeout = cfg.body_timeout
        self.keepalive_timeout = cfg.keepalive_timeout
        self.max_connections = cfg.max_connections
        self.max_per_address = cfg.max_connections_per_address or cfg.max_connections
        self.conns: set[LaneProtocol] = set()
        self.by_address: dict[str, int] = {}
        self.refused = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tick: asyncio.TimerHandle | None = None
        self._last_log = 0.0
        self.log = logger.bind(role="gateway", part="grpc")

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(lambda: LaneProtocol(self), host, port, reuse_address=True,
                                                   backlog=1024)
        except OSError as e:
            raise SwarmdError("ERR_CONFIG", f"gateway cannot listen for gRPC on {host}:{port}: {e.strerror}") from None
        self.port = self.server.sockets[0].getsockname()[1]
        self._tick = loop.call_later(TICK, self._check)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        """GOAWAY to every client, running calls get `grace` seconds, then every connection closes."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self.server is not None:
            self.server.close()
            self.server = None
        tasks = []
        for c in list(self.conns):
            c.core.goaway(NO_ERROR, "server stopping")
            c.flush()
            tasks += [call.task for call in c.calls.values() if call.task is not None]
        await finish_within(tasks, grace)
        for c in list(self.conns):
            c.close()
        self.conns.clear()

    def note(self, event: str, message: str, *args: Any) -> None:
        """A refused or misbehaving client: one log line a second at most (no per-packet spam)."""
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            self.log.bind(event=event).warning(message, *args)

    def _check(self) -> None:
        now = time.monotonic()
        for c in list(self.conns):
            c.check(now)
        self._tick = asyncio.get_running_loop().call_later(TICK, self._check)


class LaneProtocol(asyncio.Protocol):
    """One client connection: bytes to the core, its events to calls, answers back."""

    def __init__(self, lane: GrpcLane) -> None:
        self.lane = lane
        self.core = GrpcConnection(lane.limits)
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.calls: dict[int, Call] = {}
        self.started = self.active = time.monotonic()
        self.partial_since: float | None = None  # an incomplete frame or header block is buffered since then
        self.flush_soon = False
        self.closed = False
        self.counted = False
        self.held = 0  # bytes of whole request messages held by calls (see GrpcLane.max_held)
        self.reading_paused = False
        self.writing_paused = False

    # -- the transport's events --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        lane = self.lane
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, tuple) else "?"
        if len(lane.conns) >= lane.max_connections or lane.by_address.get(self.address, 0) >= lane.max_per_address:
            lane.refused += 1
            lane.note("grpc_connection_refused", "gRPC connection from {} refused: over gateway.max_connections "
                      "or max_connections_per_address", self.address)
            self.closed = True
            transport.abort()
            return
        self.counted = True
        lane.conns.add(self)
        lane.by_address[self.address] = lane.by_address.get(self.address, 0) + 1
        self.core.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.active = time.monotonic()
        for ev in self.core.receive(data):
            if type(ev) is Message:
                self._message(ev)
            elif type(ev) is HalfClosed:
                self._half_closed(ev.stream_id)
            elif type(ev) is Request:
                self._request(ev)
            elif type(ev) is Cancelled:
                call = self.calls.pop(ev.stream_id, None)
                if call is not None and call.task is not None:
                    call.task.cancel()  # it releases what it holds on the way out
                elif call is not None:
                    self._release(call, call.held)
            elif type(ev) is Terminated:
                if not ev.by_peer:
                    self.lane.note("grpc_protocol_error", "gRPC client {} broke HTTP/2 (code {}): {}",
                                   self.address, ev.code, ev.message)
                self.flush()
                self.close()
                return
        if self.core.buf or self.core.header_stream:
            if self.partial_since is None:
                self.partial_since = self.active
        else:
            self.partial_since = None
        self.flush()
        if self.core.going_away and not self.core.streams:
            self.close()
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        """Stop reading while the client does not read its answers, or while the connection holds
        more request bytes than GrpcLane.max_held; read on once it is down to half of that."""
        if self.closed or self.transport is None:
            return
        held = self.held + self.core.buffered
        if not self.reading_paused and (self.writing_paused or held > self.lane.max_held):
            self.reading_paused = True
            self.transport.pause_reading()
        elif self.reading_paused and not self.writing_paused and held <= self.lane.max_held // 2:
            self.reading_paused = False
            self.transport.resume_reading()

    def _release(self, call: Call, n: int) -> None:
        """A call is done with n bytes of its request."""
        call.held -= n
        self.held -= n
        if self.reading_paused:
            self._update_reading()

    def eof_received(self) -> bool | None:
        return False  # HTTP/2 has no half-close of the connection: close

    def pause_writing(self) -> None:
        self.writing_paused = True  # a client not reading its answers sends no more calls
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()
        if self.counted:
            self.counted = False
            lane = self.lane
            lane.conns.discard(self)
            n = lane.by_address.get(self.address, 1) - 1
            if n:
                lane.by_address[self.address] = n
            else:
                lane.by_address.pop(self.address, None)

    # -- calls -----------------------------------------------------------------------

    def _request(self, ev: Request) -> None:
        path = ev.path
        name = path[len(PREFIX):] if path.startswith(PREFIX) else ""
        if name not in self.lane.service.unary and name != "ModelStreamInfer":
            abort = self.lane.service.refuse("", self.address, unimplemented(path), path=path)
            self.core.respond(ev.stream_id, None, abort.status, abort.details)
            return
        call = self.calls[ev.stream_id] = Call(name, ev.metadata, ev.timeout, time.monotonic())
        if name == "ModelStreamInfer":
            try:
                stream = self.lane.service.open_stream(ev.metadata, self.address)
            except GrpcAbort as e:
                del self.calls[ev.stream_id]
                self.core.respond(ev.stream_id, None, e.status, e.details)
                return
            call.queue = asyncio.Queue()
            call.task = asyncio.get_running_loop().create_task(self._stream(ev.stream_id, call, stream),
                                                               name="gateway-grpc-stream")

    def _message(self, ev: Message) -> None:
        call = self.calls.get(ev.stream_id)
        if call is None:
            return
        call.held += len(ev.data)
        self.held += len(ev.data)
        if call.queue is not None:
            if call.queue.qsize() >= STREAM_BACKLOG:
                self._fail(ev.stream_id, GRPC_STATUS["RESOURCE_EXHAUSTED"],
                           f"ERR_OVERLOADED: the stream sent {STREAM_BACKLOG} requests ahead of their answers")
                return
            call.queue.put_nowait(ev.data)
        elif call.message is None:
            call.message = ev.data
        else:
            self._fail(ev.stream_id, INTERNAL, f"ERR_PROTOCOL: {call.name} is a unary call; the client sent a "
                                               "second request message")

    def _half_closed(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        if call.queue is not None:
            call.queue.put_nowait(None)
            return
        if call.message is None:
            self._fail(sid, INTERNAL, f"ERR_PROTOCOL: {call.name} call ended without its request message")
            return
        data, call.message = call.message, b""
        if call.name == "ModelInfer" and call.timeout is None:
            try:
                soon = self.lane.service.infer_soon(data, call.metadata, self.address)
            except GrpcAbort as e:
                self.calls.pop(sid, None)
                self._release(call, call.held)
                self.core.respond(sid, None, e.status, e.details)
                return
            if soon is not None:
                call.task = soon.future
                soon.future.add_done_callback(lambda _, soon=soon: self._answer(sid, call, soon))
                return
        call.task = asyncio.get_running_loop().create_task(self._serve(sid, call, data), name="gateway-grpc-call")

    def _answer(self, sid: int, call: Call, soon: Served) -> None:
        """An infer_soon() call's backend future is done: answer it (not if it was cancelled: its
        stream or connection is gone, or the lane is stopping)."""
        self.calls.pop(sid, None)
        self._release(call, call.held)
        try:
            out: bytes | None = self.lane.service.infer_answer(soon)
            status, details = 0, ""
        except GrpcAbort as e:
            out, status, details = None, e.status, e.details
        except asyncio.CancelledError:
            return
        if not self.closed:
            self.core.respond(sid, out, status, details)
            self._flush_later()

    def _fail(self, sid: int, status: int, details: str) -> None:
        call = self.calls.pop(sid, None)
        if call is not None and call.task is None:  # never handed to the service: it is counted here
            self._release(call, call.held)
            http = self.lane.gw.http_status(details.partition(":")[0])  # details read "ERR_CODE: ..."
            self.lane.service.refuse(call.name, self.address, GrpcAbort(status, details, http),
                                     time.monotonic() - call.started)
        if call is not None and call.task is not None:
            call.task.cancel()  # a running task releases what it holds and ends its call on the way out
        self.core.respond(sid, None, status, details)

    async def _serve(self, sid: int, call: Call, data: bytes) -> None:
        out: bytes | None = None
        status, details = 0, ""
        try:
            out = await self.lane.service.call_bytes(call.name, data, call.metadata, self.address, call.timeout)
        except GrpcAbort as e:
            status, details = e.status, e.details
        finally:
            self.calls.pop(sid, None)
            self._release(call, call.held)
        if not self.closed:
            self.core.respond(sid, out, status, details)
            self._flush_later()

    async def _stream(self, sid: int, call: Call, stream: Stream) -> None:
        assert call.queue is not None
        service = self.lane.service
        try:
            while True:
                data = await call.queue.get()
                if data is None:
                    break
                self._release(call, len(data))
                try:
                    answer = await service.stream_item(stream, pb.ModelInferRequest.FromString(data))
                except Exception as e:  # not a protobuf message (ended here); a bug (GrpcAbort, ended): the stream ends
                    abort = e if isinstance(e, GrpcAbort) else service.refuse(
                        "ModelStreamInfer", self.address, service.abort_for("ModelStreamInfer", e))
                    self.core.send_trailers(sid, abort.status, abort.details)
                    self._flush_later()
                    return
                if self.closed:
                    return
                self.core.send_message(sid, answer.SerializeToString())
                self._flush_later()
            self.core.send_trailers(sid, 0)
            self._flush_later()
        finally:
            self.calls.pop(sid, None)
            self._release(call, call.held)

    # -- writing and timers ------------------------------------------------------------

    def _flush_later(self) -> None:
        """Answers finishing in the same turn of the loop go out in one write."""
        if not self.flush_soon:
            self.flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_soon = False
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)
        if self.core.going_away and not self.core.streams and not self.calls:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()  # what is written still goes out

    def check(self, now: float) -> None:
        """The lane's tick: slow prefaces, frames and request messages; idle connections."""
        lane = self.lane
        if self.closed:
            return
        if not self.core.preface_seen and now - self.started > lane.header_timeout:
            lane.note("grpc_slow_client", "gRPC client {} sent no HTTP/2 preface within {}s", self.address,
                      lane.header_timeout)
            self.close()
            return
        if self.partial_since is not None and now - self.partial_since > lane.header_timeout:
            lane.note("grpc_slow_client", "gRPC client {} left a frame or header block incomplete for {}s",
                      self.address, lane.header_timeout)
            self.core.goaway(ENHANCE_YOUR_CALM, f"a frame or header block stayed incomplete for "
                                                f"{lane.header_timeout}s (gateway.header_timeout)")
            self.flush()
            self.close()
            return
        for sid, call in list(self.calls.items()):
            if call.task is None and now - call.started > lane.body_timeout:
                self._fail(sid, DEADLINE, f"ERR_TIMEOUT: the request message did not arrive within "
                                          f"{lane.body_timeout}s (gateway.body_timeout)")
        if not self.calls and not self.core.streams and now - self.active > lane.keepalive_timeout:
            self.core.goaway(NO_ERROR, "idle")
        self.flush()


__all__ = ["GrpcLane"]
