"""SQLite persistence for things: one row per thing, the body as JSON.

WAL mode so readers (an operator's sqlite3 shell, a backup) never block the
service, and synchronous=NORMAL, which in WAL loses at most the last commits
on power loss but never corrupts. Only what the author registered is stored;
snapshots live in the snapshot log, not here, so the database stays small and
a restart replays exactly the registered things.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class StoredThing:
    """The persisted part of a thing (runtime state such as `last` is not stored)."""

    id: str
    type: str
    tags: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    opts: dict[str, Any] = field(default_factory=dict)
    rev: int = 1
    created: int = 0  # ms since the epoch
    updated: int = 0


class ThingStore:
    """A table of things in its own SQLite file. Synchronous on purpose: each
    write is one small row in WAL mode (well under a millisecond), cheaper
    than a thread hop, and ordering stays obvious."""

    def __init__(self, path: Path | None) -> None:
        """path None: an in-memory database (nothing survives close)."""
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target = str(self.path) if self.path is not None else ":memory:"
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS things ("
            " id TEXT PRIMARY KEY,"
            " type TEXT NOT NULL,"
            " body TEXT NOT NULL,"
            " rev INTEGER NOT NULL,"
            " created INTEGER NOT NULL,"
            " updated INTEGER NOT NULL)"
        )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def load_all(self) -> list[StoredThing]:
        """Every stored thing, oldest first, so a replay registers in the original order."""
        out = []
        for row in self._db.execute("SELECT id, type, body, rev, created, updated FROM things ORDER BY created, id"):
            body = json.loads(row[2])
            out.append(
                StoredThing(
                    id=row[0],
                    type=row[1],
                    tags=list(body.get("tags", [])),
                    info=dict(body.get("info", {})),
                    opts=dict(body.get("opts", {})),
                    rev=row[3],
                    created=row[4],
                    updated=row[5],
                )
            )
        return out

    @staticmethod
    def encode_body(t: StoredThing) -> str:
        return json.dumps({"tags": t.tags, "info": t.info, "opts": t.opts}, separators=(",", ":"), allow_nan=False)

    def put(self, t: StoredThing) -> None:
        """Insert or replace one thing in its own transaction."""
        self._db.execute(
            "INSERT INTO things (id, type, body, rev, created, updated) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET type=excluded.type, body=excluded.body, rev=excluded.rev,"
            " updated=excluded.updated",
            (t.id, t.type, self.encode_body(t), t.rev, t.created, t.updated),
        )

    def delete(self, ids: list[str]) -> None:
        if not ids:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany("DELETE FROM things WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM things").fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass
class Thing(StoredThing):
    """A registered thing in memory: its stored part plus its last snapshot.

    `last` is {"ts": ms, "online": bool, "snap": dict | None, "err": {code,
    message} | None}; it is runtime state, empty until the first snapshot.
    """

    last: dict[str, Any] = field(default_factory=dict)


def now_ms() -> int:
    return int(time.time() * 1000)
