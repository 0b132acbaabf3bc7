"""Who may be a worker, store, orchestrator, relay or gateway of a swarm.

A swarm has one or more **operator keys** (Ed25519). An operator admits a node
to roles by signing a **grant**: (roles, the node's public key, issued, expires)
— ``swarmd grant ROLE[,ROLE] PUBKEY`` prints one. A node keeps its grants in
``[trust] grants`` and shows them to peers twice: in the payload of every DHT
record it announces (``payload["grants"]``) and in a hello event
(``presentGrants``) it sends first on every RPC connection. Every node checks
the grants it sees against the operator keys in *its own* ``[trust] operators``;
nothing a peer says about itself (a weight, a role, a key field) is taken on
its word.

Sans-IO and in node/, the lowest layer, so every layer may use it. ``Trust.admits``
is THE admission check; ``topic_role`` (swarmd/topics.py) lets the swarm's lookups
apply it, so discovery, routing, model fetch and replication only ever see
admitted peers. A grant's wire form and signed bytes: docs/protocol.md §7.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarmd.errors import ConfigError, SwarmdError
from swarmd.node.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, parse_public_key, verify

GRANT_VERSION = 1
GRANTABLE_ROLES = ("worker", "store", "orchestrator", "relay", "gateway")
GRANTS_FIELD = "grants"  # the key of a record payload that carries the announcer's grants
HELLO_EVENT = "presentGrants"  # the RPC event a node sends first on every connection
MAX_GRANTS = 8  # grants a peer may present at once; more are ignored
MAX_GRANT_SIZE = 512  # bytes of one encoded grant; larger ones are ignored
CLOCK_SKEW = 300  # seconds a grant's `issued` may lie in the future (clocks of two boxes differ)
_DOMAIN = b"swarmd/grant/v1\x00"
_U64 = struct.Struct(">QQ")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class GrantError(ValueError):
    """A grant that does not admit: malformed, expired, wrongly signed or from an unknown issuer."""


def parse_roles(roles: str | Iterable[str]) -> tuple[str, ...]:
    """'worker,store' or ['worker', 'store'] -> ('store', 'worker'); unknown roles raise GrantError."""
    items = [r.strip() for r in roles.split(",")] if isinstance(roles, str) else [str(r) for r in roles]
    items = [r for r in items if r]
    if not items:
        raise GrantError(f"a grant needs at least one role of: {', '.join(GRANTABLE_ROLES)}")
    for r in items:
        if r not in GRANTABLE_ROLES:
            raise GrantError(f"unknown role {r!r}; a grant names some of: {', '.join(GRANTABLE_ROLES)}")
    return tuple(sorted(set(items)))


def parse_key(text: str | bytes, what: str = "public key") -> bytes:
    """parse_public_key, raising GrantError (a config's or a grant's key)."""
    try:
        return parse_public_key(text, what)
    except SwarmdError as e:
        raise GrantError(e.message) from None


def parse_duration(text: str) -> float:
    """'90d', '12h', '30m', '3600' or '3600s' -> seconds."""
    m = _DURATION.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise GrantError(f"duration must look like 90d, 12h, 30m or 3600s, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Grant:
    """An operator's signed statement: `subject` may play `roles` until `expires` (unix seconds)."""

    roles: tuple[str, ...]
    subject: bytes
    issuer: bytes
    issued: int
    expires: int
    signature: bytes

    @staticmethod
    def signed_bytes(
        roles: tuple[str, ...], subject: bytes, issuer: bytes, issued: int, expires: int
    ) -> bytes:
        return _DOMAIN + ",".join(roles).encode() + b"\x00" + subject + issuer + _U64.pack(issued, expires)

    @classmethod
    def issue(
        cls,
        operator: Identity,
        roles: str | Iterable[str],
        subject: bytes,
        *,
        expires: float,
        issued: float | None = None,
    ) -> Grant:
        """Sign a grant with the operator's key. `expires` is a unix time."""
        rs = parse_roles(roles)
        subject = parse_key(subject, "subject")
        t0 = int(time.time() if issued is None else issued)
        t1 = int(expires)
        if t1 <= t0:
            raise GrantError("a grant must expire after it is issued")
        sig = operator.sign(cls.signed_bytes(rs, subject, operator.public_key, t0, t1))
        return cls(rs, subject, operator.public_key, t0, t1, sig)

    # -- wire and text forms -----------------------------------------------------

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                GRANT_VERSION,
                list(self.roles),
                self.subject,
                self.issuer,
                self.issued,
                self.expires,
                self.signature,
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Grant:
        """Parse the wire form; raises GrantError saying what is wrong (signature not checked)."""
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_GRANT_SIZE:
            raise GrantError(f"a grant is msgpack bytes of at most {MAX_GRANT_SIZE} bytes")
        try:
            arr = msgpack.unpackb(
                bytes(data), raw=False, strict_map_key=True, max_array_len=16, max_str_len=256, max_bin_len=64
            )
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise GrantError(f"a grant is not valid msgpack: {e}") from None
        if not isinstance(arr, list) or len(arr) != 7:
            raise GrantError(
                "a grant is a msgpack array of 7 items [version, roles, subject, issuer, issued, expires, signature]"
            )
        version, roles, subject, issuer, issued, expires, sig = arr
        if version != GRANT_VERSION:
            raise GrantError(f"grant version {version!r:.20} is not supported (expected {GRANT_VERSION})")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise GrantError("grant roles must be a list of strings")
        rs = parse_roles(roles)
        if list(rs) != roles:
            raise GrantError("grant roles must be sorted and unique")
        for name, value, size in (
            ("subject", subject, PUBLIC_KEY_SIZE),
            ("issuer", issuer, PUBLIC_KEY_SIZE),
            ("signature", sig, SIGNATURE_SIZE),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise GrantError(f"grant {name} must be {size} bytes")
        for name, value in (("issued", issued), ("expires", expires)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise GrantError(f"grant {name} must be a unix time in seconds")
        return cls(rs, subject, issuer, issued, expires, sig)

    def to_text(self) -> str:
        """The config form: hex of the wire form (one line for `[trust] grants`)."""
        return self.encode().hex()

    @classmethod
    def from_text(cls, text: str) -> Grant:
        try:
            data = bytes.fromhex(text.strip())
        except ValueError:
            raise GrantError("a grant line must be hex digits, as printed by `swarmd grant`") from None
        return cls.decode(data)

    # -- checking ----------------------------------------------------------------

    def signature_ok(self) -> bool:
        return verify(
            self.issuer,
            self.signed_bytes(self.roles, self.subject, self.issuer, self.issued, self.expires),
            self.signature,
        )

    def check(self, operators: Iterable[bytes], now: float | None = None) -> None:
        """Raise GrantError unless an operator signed this grant and it is valid at `now`."""
        t = time.time() if now is None else now
        if self.issuer not in set(operators):
            raise GrantError(f"grant issuer {self.issuer.hex()[:16]}… is not an operator of this swarm")
        if not self.signature_ok():
            raise GrantError("grant signature does not verify with its issuer's key")
        if t >= self.expires:
            raise GrantError(f"grant expired at {_iso(self.expires)}")
        if self.issued > t + CLOCK_SKEW:
            raise GrantError(f"grant is issued in the future ({_iso(self.issued)})")

    def describe(self) -> dict[str, Any]:
        return {
            "roles": list(self.roles),
            "subject": self.subject.hex(),
            "issuer": self.issuer.hex(),
            "issued": _iso(self.issued),
            "expires": _iso(self.expires),
        }


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class TrustConfig:
    """[trust]: the swarm's operator keys and this node's grants (docs/operations.md#trust-model).

    A node that runs a worker, store, orchestrator, relay or gateway must either
    name the operators (then it admits a peer to a role only with a valid grant
    from one of them) or say open = true (every key is admitted to every role:
    demos, tests, a swarm closed by other means). Asking for neither refuses to start.
    """

    operators: list[str] = field(default_factory=list)  # hex Ed25519 keys whose grants this node honours
    open: bool = False  # admit every key to every role; must be asked for (SWARMD_TRUST_OPEN=true)
    grants: list[str] = field(default_factory=list)  # this node's grants, as printed by `swarmd grant`

    def validate(self) -> None:
        for i, k in enumerate(self.operators):
            try:
                parse_key(k, f"trust.operators[{i}]")
            except GrantError as e:
                raise ConfigError(str(e)) from None
        for i, g in enumerate(self.grants):
            try:
                Grant.from_text(g)
            except GrantError as e:
                raise ConfigError(f"trust.grants[{i}]: {e}") from None


class Trust:
    """The admission rule of one node: which keys it accepts in which role.

    Verified grants are cached by their bytes (a signature is checked once);
    expiry is checked on every question, so a grant stops admitting the second
    it expires.
    """

    _CACHE = 4096

    def __init__(
        self,
        operators: Iterable[bytes] = (),
        *,
        open: bool = False,  # noqa: A002 - the config key's name
        own_key: bytes | None = None,
        own_grants: Iterable[Grant] = (),
        clock: Any = time.time,
    ) -> None:
        self.operators = frozenset(operators)
        self.is_open = open
        self.own_key = own_key
        self.own_grants = tuple(own_grants)
        self.clock = clock
        self._verified: dict[bytes, Grant | None] = {}  # encoded grant -> Grant (None: never admits)
        self._presented = [g.encode() for g in self.own_grants]

    @classmethod
    def open_swarm(cls, own_key: bytes | None = None) -> Trust:
        """Every key admitted to every role: what a swarm without operators is."""
        return cls(open=True, own_key=own_key)

    @classmethod
    def from_config(cls, config: TrustConfig | None, own_key: bytes, roles: Iterable[str] = ()) -> Trust:
        """The node's Trust; raises ConfigError for a node running a grantable role
        with neither operators nor open = true, or with no valid grant of its own for a role."""
        cfg = config or TrustConfig()
        cfg.validate()
        operators = [parse_key(k) for k in cfg.operators]
        grants = [Grant.from_text(g) for g in cfg.grants]
        needed = [r for r in roles if r in GRANTABLE_ROLES]
        if not cfg.open and not operators:
            if needed:
                raise ConfigError(
                    f"roles {', '.join(needed)} need a trust model: name the swarm's operator keys in "
                    "[trust] operators (and this node's grants in [trust] grants), or set [trust] open = true "
                    "(env SWARMD_TRUST_OPEN=true) to admit every key to every role; see docs/operations.md"
                )
            return cls(open=True, own_key=own_key, own_grants=grants)
        own: list[Grant] = []
        now = time.time()
        for i, g in enumerate(grants):
            if g.subject != own_key:
                raise ConfigError(
                    f"trust.grants[{i}] is for key {g.subject.hex()[:16]}…, not this node's {own_key.hex()[:16]}…"
                )
            if operators:
                try:
                    g.check(operators, now)
                except GrantError as e:
                    raise ConfigError(f"trust.grants[{i}]: {e}") from None
            own.append(g)
        if operators and not cfg.open:
            held = {r for g in own for r in g.roles}
            missing = [r for r in needed if r not in held]
            if missing:
                raise ConfigError(
                    f"this node runs {', '.join(missing)} but holds no valid grant for it: run "
                    f"`swarmd grant {','.join(missing)} {own_key.hex()}` with an operator key and add the "
                    "printed line to [trust] grants"
                )
        return cls(operators, open=cfg.open, own_key=own_key, own_grants=own)

    def summary(self) -> dict[str, Any]:
        """What a start-up log line says about this node's trust (no secrets in it)."""
        if self.is_open:
            return {"trust": "open"}
        roles = sorted({r for g in self.own_grants for r in g.roles})
        expires = min((g.expires for g in self.own_grants), default=None)
        return {
            "trust": "operators",
            "operators": [k.hex()[:16] for k in sorted(self.operators)],
            "granted_roles": roles,
            "grants_expire": _iso(expires) if expires is not None else None,
        }

    # -- what we show --------------------------------------------------------------

    def presented(self) -> list[bytes]:
        """Our grants in wire form: for record payloads and the RPC hello."""
        return list(self._presented)

    def with_grants(self, payload: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A record payload carrying our grants (payload unchanged when we hold none)."""
        if not self._presented:
            return None if payload is None else dict(payload)
        out = dict(payload or {})
        out[GRANTS_FIELD] = list(self._presented)
        return out

    # -- what we accept ------------------------------------------------------------

    def _grant(self, data: Any) -> Grant | None:
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_GRANT_SIZE:
            return None
        key = bytes(data)
        if key in self._verified:
            return self._verified[key]
        try:
            g: Grant | None = Grant.decode(key)
            assert g is not None
            if g.issuer not in self.operators or not g.signature_ok():
                g = None
        except GrantError:
            g = None
        if len(self._verified) >= self._CACHE:
            self._verified.clear()
        self._verified[key] = g
        return g

    def roles_of(self, key: bytes, grants: Any) -> frozenset[str]:
        """The roles that valid grants (wire form) give `key` now."""
        if self.is_open:
            return frozenset(GRANTABLE_ROLES)
        if key == self.own_key:
            return frozenset(GRANTABLE_ROLES)
        if not isinstance(grants, (list, tuple)):
            return frozenset()
        now = self.clock()
        out: set[str] = set()
        for data in grants[:MAX_GRANTS]:
            g = self._grant(data)
            if g is not None and g.subject == key and g.issued <= now + CLOCK_SKEW and now < g.expires:
                out.update(g.roles)
        return frozenset(out)

    def admits(self, key: bytes, role: str, grants: Any = ()) -> bool:
        """THE admission check: may `key` act as `role`, given the grants it presented?"""
        return self.is_open or key == self.own_key or role in self.roles_of(key, grants)

    def speaks_for(self, caller: bytes, subject: bytes) -> bool:
        """May `caller` (the Noise key of a connection) act on `subject`'s entry
        (register, drain, unregister it)? Only the subject itself, this node,
        or an operator of the swarm: a key in a field is never an identity."""
        return caller == subject or caller == self.own_key or caller in self.operators

    def is_operator(self, key: bytes) -> bool:
        """This node or an operator key: may set what peers may not say of themselves (weights)."""
        return key == self.own_key or key in self.operators

    def explain_record(self, record: Any, role: str) -> tuple[bool, str]:
        """admits_record() with the reason, for operators' tools (`swarmd topic lookup`, `status`):
        which grant admits the record's key, or why none does."""
        if self.is_open:
            return True, "open swarm: every key is admitted"
        key = record.public_key
        if key == self.own_key:
            return True, "this node"
        payload = getattr(record, "payload", None)
        grants = payload.get(GRANTS_FIELD) if isinstance(payload, dict) else None
        if not isinstance(grants, (list, tuple)) or not grants:
            return False, f"presents no grant (needs one for {role} from an operator)"
        now = self.clock()
        reasons: list[str] = []
        for data in grants[:MAX_GRANTS]:
            try:
                g = Grant.decode(data)
            except GrantError as e:
                reasons.append(str(e))
                continue
            try:
                g.check(self.operators, now)
            except GrantError as e:
                reasons.append(str(e))
                continue
            if g.subject != key:
                reasons.append(f"a grant for another key ({g.subject.hex()[:16]}…)")
            elif role not in g.roles:
                reasons.append(f"a grant for {','.join(g.roles)}, not {role}")
            else:
                return True, f"{role} granted by {g.issuer.hex()[:16]}… until {_iso(g.expires)}"
        return False, "; ".join(dict.fromkeys(reasons))

    def admits_record(self, record: Any, role: str) -> bool:
        """admits() for a DHT record (anything with .public_key and .payload)."""
        if self.is_open:
            return True
        payload = getattr(record, "payload", None)
        grants = payload.get(GRANTS_FIELD) if isinstance(payload, dict) else None
        return self.admits(record.public_key, role, grants or ())


__all__ = [
    "CLOCK_SKEW",
    "GRANTABLE_ROLES",
    "GRANTS_FIELD",
    "HELLO_EVENT",
    "MAX_GRANTS",
    "Grant",
    "GrantError",
    "Trust",
    "TrustConfig",
    "parse_duration",
    "parse_key",
    "parse_roles",
]
