"""RpcPeer: both ends of a connection call, notify and stream to each other.

Wire messages are the envelopes of `swarmd.rpc.envelope` on mux channel 0;
stream calls additionally own a mux channel opened by the caller. This module
is the caller side and the routing of incoming messages; the callee side
(handlers, backlog, admission) is `callee.Callee`. The hot path is kept lean:
a call is one future, one deadline entry (no timer of its own: one sweep timer
per peer fires at the earliest deadline) and one frame written at once when
nothing else is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections import deque
from typing import Any

import msgpack
from loguru import logger

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_INTERNAL,
    ERR_TIMEOUT,
    SwarmdError,
)
from swarmd.net.channel import Channel
from swarmd.net.connection import SecureConnection
from swarmd.node import tracing
from swarmd.node.deadline import within
from swarmd.node.loglimit import hostile
from swarmd.node.trust import HELLO_EVENT, MAX_GRANTS
from swarmd.rpc import codec, envelope
from swarmd.rpc.builtins import BUILTINS
from swarmd.rpc.callee import Callee
from swarmd.rpc.codec import ext_hook
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.envelope import CANCEL, ERROR, EVENT, REQUEST, RESPONSE, EnvelopeError, request_fields_ok
from swarmd.rpc.methods import Firewall, Methods
from swarmd.rpc.stream import Stream

_unpackb = msgpack.unpackb  # one C call per message, its options spelt out where it is called
_SWEEP_SLACK = 0.001  # a sweep also expires calls due within this many seconds
_SWEEP_MIN_GAP = 0.01  # and the next sweep is at least this far away


class RpcPeer(Callee):
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
        # rid -> (future, deadline, method, timeout) of every call awaiting its answer; one
        # sweep timer fires at the earliest deadline instead of a timer per call
        self._pending: dict[int, tuple[asyncio.Future[Any], float, str, float]] = {}
        conn.awaits_answers(self._pending)  # the connection polls longer while calls await answers
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._pack = codec.new_packer().pack  # one per peer: a peer lives on one thread
        self._timeout: Any = None  # the timeout of the last call() and its milliseconds, for the next
        self._timeout_ms = 0
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
        # the parent context of the traced request being dispatched (tracing on, request with meta)
        self._traced: Any = None
        # the peer refused a request with a meta element (a version before it): we send none
        self._no_meta = False
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
        self, method: str, params: Any, timeout: float, channel: int, meta: dict[str, Any] | None = None
    ) -> tuple[int, asyncio.Future[Any]]:
        conn = self.conn
        if conn.error is not None:
            raise SwarmdError(ERR_CLOSED, f"connection closed: {conn.error.message}")
        rid = self._next_id
        self._next_id = rid + 1
        try:
            req = [REQUEST, rid, method, params, int(timeout * 1000), channel]
            if meta is not None:
                req.append(meta)
            msg = self._pack(req)
        except (TypeError, ValueError, OverflowError) as e:
            raise SwarmdError(ERR_BAD_REQUEST, f"params of {method!r} cannot be encoded: {e}") from None
        if len(msg) > self.max_message:
            raise self._too_large(f"a request for {method!r}", len(msg))
        fut = self._loop.create_future()
        pending = self._pending
        deadline = self._loop.time() + timeout
        pending[rid] = (fut, deadline, method, timeout)
        if deadline < self._sweep_at:
            self._arm_sweep(deadline)
        # a lone call goes out at once; calls made together coalesce into one flush
        conn.send_message(msg, now=len(pending) == 1)
        return rid, fut

    def _forget(self, rid: int) -> asyncio.Future[Any] | None:
        """Drop a call from the pending set (answered, expired or given up); its future, if it was there."""
        entry = self._pending.pop(rid, None)
        return entry[0] if entry is not None else None

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
        pending = self._pending
        if not pending:
            return
        now = self._loop.time()
        horizon = now + _SWEEP_SLACK
        expired = []
        nxt = math.inf
        for rid, entry in pending.items():
            d = entry[1]
            if d <= horizon:
                expired.append(rid)
            elif d < nxt:
                nxt = d
        for rid in expired:
            fut, _, method, timeout = pending.pop(rid)
            if not fut.done():
                fut.set_exception(SwarmdError(ERR_TIMEOUT, f"{method!r} got no answer within {timeout:g} s"))
                self._send_cancel(rid)
        if nxt < math.inf and self.conn.error is None:
            self._arm_sweep(max(nxt, now + _SWEEP_MIN_GAP))

    def _send_cancel(self, rid: int) -> None:
        if self.conn.error is None:
            self.conn.send_message(envelope.cancel(rid))

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - deadline sweep, no wait_for
        """Call method on the peer; raises SwarmdError (remote code, ERR_TIMEOUT, ERR_CLOSED)."""
        if tracing.tracer is not None:
            return await self._call_traced(method, params, timeout)
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
            if timeout is not self._timeout:  # else the same object as the last call's (the default)
                self._timeout_ms = int(timeout * 1000)
                self._timeout = timeout
            pack = self._pack  # (an attribute called as a method is looked up the slow way)
            msg = pack([REQUEST, rid, method, params, self._timeout_ms, 0])
        except (TypeError, ValueError, OverflowError) as e:
            raise SwarmdError(ERR_BAD_REQUEST, f"params of {method!r} cannot be encoded: {e}") from None
        if len(msg) > self.max_message:
            raise self._too_large(f"a request for {method!r}", len(msg))
        loop = self._loop
        fut = loop.create_future()
        pending = self._pending
        deadline = loop.time() + timeout
        pending[rid] = (fut, deadline, method, timeout)
        # a lone call goes out at once; calls made together coalesce into one flush
        conn.send_message(msg, now=len(pending) == 1)
        if deadline < self._sweep_at:
            self._arm_sweep(deadline)
        try:
            return await fut
        except asyncio.CancelledError:
            if self._forget(rid) is not None:
                self._send_cancel(rid)
            raise

    async def _call_traced(self, method: str, params: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
        """call() while tracing is on: inside a request's trace, a client span whose context
        travels in the request's meta; outside one, a plain call."""
        if self.conn._write_paused:
            await self._drain_quietly()
        if timeout is None:
            timeout = self.config.default_timeout
        if tracing.meta() is None:
            return await self._await_call(method, params, timeout, None)
        with tracing.span(f"rpc {method}", kind="CLIENT", attributes={"rpc.system": "swarmd", "rpc.method": method}):
            meta = None if self._no_meta else tracing.meta()
            try:
                return await self._await_call(method, params, timeout, meta)
            except SwarmdError as e:
                # a peer before the meta element refuses the request unread ("request must have 6
                # elements, got 7"): send it again without, and no meta on this connection again
                if meta is None or e.code != ERR_BAD_REQUEST or "must have 6 elements" not in e.message:
                    raise
                self._no_meta = True
                return await self._await_call(method, params, timeout, None)

    async def _await_call(self, method: str, params: Any, timeout: float, meta: dict[str, Any] | None) -> Any:
        rid, fut = self._start_call(method, params, timeout, 0, meta)
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
        """One RPC message from the peer.

        The two messages on every call's path, a plain call's request and its answer,
        are recognised and dispatched here straight from the decoded list; anything
        else, and anything one of these checks does not pass, goes through
        envelope.decode (the one full validator, which says what is wrong) and
        _on_checked. Kinds compare by identity: CPython keeps one object per small int,
        and a kind that is not that object (True for 1, say) takes the full path.
        """
        try:
            # (raw=False and use_list=True are msgpack 1.x's defaults: each keyword spelt out costs)
            msg = _unpackb(data, ext_hook=ext_hook, strict_map_key=False)
        except Exception:  # malformed: envelope.decode says how
            msg = None
        if type(msg) is list:
            n = len(msg)
            if n == 3:
                if msg[0] is RESPONSE:
                    rid = msg[1]
                    if type(rid) is int:
                        entry = self._pending.pop(rid, None)
                        if entry is not None:  # (an id we issued: no range check needed)
                            try:
                                entry[0].set_result(msg[2])
                            except asyncio.InvalidStateError:  # the caller gave up (cancelled) meanwhile
                                pass
                            return
            elif n == 6 and msg[0] is REQUEST and self._held is None:
                _, rid, method, params, t, ch = msg
                if request_fields_ok(rid, method, t, ch):  # envelope.decode's rule for these fields
                    self._msg_size = len(data)
                    self._on_request(rid, method, params, t, ch)
                    return
        self._on_checked(data)

    def _on_checked(self, data: bytes) -> None:
        """Any message, fully validated by envelope.decode, then dispatched by kind."""
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
            fut = self._forget(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == REQUEST:
            if self._held is not None:
                self._hold_message(msg, len(data))
                return
            self._msg_size = len(data)
            if len(msg) == 6:
                self._on_request(msg[1], msg[2], msg[3], msg[4], msg[5])
            else:
                self._on_request_meta(msg, None)
        elif kind == ERROR:
            fut = self._forget(msg[1])
            if fut is not None and not fut.done():
                fut.set_exception(SwarmdError.from_wire(msg[2]))
        elif kind == EVENT:
            if self._held is not None and msg[1] not in BUILTINS:  # the grants hello is learnt at once
                self._hold_message(msg, len(data))
                return
            self._on_event(msg[1], msg[2])
        elif kind == CANCEL:
            self._on_cancel(msg[1])

    def _on_cancel(self, rid: int) -> None:
        if self._held is not None:
            kept = [h for h in self._held if not (h[0][0] == REQUEST and h[0][1] == rid)]
            for h in self._held:
                if h[0][0] == REQUEST and h[0][1] == rid and h[0][5]:
                    self._held_channels.pop(h[0][5], None)
                    self.conn._drop_channel(h[0][5])
            self._held = kept
        task = self._running.get(rid)
        if task is not None:
            self._cancel_soon(task, "cancelled by the caller")

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
        self.conn.awaits_answers(self._pending)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._sweep_at = math.inf
        for fut, *_ in pending.values():
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

    async def wait_closed(self) -> SwarmdError:
        return await asyncio.shield(self.conn.closed)
