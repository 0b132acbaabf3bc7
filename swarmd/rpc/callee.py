"""The callee side of an RPC connection: what the peer asks of us, run as handlers.

A request is checked (known method, firewall, deadline, in-flight cap) and its
handler runs in a Task of its own (so asyncio.timeout and TaskGroup work in
it); one registered inline=True runs its first step in the read callback, and
if it finishes without suspending its answer leaves with the flush that ends
the read. While the peer does not read our answers, new requests wait in a
bounded backlog; while its admission is decided (`hold`), everything it sends
waits, bounded too. `Callee` is a mixin of `RpcPeer`.
"""

from __future__ import annotations

import asyncio
import inspect
import traceback
import types
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

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
from swarmd.node import tracing
from swarmd.node.loglimit import hostile
from swarmd.rpc import envelope
from swarmd.rpc.builtins import BUILTINS
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.envelope import REQUEST, RESPONSE
from swarmd.rpc.methods import CallContext, Firewall, Method, Methods
from swarmd.rpc.stream import Stream

_NO_ROLES: frozenset[str] = frozenset()
_new_context = object.__new__
_COROUTINE = types.CoroutineType
# what plain handlers usually return: known not to be awaitable without asking inspect
_ANSWER_TYPES = frozenset((type(None), bool, int, float, str, bytes, list, dict, tuple))


async def _ready(value: Any) -> Any:
    """A plain handler's value as a coroutine, for the path that runs one (a traced request)."""
    return value


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    """A handler that returned an awaitable other than a coroutine (a Future, a Task)."""
    return await awaitable


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


class Callee:
    """Runs the peer's requests and events as handlers and answers them."""

    conn: SecureConnection
    methods: Methods
    firewall: Firewall | None
    config: RpcConfig
    max_message: int
    _loop: asyncio.AbstractEventLoop
    _pack: Any
    _log: Any
    _running: dict[int, asyncio.Task[Any]]
    _events: set[asyncio.Task[Any]]
    _inline: int
    _backlog: deque[tuple[int, str, Any, int | None, float, int]]
    _backlog_bytes: int
    _msg_size: int
    _held: list[tuple[list[Any], int, float]] | None
    _held_bytes: int
    _held_channels: dict[int, Channel]
    _traced: Any

    if TYPE_CHECKING:  # provided by RpcPeer

        @property
        def roles(self) -> frozenset[str]: ...

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
                    self._on_request_meta(msg, arrived)
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
        m = BUILTINS.get(method) or self.methods.get(method)
        if m is None:
            raise SwarmdError(ERR_UNKNOWN_METHOD, f"no method {method!r} on this peer")
        if self.firewall is not None and method not in BUILTINS:
            self.firewall.check(
                self.conn.remote_public_key or b"",
                method,
                m.op,
                m.roles,
                self.roles if m.roles else _NO_ROLES,
            )
        return m

    def _on_request_meta(self, msg: list[Any], arrived: float | None) -> None:
        """A request with a meta element (or a held one): dispatched in the caller's trace when
        tracing is on and the meta carries a trace context; the meta is ignored otherwise."""
        meta = envelope.request_meta(msg) if tracing.tracer is not None else None
        parent = tracing.extract(meta) if meta is not None else None
        if parent is None:
            self._on_request(msg[1], msg[2], msg[3], msg[4], msg[5], arrived)
            return
        self._traced = parent
        try:
            self._on_request(msg[1], msg[2], msg[3], msg[4], msg[5], arrived)
        finally:
            self._traced = None

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
            m = BUILTINS.get(method) or self.methods.get(method)
            if m is None:
                raise SwarmdError(ERR_UNKNOWN_METHOD, f"no method {method!r} on this peer")
            peer_key = conn.session.remote_public_key or b""
            if self.firewall is not None and method not in BUILTINS:
                self.firewall.check(peer_key, method, m.op, m.roles, self.roles if m.roles else _NO_ROLES)
            deadline = None
            if timeout_ms is not None:
                if timeout_ms <= 0:
                    raise SwarmdError(ERR_TIMEOUT, f"request for {method!r} arrived after its deadline")
                # from the time the read holding the request arrived (data_received's clock
                # reading, one per read), or from now for one dispatched later (held, backlog)
                deadline = (conn._last_recv if arrived is None else self._loop.time()) + timeout_ms / 1000.0
            if ch or m.stream:
                if not ch or not m.stream:
                    raise SwarmdError(
                        ERR_BAD_REQUEST,
                        f"{method!r} is a stream method: open it as a stream"
                        if m.stream
                        else f"{method!r} is not a stream method: call it",
                    )
                held = self._held_channels.pop(ch, None) if self._held_channels else None
                stream = Stream(self, held or conn.accept_channel(ch))
            # CallContext(peer_key, method, rid, deadline, self) without the dataclass __init__
            # (a Python call behind a type call: ~1/3 of building it); every field is set here
            ctx = _new_context(CallContext)
            ctx.peer = peer_key
            ctx.method = method
            ctx.request_id = rid
            ctx.deadline = deadline
            ctx.peer_conn = self
        except SwarmdError as e:
            if e.code == ERR_PROTOCOL:
                raise
            if ch and self._held_channels and self._held_channels.pop(ch, None) is not None:
                conn._drop_channel(ch)  # accepted while held; the caller resets it on our answer
            self._reply_error(rid, e)
            return
        # the handler's own code runs from here on (all of it, for a plain function): whatever
        # it raises becomes an error reply, never a protocol error of the connection
        try:
            coro = m.handler(ctx, params) if stream is None else m.handler(ctx, params, stream)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a handler may raise anything; it becomes an error reply
            self._finish(rid, method, stream, None, e)
            return
        kind = type(coro)
        if kind is not _COROUTINE:
            if kind in _ANSWER_TYPES or not inspect.isawaitable(coro):
                # a plain function (Methods.register): it has answered already, no coroutine
                # and no Task; with tracing on, its value still passes through a server span
                if self._traced is None:
                    if stream is None and conn.error is None:
                        # _answer's common case, inline: once per request
                        try:
                            pack = self._pack  # (an attribute called as a method is looked up the slow way)
                            msg = pack([RESPONSE, rid, coro])
                        except (TypeError, ValueError, OverflowError):
                            msg = None
                        if msg is not None and len(msg) <= self.max_message:
                            conn.send_message(msg)
                            return
                    self._answer(rid, method, stream, coro)
                    return
                coro = _ready(coro)
            else:
                coro = _awaited(coro)
        if self._traced is not None:
            # a server span around the handler, in its own Task (never inline: the span is
            # entered and left in one context)
            coro = tracing.serve(method, self._traced, coro)
            running[rid] = self._loop.create_task(self._continue(rid, method, coro, deadline, stream))
            return
        if not m.inline:
            running[rid] = self._loop.create_task(self._continue(rid, method, coro, deadline, stream))
            return
        # An inline handler's first step runs here: most finish without suspending (no Task).
        self._inline += 1
        try:
            first = coro.send(None)
        except StopIteration as stop:
            self._answer(rid, method, stream, stop.value)
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

    def _answer(self, rid: int, method: str, stream: Stream | None, value: Any) -> None:
        """The answer of a plain handler, or of an inline one that finished without suspending."""
        conn = self.conn
        if stream is None and conn.error is None:
            try:
                msg = self._pack([RESPONSE, rid, value])
            except (TypeError, ValueError, OverflowError):
                self._finish(rid, method, stream, value, None)  # reports the encoding error
                return
            if len(msg) > self.max_message:
                self._reply_error(rid, self._too_large(f"the result of {method!r}", len(msg)))
                return
            conn.send_message(msg)
            return
        self._finish(rid, method, stream, value, None)

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
                self.conn._drop_channel(ch.id)
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
            self.conn._drop_channel(ch.id)
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
        try:
            coro = m.handler(ctx, params)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            self._finish(-1, method, None, None, e)
            return
        if type(coro) is not _COROUTINE:
            if not inspect.isawaitable(coro):
                return  # a plain function: done
            coro = _awaited(coro)
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

    def _cancel_soon(self, task: asyncio.Task[Any], msg: str) -> None:
        """Cancel after the task's first step: a Task cancelled before it ever ran
        would never resume the handler we already started inline (no cleanup, no reply)."""
        self._loop.call_soon(task.cancel, msg)
