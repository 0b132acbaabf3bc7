"""Model metadata in SQLite (WAL): one row per name+version, tombstoned on delete.

Rows are never removed, only tombstoned: a name:version always means the same
bytes, on every store, forever, so a deleted version can come back only with
its original digest. `updated` orders changes to a row (delete, re-push) so
replicas can merge catalogs by last-writer-wins.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swarmd.names import LATEST, ModelMeta
from swarmd.versions import next_version, version_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    format TEXT NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    tags TEXT NOT NULL,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    uploader TEXT NOT NULL,
    deleted REAL,
    updated REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS models_digest ON models(digest);
CREATE TABLE IF NOT EXISTS model_tags (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (name, version, tag)
);
CREATE INDEX IF NOT EXISTS model_tags_tag ON model_tags(tag);
"""


def meta_from_row(row: sqlite3.Row) -> ModelMeta:
    """A `SELECT *` row (its `seq` change counter left out)."""
    return ModelMeta(**{k: json.loads(row[k]) if k in ("inputs", "outputs", "tags") else row[k]
                        for k in row.keys() if k != "seq"})


class Catalog:
    """Thread-safe access to meta.sqlite; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()

        self._migrate()

    def _migrate(self) -> None:
        """Add the change counter to catalogs made before it existed (rows keep their order)."""
        with self._lock:
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(models)").fetchall()}
            if "seq" not in cols:
                self._db.execute("ALTER TABLE models ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
                self._db.execute("UPDATE models SET seq = rowid")
            self._db.execute("CREATE INDEX IF NOT EXISTS models_seq ON models(seq)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: Iterable[Any] = ()) -> ModelMeta | None:
        with self._lock:
            row = self._db.execute(sql, tuple(args)).fetchone()
        return meta_from_row(row) if row is not None else None

    def _many(self, sql: str, args: Iterable[Any] = ()) -> list[ModelMeta]:
        with self._lock:
            rows = self._db.execute(sql, tuple(args)).fetchall()
        return [meta_from_row(r) for r in rows]

    def row(self, name: str, version: str) -> ModelMeta | None:
        """The row, tombstoned or not."""
        return self._one("SELECT * FROM models WHERE name=? AND version=?", (name, version))

    def live(self, name: str, version: str | None = None) -> ModelMeta | None:
        if version is None or version == LATEST:  # the newest by the one version order (swarmd.versions)
            rows = self._many("SELECT * FROM models WHERE name=? AND deleted IS NULL", (name,))
            return max(rows, key=lambda m: version_key(m.version), default=None)
        return self._one("SELECT * FROM models WHERE name=? AND version=? AND deleted IS NULL", (name, version))

    def list(
        self, name: str | None = None, tag: str | None = None, digest: str | None = None, *, include_deleted: bool = False
    ) -> list[ModelMeta]:
        where, args = [], []
        if not include_deleted:
            where.append("m.deleted IS NULL")
        if name is not None:
            where.append("m.name=?")
            args.append(name)
        if digest is not None:
            where.append("m.digest=?")
            args.append(digest)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM model_tags t WHERE t.name=m.name AND t.version=m.version AND t.tag=?)")
            args.append(tag)
        sql = "SELECT * FROM models m"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._many(sql, args)
        rows.sort(key=lambda m: (m.name, version_key(m.version)))
        return rows

    def next_version(self, name: str) -> str:
        """The version a push without one takes (swarmd.versions.next_version; tombstones count)."""
        with self._lock:
            rows = self._db.execute("SELECT version FROM models WHERE name=?", (name,)).fetchall()
        return next_version(r[0] for r in rows)

    def upsert(self, m: ModelMeta) -> None:
        """Write one row (insert or replace) and its tag index, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM models").fetchone()[0]
                self._db.execute(
                    "INSERT OR REPLACE INTO models (name, version, digest, size, format, inputs, outputs, tags,"
                    " description, created, uploader, deleted, updated, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        m.name, m.version, m.digest, m.size, m.format, json.dumps(m.inputs), json.dumps(m.outputs),
                        json.dumps(m.tags), m.description, m.created, m.uploader, m.deleted, m.updated, seq,
                    ),
                )
                self._db.execute("DELETE FROM model_tags WHERE name=? AND version=?", (m.name, m.version))
                self._db.executemany(
                    "INSERT INTO model_tags (name, version, tag) VALUES (?,?,?)",
                    [(m.name, m.version, t) for t in m.tags],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def changes(self, since: int, limit: int) -> tuple[list[ModelMeta], int, int]:
        """Rows changed after change number `since`, oldest change first, at most `limit`.

        Returns (rows, cursor, head): pass cursor as the next `since`; head is the
        newest change number (a peer whose cursor is past it lost its catalog).
        Every write of a row gives it the next change number, so a replica that
        asks again from its cursor sees each change once, not the whole catalog.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM models WHERE seq > ? ORDER BY seq LIMIT ?", (since, limit)
            ).fetchall()
            head = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM models").fetchone()[0]
        cursor = rows[-1]["seq"] if rows else max(since, 0) if since <= head else head
        return [meta_from_row(r) for r in rows], cursor, head

    def tombstoned_digests(self) -> set[str]:
        """Digests only deleted rows refer to (a replica must not be given them again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT digest FROM models WHERE deleted IS NOT NULL"
                " EXCEPT SELECT digest FROM models WHERE deleted IS NULL"
            ).fetchall()
        return {r[0] for r in rows}

    def referenced(self, digest: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM models WHERE digest=? AND deleted IS NULL LIMIT 1", (digest,)
            ).fetchone()
        return row is not None

    def live_digests(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT digest FROM models WHERE deleted IS NULL").fetchall()
        return {r[0] for r in rows}

    def counts(self) -> tuple[int, int]:
        """(live versions, bytes they reference, counting each blob once)."""
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM models WHERE deleted IS NULL").fetchone()[0]
            b = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT digest, size FROM models WHERE deleted IS NULL)"
            ).fetchone()[0]
        return n, b


def now() -> float:
    return time.time()
