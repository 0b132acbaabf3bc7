"""The method registry and the firewall that admits callers by public key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarmd.errors import ERR_FORBIDDEN, SwarmdError
from swarmd.node.trust import GRANTABLE_ROLES, Trust

if TYPE_CHECKING:
    from swarmd.rpc.peer import RpcPeer
    from swarmd.rpc.stream import Stream

Handler = Callable[["CallContext", Any], Any]  # returns an awaitable (async def) or the answer itself
StreamHandler = Callable[["CallContext", Any, "Stream"], Awaitable[Any]]

READ = "r"
WRITE = "w"


@dataclass(slots=True)
class CallContext:
    """What a handler knows about the call it serves."""

    peer: bytes  # the caller's Ed25519 public key, verified by the handshake
    method: str
    request_id: int
    deadline: float | None  # event-loop time after which the caller no longer waits
    peer_conn: RpcPeer  # the connection, to call the caller back

    def time_left(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        import asyncio

        return self.deadline - asyncio.get_running_loop().time()


@dataclass
class Method:
    name: str
    handler: Callable[..., Awaitable[Any]]
    op: str
    stream: bool
    # Run the handler's first step in the connection's read callback, with no
    # Task: saves a loop iteration, but there asyncio.current_task() is None,
    # so asyncio.timeout(), TaskGroup and friends fail. Only for handlers that
    # never need a task of their own (ping-like answers computed at once).
    inline: bool = False
    # Roles a caller must hold a valid grant for (swarmd.node.trust); empty: any
    # caller the access lists admit. E.g. registerWorker is for admitted workers.
    roles: frozenset[str] = frozenset()


class Methods:
    """Named handlers, each declared read ("r") or write ("w") for the firewall."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        # the dict's own get, shadowing the method below: looked up on every request, a C call
        self.get = self._methods.get

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        op: str = READ,
        inline: bool = False,
        roles: Iterable[str] = (),
    ) -> None:
        """Serve `name`; op "w" marks a method that changes state (read-only peers are refused).

        handler is an async function, or a plain one for an answer computed at once: a plain
        function runs in the connection's read callback and its return value is the answer,
        with no coroutine and no Task (like `rpc.respond('echo', (req) => req)` in the JS stack).
        Whatever either kind raises becomes the caller's error.

        inline=True runs the handler's first step without a Task (see Method.inline).
        roles: in a swarm with operators, only callers holding a grant for one of
        these roles (or keys in access.allow, or this node) may call it.
        """
        self._add(Method(name, handler, _check_op(op), False, inline, _check_roles(roles)))

    def register_stream(
        self, name: str, handler: StreamHandler, *, op: str = READ, roles: Iterable[str] = ()
    ) -> None:
        self._add(Method(name, handler, _check_op(op), True, roles=_check_roles(roles)))

    def _add(self, m: Method) -> None:
        if not isinstance(m.name, str) or not m.name:
            raise ValueError("method name must be a non-empty string")
        if m.name in self._methods:
            raise ValueError(f"method {m.name!r} is already registered")
        self._methods[m.name] = m

    def unregister(self, name: str) -> None:
        self._methods.pop(name, None)

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods


def _check_op(op: str) -> str:
    if op not in (READ, WRITE):
        raise ValueError(f"op must be 'r' or 'w', got {op!r}")
    return op


def _check_roles(roles: Iterable[str]) -> frozenset[str]:
    out = frozenset(roles)
    for r in out:
        if r not in GRANTABLE_ROLES:
            raise ValueError(f"unknown role {r!r}; expected some of {', '.join(GRANTABLE_ROLES)}")
    return out


@dataclass
class Firewall:
    """Admits callers by Ed25519 public key, never by address.

    open=True admits everyone to everything (the default for a private swarm);
    otherwise keys in `allow` may call any method, keys in `allow_read_only`
    only methods registered with op "r", and everyone else nothing.

    `trust` adds the role check: a method registered with roles=... is, in a
    swarm with operators, only for callers whose presented grants (the
    presentGrants hello, see swarmd.node.trust) admit them to one of those
    roles, for keys in `allow`, and for this node itself. The firewall also
    carries the grants this node presents on every connection it makes.
    """

    allow: set[bytes] = field(default_factory=set)
    allow_read_only: set[bytes] = field(default_factory=set)
    open: bool = False
    trust: Trust | None = None

    @classmethod
    def open_to_all(cls) -> Firewall:
        return cls(open=True)

    @classmethod
    def from_keys(
        cls, allow: Iterable[bytes | str] = (), allow_read_only: Iterable[bytes | str] = ()
    ) -> Firewall:
        return cls({_key(k) for k in allow}, {_key(k) for k in allow_read_only})

    def check(
        self, peer: bytes, method: str, op: str, roles: frozenset[str] = frozenset(), held: frozenset[str] = frozenset()
    ) -> None:
        """Raise ERR_FORBIDDEN unless peer may call a method of this op (and, when
        the method names roles, holds a grant for one of them: `held`)."""
        trust = self.trust
        if roles and trust is not None and not trust.is_open:
            if peer in self.allow or trust.is_operator(peer) or roles & held:
                return
            raise SwarmdError(
                ERR_FORBIDDEN,
                f"method {method!r} is for admitted {' or '.join(sorted(roles))} nodes and peer "
                f"{peer.hex()[:16]}… presented no valid grant for that role",
            )
        if self.open or peer in self.allow:
            return
        if op == READ and peer in self.allow_read_only:
            return
        if peer in self.allow_read_only:
            raise SwarmdError(ERR_FORBIDDEN, f"method {method!r} writes and this peer has read-only access")
        raise SwarmdError(ERR_FORBIDDEN, f"peer {peer.hex()[:16]}… is not allowed to call {method!r}")


def _key(k: bytes | str) -> bytes:
    b = bytes.fromhex(k) if isinstance(k, str) else bytes(k)
    if len(b) != 32:
        raise ValueError("firewall keys are 32-byte Ed25519 public keys")
    return b
