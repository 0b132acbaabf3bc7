"""Hand freed heap memory back to the operating system after a burst.

A peer that stops reading, or half-sends a large frame, makes a connection hold
megabytes until it is closed. CPython then frees those buffers, but glibc keeps
the pages of a fragmented heap mapped: the process's RSS stays at its high-water
mark although nothing uses the memory. `malloc_trim(0)` returns the free pages
(madvise), so RSS follows what is live again. It walks the heap, so it runs at
most once per `min_interval` seconds and only when a caller saw a large buffer go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any

_libc: Any = None
_last = -1e18


def _malloc_trim() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib.malloc_trim if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def release_freed_memory(min_interval: float = 1.0) -> bool:
    """Return free heap pages to the OS (glibc only); True when a trim ran."""
    global _last
    now = time.monotonic()
    if now - _last < min_interval:
        return False
    trim = _malloc_trim()
    if not trim:
        return False
    _last = now
    trim(0)
    return True
