"""One daemon per data dir: an exclusive advisory lock held for the node's life.

Two daemons on one data dir would share an identity (peers deduplicate their
connections against each other), race on SQLite and on status.json, and the
one stopping first would delete the other's status file. The lock is a
``flock`` on ``<data dir>/lock``, so the kernel releases it when the process
dies, even by ``kill -9``: a stale lock file never blocks a restart. The file
holds the owner's PID so the refused second daemon can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from swarmd.errors import ConfigError

LOCK_NAME = "lock"


class DataDirLock:
    """An acquired lock; ``release()`` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Lock data_dir for this process, or raise ConfigError naming the PID holding it."""
        path = Path(data_dir) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open the data dir lock {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"data dir {data_dir} is in use by another swarmd ({who}); "
                "stop it or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
