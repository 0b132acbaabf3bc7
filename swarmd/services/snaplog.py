"""Time-stamped snapshot logs: JSON lines, rotated by size, kept by count and age.

The live file is `<dir>/<name>.jsonl`; when the next write would take it past
`max_bytes` it is renamed `<name>-<UTC timestamp>.jsonl` and a fresh one
starts. Rotated files beyond `keep_files`, or older than `max_age_s`, are
deleted, so the log's disk use is bounded by about (keep_files + 1) *
max_bytes whatever the snapshot rate. `tail` reads newest first and stops as
soon as it has enough lines, reading at most one file's worth at a time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class SnapLogConfig:
    max_bytes: int = 4 * 1024 * 1024  # rotate the live file before it passes this size
    keep_files: int = 8  # rotated files kept (the live file is extra)
    max_age_s: float = 7 * 24 * 3600.0  # rotated files older than this are deleted


class SnapLog:
    def __init__(self, directory: Path, name: str, config: SnapLogConfig,
                 clock: Callable[[], float] = time.time) -> None:
        if config.max_bytes < 256:
            raise ValueError(f"snapshot log max_bytes must be at least 256, got {config.max_bytes}")
        if config.keep_files < 0:
            raise ValueError(f"snapshot log keep_files must be >= 0, got {config.keep_files}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config = config
        self._clock = clock
        self.live = self.dir / f"{name}.jsonl"
        self._last_us = 0

    # -- writing -------------------------------------------------------------

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Write entries as JSON lines, rotating between lines when a file fills."""
        if not entries:
            return
        lines = [json.dumps(e, separators=(",", ":"), default=str).encode() + b"\n" for e in entries]
        size = self.live.stat().st_size if self.live.exists() else 0
        batch: list[bytes] = []
        for line in lines:
            if size + len(line) > self.config.max_bytes and (size > 0 or batch):
                self._write(batch)
                batch = []
                self.rotate()
                size = 0
            batch.append(line)
            size += len(line)
        self._write(batch)

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        with open(self.live, "ab") as f:
            f.write(b"".join(lines))

    def _stamp(self) -> str:
        # Names must sort by time and never collide, even for two rotations in
        # one microsecond or after a clock step back: keep them strictly increasing.
        us = int(self._clock() * 1_000_000)
        newest = self.rotated()
        last = max(self._last_us, self._parse_us(newest[-1]) if newest else 0)
        us = max(us, last + 1)
        self._last_us = us
        return datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y%m%dT%H%M%S") + f"{us % 1_000_000:06d}Z"

    def _parse_us(self, path: Path) -> int:
        stamp = path.stem[len(self.name) + 1:]
        try:
            dt = datetime.strptime(stamp[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
            return int(dt.timestamp()) * 1_000_000 + int(stamp[15:21])
        except ValueError:
            return 0

    def rotate(self) -> Path | None:
        """Close the live file under a time-stamped name and apply retention."""
        if not self.live.exists() or self.live.stat().st_size == 0:
            return None
        target = self.dir / f"{self.name}-{self._stamp()}.jsonl"
        os.replace(self.live, target)
        self.prune()
        return target

    def rotated(self) -> list[Path]:
        """Rotated files, oldest first (their names sort by time)."""
        prefix = f"{self.name}-"
        return sorted(p for p in self.dir.glob(f"{self.name}-*.jsonl") if p.name.startswith(prefix))

    def prune(self) -> list[Path]:
        """Delete rotated files beyond keep_files or older than max_age_s."""
        files = self.rotated()
        doomed: list[Path] = []
        if len(files) > self.config.keep_files:
            doomed = files[: len(files) - self.config.keep_files]
        cutoff = self._clock() - self.config.max_age_s
        for p in files:
            if p in doomed:
                continue
            try:
                if p.stat().st_mtime < cutoff:
                    doomed.append(p)
            except FileNotFoundError:
                continue
        for p in doomed:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return doomed

    # -- reading -------------------------------------------------------------

    def files_newest_first(self) -> list[Path]:
        files = [p for p in reversed(self.rotated())]
        if self.live.exists():
            files.insert(0, self.live)
        return files

    def iter_newest_first(self) -> Iterator[dict[str, Any]]:
        for path in self.files_newest_first():
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # pruned between listing and reading
                continue
            for line in reversed(data.splitlines()):
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:  # a torn last line after a crash: skip it
                    continue
                if isinstance(obj, dict):
                    yield obj

    def tail(self, limit: int, offset: int = 0,
             match: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Newest entries first, after skipping `offset` matches."""
        out: list[dict[str, Any]] = []
        skipped = 0
        for entry in self.iter_newest_first():
            if match is not None and not match(entry):
                continue
            if skipped < offset:
                skipped += 1
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out
