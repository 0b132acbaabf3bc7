"""Hand freed heap memory back to the operating system after a burst.

A peer that stops reading, or half-sends a large frame, makes a connection hold
megabytes until it is closed. CPython then frees those buffers, but glibc keeps
the pages of a fragmented heap mapped: the process's RSS stays at its high-water
mark although nothing uses the memory. `malloc_trim(0)` returns the free pages
(madvise), so RSS follows what is live again. It walks the heap, so it runs at
most once per `min_interval` seconds, and only after a caller saw a large buffer go;
requests in between coalesce into one trim at the end of the interval.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from typing import Any

_trim: Any = None  # libc's malloc_trim, False where there is none (not glibc)
_last = -1e18
_pending: asyncio.TimerHandle | None = None
_pending_loop: asyncio.AbstractEventLoop | None = None


def _malloc_trim() -> Any:
    global _trim
    if _trim is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _trim = lib.malloc_trim if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _trim = False
    return _trim


def release_freed_memory(min_interval: float = 1.0) -> bool:
    """Return free heap pages to the OS now (glibc only); True when a trim ran."""
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


def release_freed_memory_soon(
    loop: asyncio.AbstractEventLoop, delay: float = 0.1, min_interval: float = 1.0
) -> None:
    """Trim after `delay` (buffers freed by the same close are gone by then), or at the end
    of the current interval; one trim serves every request made while it is pending."""
    global _pending, _pending_loop
    if _pending is not None and _pending_loop is loop and not loop.is_closed():
        return
    wait = max(delay, _last + min_interval - time.monotonic())

    def run() -> None:
        global _pending
        _pending = None
        release_freed_memory(min_interval)

    _pending = loop.call_later(wait, run)
    _pending_loop = loop


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
BULK_TRIM_THRESHOLD = 16 << 20  # free heap kept at the top before glibc gives it back on its own
BULK_MMAP_THRESHOLD = 4 << 20  # allocations from this size up get their own mapping
_tuned = False


def tune_for_bulk() -> bool:
    """Keep glibc from shrinking and regrowing the heap under a bulk stream (once per process).

    A stream moves ~64 KiB buffers (ciphertexts, plaintexts, chunks), freed in bursts.
    By default glibc gives the top of the heap back to the kernel as soon as 128 KiB of it
    are free (its dynamic threshold only rises after a freed mmapped block, which a
    stream of 64 KiB buffers never frees), so every burst is re-faulted and re-zeroed page
    by page: measured here, half the CPU of each end of a loopback stream went to page
    faults, clear_page and munmap. With 16 MiB kept, a stream's working set (one 8 MiB
    window, one 4 MiB write buffer) stays mapped; release_freed_memory (malloc_trim) still
    hands everything back after a burst. Returns True when the settings were applied.
    """
    global _tuned
    if _tuned:
        return False
    _tuned = True
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    mallopt = getattr(lib, "mallopt", None) if lib is not None else None
    if mallopt is None or not hasattr(lib, "malloc_trim"):  # glibc only
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, BULK_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, BULK_TRIM_THRESHOLD))
    from loguru import logger

    logger.bind(component="node").debug(
        "heap tuned for bulk transfers", trim_threshold=BULK_TRIM_THRESHOLD, mmap_threshold=BULK_MMAP_THRESHOLD, ok=ok
    )
    return ok
