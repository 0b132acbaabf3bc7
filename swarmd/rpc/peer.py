"""RpcPeer: both ends of a connection call, notify and stream to each other.

Wire messages are the envelopes of `swarmd.rpc.envelope` on mux channel 0;
stream calls additionally own a mux channel opened by the caller. The hot path
is kept lean: a call is one future, one deadline entry (no timer of its own:
one sweep timer per peer fires at the earliest deadline) and one frame written
at once when nothing else is queued. Handlers run in a Task of their own (so
asyncio.timeout and TaskGroup work in them); one registered inline=True runs its
first step in the read callback, and if it finishes without suspending its
answer leaves with the flush that ends the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_CLOSED,
    ERR_INTERNAL,
    ERR_OVERLOADED,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.net.channel import Channel
from swarmd.net.connection import SecureConnection
from swarmd.net.loglimit import hostile
from swarmd.node.deadline import within
from swarmd.node.trust import HELLO_EVENT, MAX_GRANTS
from swarmd.rpc import codec, envelope
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.envelope import CANCEL, ERROR, EVENT, REQUEST, RESPONSE, EnvelopeError
from swarmd.rpc.methods import READ, CallContext, Firewall, Method, Methods


class _Resume:
    """Continue, inside a Task, a coroutine whose first step already ran inline.

    Running a handler's first step inline saves a Task per call when it
    completes without suspending (echo, ping, lookups in memory). When it does
    suspend, the future it yielded is handed to the Task, which resumes it
    exactly as if the Task had started it.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, None, Any]:
        coro = self._coro
        pending = self._first
        self._first = None
        while True:
            try:
                yield pending
            except BaseException as exc:  # noqa: B036 - forward cancellation and errors into the handler
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            break
        return (yield from coro.__await__())


def _builtin_methods() -> dict[str, Method]:
    async def ping(ctx: CallContext, params: Any) -> Any:
        return "pong" if params is None else params

    async def get_instance_id(ctx: CallContext, params: Any) -> Any:
        return ctx.peer_conn.instance_id

    async def list_methods(ctx: CallContext, params: Any) -> Any:
        """What this peer serves, each method with its op (r/w) and whether it is a stream:
        introspection for operators (`swarmd call KEY --list`); names are not secrets, and
        the firewall still decides who may call each."""
        table = ctx.peer_conn.methods
        found = {n: m for n, m in _BUILTINS.items() if n != HELLO_EVENT}
        for name in table.names() if table is not None else ():
            m = table.get(name)
            if m is not None:
                found[name] = m
        return [{"name": n, "op": m.op, "stream": m.stream} for n, m in sorted(found.items())]

    async def present_grants(ctx: CallContext, params: Any) -> Any:
        # The hello (event) a peer sends first on a connection: its role grants.
        # Inline, so they count before the next message on the connection is served.
        ctx.peer_conn._learn_grants(params)

    return {
        "ping": Method("ping", ping, READ, False, inline=True),
        "getInstanceId": Method("getInstanceId", get_instance_id, READ, False, inline=True),
        "listMethods": Method("listMethods", list_methods, READ, False),
        HELLO_EVENT: Method(HELLO_EVENT, present_grants, READ, False, inline=True),
    }


_BUILTINS = _builtin_methods()
_NO_ROLES: frozenset[str] = frozenset()

_SWEEP_SLACK = 0.001  # a sweep also expires calls due within this many seconds
_SWEEP_MIN_GAP = 0.01  # and the next sweep is at least this far away


class Stream:
    """A byte stream tied to one call: `send`, `recv` (None at end), `close`, and the call's `result`."""

    def __init__(
        self, peer: RpcPeer, channel: Channel, result: asyncio.Future[Any] | None = None, request_id: int = 0
    ) -> None:
        self.peer = peer
        self.channel = channel
        self._result = result
        self._rid = request_id

    @property
    def id(self) -> int:
        return self.channel.id

    async def send(self, data: bytes) -> None:
        await self.channel.send(data)

    async def recv(self) -> bytes | None:
        return await self.channel.recv()

    async def close(self) -> None:
        """Half-close: we send nothing more; the other side's recv() returns None."""
        self.channel.end()

    def abort(self, error: SwarmdError | None = None) -> None:
        """Reset the channel; on the caller side also cancel the call (its result raises ERR_CANCELLED)."""
        err = error or SwarmdError(ERR_CANCELLED, "stream aborted")
        self.channel.reset(err)
        res = self._result
        if res is not None and not res.done():
            res.set_exception(err)
            res.exception()  # retrieved: aborting is not an unhandled error
            if self.peer._forget(self._rid) is not None:
                self.peer._send_cancel(self._rid)

    async def result(self) -> Any:
        """Caller side: the handler's return value (raises its SwarmdError)."""
        if self._result is None:
            raise RuntimeError("result() is for the side that opened the stream")
        return await self._result

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        if et is not None:
            self.abort()


class RpcPeer:
    """One RPC connection; both sides can call, notify and stream."""

    def __init__(
        self,
        conn: SecureConnection,
        methods: Methods | None = None,
        *,
        firewall: Firewall | None = None,
        config: RpcConfig | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.conn = conn
        self.methods = methods or Methods()
        self.firewall = firewall
        self.config = config or RpcConfig()
        self.instance_id = instance_id or uuid.uuid4().hex
        self._loop = conn._loop
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # rid -> (deadline, method, timeout) of every call in _pending; one sweep timer
        # fires at the earliest deadline instead of a timer per call
        self._deadlines: dict[int, tuple[float, str, float]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._pack = codec.new_packer().pack  # one per peer: a peer lives on one thread
        self._pending_streams: dict[int, Stream] = {}
        self._running: dict[int, asyncio.Task[Any]] = {}
        self._events: set[asyncio.Task[Any]] = set()
        self._inline = 0
        self._backlog: deque[tuple[int, str, Any, int | None, float, int]] = deque()
        self._backlog_bytes = 0
        self._msg_size = 0  # size of the message being dispatched
        # while the node decides whether to admit this peer (an async firewall), its requests
        # and events wait here, bounded like the backlog, and none is dispatched
        self._held: list[tuple[list[Any], int, float]] | None = None
        self._held_bytes = 0
        # channels of stream calls held meanwhile: accepted at once so their first bytes are
        # kept (within the channel's credit) instead of dropped as frames on an unknown channel
        self._held_channels: dict[int, Channel] = {}
        # every message we send is checked against this before it leaves: one over the
        # peer's frame limit would make it close the connection every other call shares
        self.max_message = conn.config.max_message_size
        # the grants the peer's presentGrants hello showed (wire form, at most MAX_GRANTS);
        # `roles` verifies them against our trust on each use, so an expired one stops counting
        self._grants: list[bytes] = []
        conn.on_message = self._on_message
        conn.on_close = self._on_close
        conn.on_writable = self._on_writable
        self._log = logger.bind(component="rpc")
        trust = firewall.trust if firewall is not None else None
        if trust is not None and trust.presented():
            # the hello leaves before any call we make on this connection: a callback
            # on `established` runs before the dialer's await of it resumes
            conn.established.add_done_callback(self._send_hello)

    def _send_hello(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None or self.conn.is_closed:
            return
        trust = self.firewall.trust if self.firewall is not None else None
        if trust is not None:
            with contextlib.suppress(SwarmdError):
                self.conn.send_message(envelope.event(HELLO_EVENT, trust.presented()))

    def _learn_grants(self, grants: Any) -> None:
        if isinstance(grants, list):
            self._grants = [g for g in grants[:MAX_GRANTS] if isinstance(g, bytes)]

    @property
    def roles(self) -> frozenset[str]:
        """The roles the peer's presented grants admit it to now (by our operators)."""
        trust = self.firewall.trust if self.firewall is not None else None
        key = self.conn.remote_public_key
        if trust is None or key is None or not self._grants:
            return frozenset()
        return trust.roles_of(key, self._grants)

    # -- identity / state --------------------------------------------------

    @property
    def remote_public_key(self) -> bytes:
        key = self.conn.remote_public_key
        if key is None:
            raise SwarmdError(ERR_CLOSED, "handshake not complete")
        return key

    @property
    def is_closed(self) -> bool:
        return self.conn.is_closed

    @property
    def closed(self) -> asyncio.Future[SwarmdError]:
        return self.conn.closed

    # -- caller side -------------------------------------------------------

    def _start_call(
        self, method: str, params: Any, timeout: float, channel: int
    ) -> tuple[int, asyncio.Future[Any]]:
        conn = self.conn
        if conn.error is not None:
            raise SwarmdError(ERR_CLOSED, f"connection closed: {conn.error.message}")
        rid = self._next_id
        self._next_id = rid + 1
        try:
            msg = self._pack([REQUEST, rid, method, params, int(timeout * 1000), channel])
        except (TypeError, ValueError, OverflowError) as e:
            raise SwarmdError(ERR_BAD_REQUEST, f"params of {method!r} cannot be encoded: {e}") from None
        if len(msg) > self.max_message:
            raise self._too_large(f"a request for {method!r}", len(msg))
        fut = self._loop.create_future()
        pending = self._pending
        pending[rid] = fut
        deadline = self._loop.time() + timeout
        self._deadlines[rid] = (deadline, method, timeout)
        if deadline < self._sweep_at:
            self._arm_sweep(deadline)
        # a lone call goes out at once; calls made together coalesce into one flush
        conn.send_message(msg, now=len(pending) == 1)
        return rid, fut

    def _forget(self, rid: int) -> asyncio.Future[Any] | None:
        """Drop a call from the pending set (answered, expired or given up); its future, if it was there."""
        fut = self._pending.pop(rid, None)
        if fut is not None:
            self._deadlines.pop(rid, None)
        return fut

    def _arm_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self._loop.call_at(when, self._on_sweep)

    def _on_sweep(self) -> None:
        """Fail every call past its deadline, then sleep until the next deadline.

        Calls normally carry the same timeout, so deadlines grow with call order
        and the timer is armed once per timeout period, not once per call. The
        next sweep is at least SWEEP_MIN_GAP away, which bounds the work of many
        calls expiring at staggered times (each is then late by at most that gap).
        """
        self._sweep = None
        self._sweep_at = math.inf
        if not self._deadlines:
            return
        now = self._loop.time()
        horizon = now + _SWEEP_SLACK
        expired = []
        nxt = math.inf
        for rid, entry in self._deadlines.items():
            d = entry[0]
            if d <= horizon:
                expired.append(rid)
            elif d < nxt:
                nxt = d
        for rid in expired:
            _, method, timeout = self._deadlines.pop(rid)
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(SwarmdError(ERR_TIMEOUT, f"{method!r} got no answer within {timeout:g} s"))
                self._send_cancel(rid)
        if nxt < math.inf and self.conn.error is None:
            self._arm_sweep(max(nxt, now + _SWEEP_MIN_GAP))

    def _send_cancel(self, rid: int) -> None:
        if self.conn.error is None:
            self.conn.send_message(envelope.cancel(rid))

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - deadline sweep, no wait_for
        """Call method on the peer; raises SwarmdError (remote code, ERR_TIMEOUT, ERR_CLOSED)."""
        conn = self.conn
        if conn._write_paused:
            await self._drain_quietly()  # the peer reads slowly: wait instead of piling up
        if conn.error is not None:
            raise SwarmdError(ERR_CLOSED, f"connection closed: {conn.error.message}")
        if timeout is None:
            timeout = self.config.default_timeout
        rid = self._next_id
        self._next_id = rid + 1
        try:
            msg = self._pack([REQUEST, rid, method, params, int(timeout * 1000), 0])
        except (TypeError, ValueError, OverflowError) as e:
            raise SwarmdError(ERR_BAD_REQUEST, f"params of {method!r} cannot be encoded: {e}") from None
        if len(msg) > self.max_message:
            raise self._too_large(f"a request for {method!r}", len(msg))
        loop = self._loop
        fut = loop.create_future()
        pending = self._pending
        pending[rid] = fut
        # a lone call goes out at once; calls made together coalesce into one flush
        conn.send_message(msg, now=len(pending) == 1)
        # bookkeeping after the write: it overlaps with the peer's work on the call
        deadline = loop.time() + timeout
        self._deadlines[rid] = (deadline, method, timeout)
        if deadline < self._sweep_at:
            self._arm_sweep(deadline)
        try:
            return await fut
        except asyncio.CancelledError:
            if self._forget(rid) is not None:
                self._send_cancel(rid)
            raise

    async def _drain_quietly(self) -> None:
        try:
            await within(self.conn.drain(), self.config.default_timeout)
        except (SwarmdError, TimeoutError):
            pass

    def event(self, method: str, params: Any = None) -> None:
        """Fire and forget: no answer, errors only logged by the peer."""
        if self.conn.error is not None:
            raise SwarmdError(ERR_CLOSED, f"connection closed: {self.conn.error.message}")
        try:
            msg = envelope.event(method, params)
        except (TypeError, ValueError, OverflowError) as e:
            raise SwarmdError(ERR_BAD_REQUEST, f"params of event {method!r} cannot be encoded: {e}") from None
        if len(msg) > self.max_message:
            raise self._too_large(f"event {method!r}", len(msg))
        self.conn.send_message(msg)

    async def open_stream(self, method: str, params: Any = None, *, timeout: float | None = None) -> Stream:  # noqa: ASYNC109
        """Start a stream call; use the Stream to send/recv bytes and await its result()."""
        if timeout is None:
            timeout = self.config.stream_timeout
        channel = self.conn.open_channel()
        try:
            rid, fut = self._start_call(method, params, timeout, channel.id)
        except BaseException:
            channel._fail(SwarmdError(ERR_CLOSED, "stream call not sent"))
            raise
        result: asyncio.Future[Any] = self._loop.create_future()
        stream = Stream(self, channel, result, rid)

        def settle(f: asyncio.Future[Any]) -> None:
            self._forget(rid)
            # the callee finished: it ignores anything more we send, so our side is over
            if not channel.local_ended:
                channel.local_ended = True
                channel._maybe_release()
            if result.done():
                return
            if f.cancelled():
                result.cancel()
                return
            exc = f.exception()
            if exc is not None:
                err = exc if isinstance(exc, SwarmdError) else SwarmdError(ERR_INTERNAL, str(exc))
                if channel.error is None:
                    channel.reset(err)
                result.set_exception(err)
            else:
                result.set_result(f.result())

        fut.add_done_callback(settle)
        return stream

    # -- incoming ----------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        try:
            msg = envelope.decode(data)
        except EnvelopeError as e:
            if e.request_id is not None:
                self._reply_error(e.request_id, SwarmdError(ERR_BAD_REQUEST, e.message))
                return
            if e.kind in (RESPONSE, ERROR) and e.message_id is not None:
                # an answer holding a malformed tensor fails that call, not the connection
                fut = self._forget(e.message_id)
                if fut is not None and not fut.done():
                    fut.set_exception(SwarmdError(ERR_BAD_REQUEST, f"the peer's answer: {e.message}"))
                return
            if e.kind == EVENT:
                if hostile.allow("event:undecodable") is not None:
                    self._log.bind(code=ERR_BAD_REQUEST).info(f"event dropped: {e.message}")
                return
            raise
        kind = msg[0]
        if kind == RESPONSE:
            rid = msg[1]
            fut = self._pending.pop(rid, None)
            if fut is not None:
                self._deadlines.pop(rid, None)
                if not fut.done():
                    fut.set_result(msg[2])
        elif kind == REQUEST:
            if self._held is not None:
                self._hold_message(msg, len(data))
                return
            self._msg_size = len(data)
            self._on_request(msg[1], msg[2], msg[3], msg[4], msg[5])
        elif kind == ERROR:
            fut = self._forget(msg[1])
            if fut is not None and not fut.done():
                fut.set_exception(SwarmdError.from_wire(msg[2]))
        elif kind == EVENT:
            if self._held is not None and msg[1] not in _BUILTINS:  # the grants hello is learnt at once
                self._hold_message(msg, len(data))
                return
            self._on_event(msg[1], msg[2])
        elif kind == CANCEL:
            if self._held is not None:
                kept = [h for h in self._held if not (h[0][0] == REQUEST and h[0][1] == msg[1])]
                for h in self._held:
                    if h[0][0] == REQUEST and h[0][1] == msg[1] and h[0][5]:
                        self._held_channels.pop(h[0][5], None)
                        self.conn._channels.pop(h[0][5], None)
                self._held = kept
            task = self._running.get(msg[1])
            if task is not None:
                self._cancel_soon(task, "cancelled by the caller")

    # -- admission ---------------------------------------------------------

    def hold(self) -> None:
        """Dispatch nothing the peer sends until release(): its admission is still being decided."""
        if self._held is None:
            self._held = []
            self._held_bytes = 0

    def release(self) -> None:
        """The peer is admitted: dispatch what it sent meanwhile, in order, then everything at once."""
        held, self._held = self._held, None
        self._held_bytes = 0
        if not held or self.conn.error is not None:
            return
        for msg, size, arrived in held:
            if self.conn.error is not None:
                return
            try:
                if msg[0] == REQUEST:
                    self._msg_size = size
                    self._on_request(msg[1], msg[2], msg[3], msg[4], msg[5], arrived)
                else:
                    self._on_event(msg[1], msg[2])
            except SwarmdError as e:
                self.conn.close(e)
                return

    @property
    def held(self) -> bool:
        return self._held is not None

    def _hold_message(self, msg: list[Any], size: int) -> None:
        held = self._held
        assert held is not None
        if len(held) >= self.config.max_in_flight or self._held_bytes + size > self.config.max_backlog_bytes:
            raise SwarmdError(
                ERR_OVERLOADED,
                f"peer sent {len(held)} messages ({self._held_bytes} bytes) before it was admitted",
            )
        ch = msg[5] if msg[0] == REQUEST else 0
        if ch:
            try:
                self._held_channels[ch] = self.conn.accept_channel(ch)
            except SwarmdError as e:
                if e.code == ERR_PROTOCOL:
                    raise
                self._reply_error(msg[1], e)
                return
        held.append((msg, size, self._loop.time()))
        self._held_bytes += size

    def _lookup(self, method: str) -> Method:
        m = _BUILTINS.get(method) or self.methods.get(method)
        if m is None:
            raise SwarmdError(ERR_UNKNOWN_METHOD, f"no method {method!r} on this peer")
        if self.firewall is not None and method not in _BUILTINS:
            self.firewall.check(
                self.conn.remote_public_key or b"", method, m.op, m.roles, self.roles if m.roles else _NO_ROLES
            )
        return m

    def _on_request(
        self,
        rid: int,
        method: str,
        params: Any,
        timeout_ms: int | None,
        ch: int,
        arrived: float | None = None,
    ) -> None:
        conn = self.conn
        if conn._write_paused and not ch:
            # The peer is not reading our answers: hold new plain requests in a bounded
            # backlog instead of growing the pipe buffer; a peer that floods anyway is cut off.
            size = self._msg_size
            if (
                len(self._backlog) >= self.config.max_in_flight
                or self._backlog_bytes + size > self.config.max_backlog_bytes
            ):
                raise SwarmdError(
                    ERR_OVERLOADED,
                    f"peer sent {len(self._backlog)} requests ({self._backlog_bytes} bytes) "
                    "without reading our answers",
                )
            self._backlog.append((rid, method, params, timeout_ms, self._loop.time(), size))
            self._backlog_bytes += size
            return
        if arrived is not None and timeout_ms is not None:
            timeout_ms -= int((self._loop.time() - arrived) * 1000)
        stream: Stream | None = None
        running = self._running
        try:
            if rid in running:
                raise SwarmdError(ERR_BAD_REQUEST, f"request id {rid} is already running")
            if len(running) + self._inline >= self.config.max_in_flight:
                raise SwarmdError(
                    ERR_OVERLOADED,
                    f"{len(running)} requests running, the limit is {self.config.max_in_flight}",
                )
            m = _BUILTINS.get(method) or self.methods.get(method)
            if m is None:
                raise SwarmdError(ERR_UNKNOWN_METHOD, f"no method {method!r} on this peer")
            peer_key = conn.session.remote_public_key or b""
            if self.firewall is not None and method not in _BUILTINS:
                self.firewall.check(peer_key, method, m.op, m.roles, self.roles if m.roles else _NO_ROLES)
            deadline = None
            if timeout_ms is not None:
                if timeout_ms <= 0:
                    raise SwarmdError(ERR_TIMEOUT, f"request for {method!r} arrived after its deadline")
                deadline = self._loop.time() + timeout_ms / 1000.0
            if m.stream != bool(ch):
                raise SwarmdError(
                    ERR_BAD_REQUEST,
                    f"{method!r} is a stream method: open it as a stream"
                    if m.stream
                    else f"{method!r} is not a stream method: call it",
                )
            ctx = CallContext(peer_key, method, rid, deadline, self)
            if ch:
                held = self._held_channels.pop(ch, None) if self._held_channels else None
                stream = Stream(self, held or conn.accept_channel(ch))
                coro = m.handler(ctx, params, stream)
            else:
                coro = m.handler(ctx, params)
        except SwarmdError as e:
            if e.code == ERR_PROTOCOL:
                raise
            if ch and self._held_channels and self._held_channels.pop(ch, None) is not None:
                conn._channels.pop(ch, None)  # accepted while held; the caller resets it on our answer
            self._reply_error(rid, e)
            return
        if not m.inline:
            running[rid] = self._loop.create_task(self._continue(rid, method, coro, deadline, stream))
            return
        # An inline handler's first step runs here: most finish without suspending (no Task).
        self._inline += 1
        try:
            first = coro.send(None)
        except StopIteration as stop:
            if stream is None and conn.error is None:
                try:
                    msg = self._pack([RESPONSE, rid, stop.value])
                except (TypeError, ValueError, OverflowError):
                    self._finish(rid, method, stream, stop.value, None)  # reports the encoding error
                    return
                if len(msg) > self.max_message:
                    self._reply_error(rid, self._too_large(f"the result of {method!r}", len(msg)))
                    return
                conn.send_message(msg)
                return
            self._finish(rid, method, stream, stop.value, None)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a handler may raise anything; it becomes an error reply
            self._finish(rid, method, stream, None, e)
            return
        finally:
            self._inline -= 1
        running[rid] = self._loop.create_task(
            self._continue(rid, method, _Resume(coro, first), deadline, stream)
        )

    def _on_writable(self) -> None:
        backlog = self._backlog
        while backlog and not self.conn._write_paused and self.conn.error is None:
            rid, method, params, timeout_ms, arrived, size = backlog.popleft()
            self._backlog_bytes -= size
            try:
                self._on_request(rid, method, params, timeout_ms, 0, arrived)
            except SwarmdError as e:
                self.conn.close(e)
                return

    async def _continue(
        self, rid: int, method: str, resumed: Awaitable[Any], deadline: float | None, stream: Stream | None
    ) -> None:
        timer = None
        task = asyncio.current_task()
        expired = False
        if deadline is not None and task is not None:

            def expire() -> None:
                nonlocal expired
                expired = True
                task.cancel(msg="deadline passed")

            timer = self._loop.call_at(deadline, expire)
        try:
            result = await resumed
        except asyncio.CancelledError:
            if expired:
                self._finish(
                    rid, method, stream, None, SwarmdError(ERR_TIMEOUT, f"{method!r} ran past its deadline")
                )
            elif stream is not None:
                # the caller cancelled (or the connection went): no answer, just stop the stream
                ch = stream.channel
                if ch.error is None:
                    if self.conn.error is None:
                        ch.reset(SwarmdError(ERR_CANCELLED, "cancelled by the caller"))
                    else:
                        ch._fail(SwarmdError(ERR_CLOSED, "connection closed"))
                self.conn._channels.pop(ch.id, None)
        except BaseException as e:  # noqa: BLE001
            self._finish(rid, method, stream, None, e)
        else:
            self._finish(rid, method, stream, result, None)
        finally:
            if timer is not None:
                timer.cancel()
            self._running.pop(rid, None)

    def _finish(
        self, rid: int, method: str, stream: Stream | None, result: Any, exc: BaseException | None
    ) -> None:
        if rid < 0:  # an event: nobody waits for the outcome
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                self._log_handler_error(method, exc)
            return
        if stream is not None:
            # the callee's side of a stream ends with its handler; later frames are dropped
            ch = stream.channel
            if exc is None and ch.error is None:
                ch.end()
            self.conn._channels.pop(ch.id, None)
        if exc is None:
            if self.conn.error is not None:
                return
            try:
                msg = envelope.response(rid, result)
            except (TypeError, ValueError, OverflowError) as e:
                self._reply_error(
                    rid, SwarmdError(ERR_INTERNAL, f"result of {method!r} cannot be encoded: {e}")
                )
                self._log_handler_error(method, e)
                return
            if len(msg) > self.max_message:
                self._reply_error(rid, self._too_large(f"the result of {method!r}", len(msg)))
                return
            # the last handler running writes at once (one loop iteration sooner);
            # answers of handlers finishing together still share one flush
            self.conn.send_message(msg, now=len(self._running) <= 1)
            return
        if isinstance(exc, SwarmdError):
            err = exc
        elif isinstance(exc, asyncio.CancelledError):
            err = SwarmdError(ERR_CANCELLED, "handler cancelled")
        else:
            self._log_handler_error(method, exc)
            err = SwarmdError(ERR_INTERNAL, f"{method!r} failed: {type(exc).__name__}")
        if stream is not None and stream.channel.error is None and self.conn.error is None:
            stream.channel.reset(err)
        self._reply_error(rid, err)

    def _log_handler_error(self, method: str, exc: BaseException) -> None:
        key = f"{method}:{type(exc).__name__}"
        if hostile.allow(key) is not None:
            tb = "".join(traceback.format_exception(exc)).rstrip()
            self._log.bind(method=method, error=type(exc).__name__).error(f"handler raised: {tb}")

    def _too_large(self, what: str, size: int) -> SwarmdError:
        return SwarmdError(
            ERR_TOO_LARGE,
            f"{what} is {size} bytes as an RPC message, over the {self.max_message}-byte limit "
            "(net.max_message_size); large data travels in a stream",
        )

    def _reply_error(self, rid: int, err: SwarmdError) -> None:
        if self.conn.error is None:
            try:
                msg = envelope.error(rid, err)
            except (TypeError, ValueError):
                msg = envelope.error(rid, SwarmdError(err.code, err.message))
            if len(msg) > self.max_message:
                msg = envelope.error(rid, SwarmdError(err.code, err.message[:1000]))
            self.conn.send_message(msg)

    def _on_event(self, method: str, params: Any) -> None:
        try:
            m = self._lookup(method)
            if m.stream:
                raise SwarmdError(ERR_BAD_REQUEST, f"{method!r} is a stream method, not an event")
            if len(self._events) + len(self._running) >= self.config.max_in_flight:
                raise SwarmdError(ERR_OVERLOADED, "too many events running")
        except SwarmdError as e:
            if hostile.allow(f"event:{e.code}") is not None:
                self._log.bind(method=method, code=e.code).info(f"event dropped: {e.message}")
            return
        ctx = CallContext(self.conn.remote_public_key or b"", method, -1, None, self)
        coro = m.handler(ctx, params)
        if not m.inline:
            task = self._loop.create_task(self._continue_event(method, coro))
            self._events.add(task)
            task.add_done_callback(self._events.discard)
            return
        try:
            first = coro.send(None)
        except StopIteration:
            return
        except BaseException as e:  # noqa: BLE001
            self._finish(-1, method, None, None, e)
            return
        task = self._loop.create_task(self._continue_event(method, _Resume(coro, first)))
        self._events.add(task)
        task.add_done_callback(self._events.discard)

    async def _continue_event(self, method: str, resumed: Awaitable[Any]) -> None:
        try:
            await resumed
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001
            self._finish(-1, method, None, None, e)

    # -- lifecycle ---------------------------------------------------------

    def _on_close(self, err: SwarmdError) -> None:
        closed = (
            SwarmdError(ERR_CLOSED, f"connection closed: {err.message}") if err.code != ERR_CLOSED else err
        )
        # requests held for a peer that stopped reading (up to max_backlog_bytes) are
        # never run now: free them at once rather than at the next GC pass
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._held is not None:
            self._held = []
            self._held_bytes = 0
        self._held_channels.clear()
        pending, self._pending = self._pending, {}
        self._deadlines = {}
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._sweep_at = math.inf
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(closed)
        for task in list(self._running.values()) + list(self._events):
            self._cancel_soon(task, "connection closed")

    async def close(self) -> None:
        """Close the connection and wait for our handlers to stop."""
        self.conn.close()
        tasks = list(self._running.values()) + list(self._events)
        for t in tasks:
            self._cancel_soon(t, "connection closed")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _cancel_soon(self, task: asyncio.Task[Any], msg: str) -> None:
        """Cancel after the task's first step: a Task cancelled before it ever ran
        would never resume the handler we already started inline (no cleanup, no reply)."""
        self._loop.call_soon(task.cancel, msg)

    async def wait_closed(self) -> SwarmdError:
        return await asyncio.shield(self.conn.closed)
