"""API keys: created once, shown once, stored only as a hash.

A key reads `swd_<id>_<secret>`: the id (12 hex) finds the row, the secret is
32 random bytes, so a plain sha256 of the whole key is a safe verifier (no
password stretching needed for high-entropy keys) and the comparison is
constant-time. The database is SQLite in WAL mode, shared by the running
gateway and the `swarmd keys` command; the gateway notices another process's
changes through `PRAGMA data_version` (looked at most every check_interval,
0.25 s, to keep SQLite off the per-request path, and at once for an unknown
key id) and reloads: a key created by the CLI works at once, a revoke from the
CLI takes effect within a quarter of a second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, SwarmdError

PERMISSIONS: tuple[str, ...] = ("infer", "models:read", "models:write", "admin")
KEY_PREFIX = "swd_"
MAX_KEY_LENGTH = 128
VERIFIED_MAX = 1024  # verified tokens remembered between reloads (KeyStore._verified)

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    permissions TEXT NOT NULL,
    rate_rps REAL,
    rate_burst REAL,
    created REAL NOT NULL,
    revoked REAL,
    requests INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    last_used REAL
);
"""


@dataclass
class ApiKey:
    id: str
    name: str
    hash: str
    permissions: frozenset[str]
    created: float
    revoked: float | None = None
    rate_rps: float | None = None
    rate_burst: float | None = None
    requests: int = 0
    denied: int = 0
    last_used: float | None = None

    def allows(self, permission: str) -> bool:
        return "admin" in self.permissions or permission in self.permissions

    def public(self) -> dict[str, Any]:
        """The listing form: masked, no hash."""
        return {
            "id": self.id,
            "key": f"{KEY_PREFIX}{self.id}_{'*' * 8}",
            "name": self.name,
            "permissions": sorted(self.permissions),
            "created": self.created,
            "revoked": self.revoked,
            "rate_limit_rps": self.rate_rps,
            "rate_limit_burst": self.rate_burst,
            "requests": self.requests,
            "denied": self.denied,
            "last_used": self.last_used,
        }


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_permissions(perms: Any) -> frozenset[str]:
    if isinstance(perms, str):
        perms = [p.strip() for p in perms.split(",") if p.strip()]
    if not isinstance(perms, (list, tuple)) or not perms:
        raise SwarmdError(ERR_BAD_REQUEST, f"permissions must be a non-empty list of: {', '.join(PERMISSIONS)}")
    for p in perms:
        if p not in PERMISSIONS:
            raise SwarmdError(ERR_BAD_REQUEST, f"unknown permission {p!r:.40}; expected some of: {', '.join(PERMISSIONS)}")
    return frozenset(perms)


@dataclass
class _Pending:
    requests: int = 0
    denied: int = 0
    last_used: float = 0.0


@dataclass
class KeyStore:
    """The key database of one data dir; cheap to authenticate against (in-memory cache)."""

    path: Path
    _db: sqlite3.Connection = field(init=False, repr=False)
    _cache: dict[str, ApiKey] = field(init=False, default_factory=dict)
    _version: int = field(init=False, default=-1)
    _checked: float = field(init=False, default=0.0)
    check_interval: float = 0.25  # seconds between looks for another process's changes
    _pending: dict[str, _Pending] = field(init=False, default_factory=dict)
    # tokens whose hash matched, with the key they matched: emptied on every reload of _cache (a
    # revoke, another process's change, a usage flush), so a cached answer is never staler than it
    _verified: dict[str, ApiKey] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        os.chmod(self.path, 0o600)
        self._refresh(force=True)

    def close(self) -> None:
        self.flush()
        self._db.close()

    # -- cache ----------------------------------------------------------------

    def _refresh(self, force: bool = False, look: bool = False) -> None:
        """Reload the cache if another process changed the database (force: reload anyway;
        look: check now rather than waiting for check_interval)."""
        now = time.monotonic()
        if not force and not look and now - self._checked < self.check_interval:
            return
        self._checked = now
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version and not force:
            return
        rows = self._db.execute(
            "SELECT id, name, hash, permissions, created, revoked, rate_rps, rate_burst, requests, denied, last_used"
            " FROM api_keys"
        ).fetchall()
        self._cache = {
            r[0]: ApiKey(
                id=r[0], name=r[1], hash=r[2], permissions=frozenset(r[3].split(",")), created=r[4],
                revoked=r[5], rate_rps=r[6], rate_burst=r[7], requests=r[8], denied=r[9], last_used=r[10],
            )
            for r in rows
        }
        self._verified = {}
        self._version = version

    # -- operations -----------------------------------------------------------

    def create(
        self,
        name: str,
        permissions: Any,
        *,
        rate_rps: float | None = None,
        rate_burst: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; the returned secret is the only time the full key exists."""
        if not isinstance(name, str) or not 0 < len(name) <= 100:
            raise SwarmdError(ERR_BAD_REQUEST, "key name must be a string of 1-100 characters")
        perms = parse_permissions(permissions)
        for what, v in (("rate_limit_rps", rate_rps), ("rate_limit_burst", rate_burst)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1e9):
                raise SwarmdError(ERR_BAD_REQUEST, f"{what} must be a positive number")
        key_id = os.urandom(6).hex()
        secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        token = f"{KEY_PREFIX}{key_id}_{secret}"
        key = ApiKey(
            id=key_id, name=name, hash=hash_key(token), permissions=perms, created=time.time(),
            rate_rps=rate_rps, rate_burst=rate_burst,
        )
        self._db.execute(
            "INSERT INTO api_keys (id, name, hash, permissions, rate_rps, rate_burst, created) VALUES (?,?,?,?,?,?,?)",
            (key.id, key.name, key.hash, ",".join(sorted(perms)), rate_rps, rate_burst, key.created),
        )
        self._refresh(force=True)
        return key, token

    def revoke(self, key_id: str) -> ApiKey:
        cur = self._db.execute("UPDATE api_keys SET revoked=? WHERE id=? AND revoked IS NULL", (time.time(), key_id))
        self._refresh(force=True)
        key = self._cache.get(key_id)
        if key is None or (cur.rowcount == 0 and key.revoked is None):
            raise SwarmdError(ERR_NOT_FOUND, f"no API key with id {key_id!r:.40}")
        return key

    def get(self, key_id: str) -> ApiKey:
        self.flush()
        key = self._cache.get(key_id)
        if key is None:
            raise SwarmdError(ERR_NOT_FOUND, f"no API key with id {key_id!r:.40}")
        return key

    def list(self) -> list[ApiKey]:
        self.flush()
        return sorted(self._cache.values(), key=lambda k: k.created)

    def count_active(self) -> int:
        self._refresh()
        return sum(1 for k in self._cache.values() if k.revoked is None)

    def authenticate(self, token: str) -> ApiKey | None:
        """The live key for this token, or None (unknown, malformed or revoked). A token verified
        since the last reload is answered from _verified, without hashing it again."""
        self._refresh()
        key = self._verified.get(token)
        if key is not None:
            return key
        if len(token) > MAX_KEY_LENGTH or not token.startswith(KEY_PREFIX):
            return None
        key_id, sep, _ = token[len(KEY_PREFIX):].partition("_")
        if not sep:
            return None
        key = self._cache.get(key_id)
        if key is None:  # maybe created a moment ago by `swarmd keys create`
            self._refresh(look=True)
            key = self._cache.get(key_id)
        if key is None or key.revoked is not None:
            return None
        if not hmac.compare_digest(key.hash, hash_key(token)):
            return None
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = key
        return key

    # -- usage ----------------------------------------------------------------

    def record(self, key_id: str, *, denied: bool = False) -> None:
        """Count one request against a key (in memory; flush() writes it)."""
        p = self._pending.get(key_id)
        if p is None:
            p = self._pending[key_id] = _Pending()
        if denied:
            p.denied += 1
        else:
            p.requests += 1
        p.last_used = time.time()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        with self._db:
            self._db.execute("BEGIN")
            for key_id, p in pending.items():
                self._db.execute(
                    "UPDATE api_keys SET requests=requests+?, denied=denied+?, last_used=? WHERE id=?",
                    (p.requests, p.denied, p.last_used, key_id),
                )
        self._refresh(force=True)
